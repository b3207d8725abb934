"""Compression methods that share AJPQ's interface (model, data, budget, seed in; run folder and policy out).

Each module has ``run(workspace, budget, seed, options, run_dir, search_recorder=None) -> MethodResult`` and
``DEFAULTS`` (its options). :data:`SEARCH_METHODS` wraps them for ``ajpq search --method NAME``
(:data:`ajpq.search.METHODS`): options come from the search configuration's ``method_options`` when it has one,
``episodes``, ``max_sparsity`` and ``activation_bits`` from the search configuration itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

METHOD_MODULES: dict[str, str] = {
    "uniform": "ajpq.methods.uniform",
    "random": "ajpq.methods.random_search",
    "opq": "ajpq.methods.opq",
    "olmp": "ajpq.methods.olmp",
    "admm": "ajpq.methods.admm",
}
"""``--method`` name -> module with ``run`` and ``DEFAULTS``."""


def method_module(name: str) -> Any:
    return importlib.import_module(METHOD_MODULES[name])


def run_method(name: str, workspace: Any, budget: Any, seed: int = 0, options: Any = None, run_dir: Any = None) -> Any:
    """Run method ``name`` outside ``ajpq search`` (as ``ajpq compare`` does); returns its ``MethodResult``."""
    return method_module(name).run(workspace, budget, seed, options, run_dir)


def _search_adapter(name: str) -> Callable[[Any], None]:
    def method(context: Any) -> None:
        config = context.config
        module = method_module(name)
        options = dict(getattr(config, "method_options", None) or {})
        shared = {"episodes": config.episodes, "max_sparsity": config.max_sparsity}
        for key, value in {**shared, "activation_bits": config.activation_bits}.items():
            if key in module.DEFAULTS:
                options.setdefault(key, value)
        extra = {"problem": context.problem} if name == "random" else {}
        module.run(
            context.workspace,
            config.budget,
            config.seed,
            options,
            context.run_dir,
            search_recorder=context.recorder,
            **extra,
        )

    method.__name__ = f"run_{name}"
    method.__doc__ = f"``ajpq search --method {name}`` (see :mod:`{METHOD_MODULES[name]}`)."
    return method


SEARCH_METHODS: dict[str, Callable[[Any], None]] = {name: _search_adapter(name) for name in METHOD_MODULES}
"""Entries for :data:`ajpq.search.METHODS`."""
