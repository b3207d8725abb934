"""AJPQ: automated joint pruning and quantization, with pruning as 0-bit channel quantization.

The Python API (:mod:`ajpq.api`): ``ajpq.search(model, train, val, ...)``, ``ajpq.finetune(model, policy, train,
val)``, ``ajpq.export(model, policy, path)``, ``ajpq.load_compressed(path)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ajpq._version import __version__
from ajpq.analysis import ModelAnalysis, analyze_model
from ajpq.artifact import load_compressed
from ajpq.compress import SimulatedModel, apply_policy
from ajpq.cost import CostModel, CostReport
from ajpq.errors import AJPQError
from ajpq.gym_registration import register_envs
from ajpq.policy import Policy, load_policy

register_envs()  # gymnasium.make("ajpq/LayerCompress-v0") works after `import ajpq` alone

if TYPE_CHECKING:
    from ajpq.api import Compression, export, finetune, search
    from ajpq.runner import SearchResult

_API = {"Compression": "ajpq.api", "export": "ajpq.api", "finetune": "ajpq.api", "search": "ajpq.api"}
_API["SearchResult"] = "ajpq.runner"


def __getattr__(name: str) -> Any:
    """The API functions, imported on first use: ``import ajpq`` stays light (the search imports the agents, SB3
    and the environments)."""
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ajpq' has no attribute {name!r}")


__all__ = [
    "AJPQError",
    "Compression",
    "CostModel",
    "CostReport",
    "ModelAnalysis",
    "Policy",
    "SearchResult",
    "SimulatedModel",
    "__version__",
    "analyze_model",
    "apply_policy",
    "export",
    "finetune",
    "load_compressed",
    "load_policy",
    "search",
]
