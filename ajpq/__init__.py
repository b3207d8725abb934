"""AJPQ: automated joint pruning and quantization, with pruning as 0-bit channel quantization."""

from __future__ import annotations

from ajpq._version import __version__
from ajpq.analysis import ModelAnalysis, analyze_model
from ajpq.artifact import load_compressed
from ajpq.compress import SimulatedModel, apply_policy
from ajpq.cost import CostModel, CostReport
from ajpq.errors import AJPQError
from ajpq.gym_registration import register_envs
from ajpq.policy import Policy, load_policy

register_envs()  # gymnasium.make("ajpq/LayerCompress-v0") works after `import ajpq` alone

__all__ = [
    "AJPQError",
    "CostModel",
    "CostReport",
    "ModelAnalysis",
    "Policy",
    "SimulatedModel",
    "__version__",
    "analyze_model",
    "apply_policy",
    "load_compressed",
    "load_policy",
]
