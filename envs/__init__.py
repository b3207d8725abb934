"""Gymnasium environments of AJPQ's hierarchical search (installed as ``ajpq.envs``).

``gymnasium.make("ajpq/LayerCompress-v0")`` and ``gymnasium.make("ajpq/ChannelCompress-v0")`` work with no
arguments on the embedded default (digits_cnn on digits, pretrained once and cached); pass ``problem=`` (a
:class:`CompressionProblem`, e.g. from :func:`problem_from_workspace`) for any other model, data or budget. Both
are registered by ``import ajpq`` (:mod:`ajpq.gym_registration`), so importing this package is not needed for that.
"""

from __future__ import annotations

from ajpq.envs.compress_env import ChannelCompressEnv, LayerCompressEnv, default_problem, problem_from_workspace
from ajpq.envs.core import CompressionProblem, Episode, EpisodeResult, bits_of
from ajpq.gym_registration import CHANNEL_ENV_ID, LAYER_ENV_ID  # registered by `import ajpq`, which ran first

__all__ = [
    "CHANNEL_ENV_ID",
    "LAYER_ENV_ID",
    "ChannelCompressEnv",
    "CompressionProblem",
    "Episode",
    "EpisodeResult",
    "LayerCompressEnv",
    "bits_of",
    "default_problem",
    "problem_from_workspace",
]
