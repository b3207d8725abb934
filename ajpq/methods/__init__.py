"""Compression methods: AJPQ's RL search and the baselines it is measured against, one registry for all.

Every method is a class registered with :func:`~ajpq.methods.base.register_method` (see :mod:`ajpq.methods.base`)
and runs inside :func:`ajpq.runner.run_search` (``ajpq search --method NAME``; ``ajpq compare`` runs each through
it too): ``ajpq`` (:mod:`ajpq.methods.rl`), ``local`` (ajpq without its agents), ``random``, ``uniform``,
``opq``, ``olmp``, ``admm``.
"""

from __future__ import annotations

from ajpq.methods import admm, local_search, olmp, opq, random_search, rl, uniform
from ajpq.methods.base import METHODS, Method, MethodOptions, SearchContext, method_class, register_method

__all__ = [
    "METHODS",
    "Method",
    "MethodOptions",
    "SearchContext",
    "admm",
    "local_search",
    "method_class",
    "olmp",
    "opq",
    "random_search",
    "register_method",
    "rl",
    "uniform",
]
