"""Gymnasium environments of AJPQ's hierarchical search (installed as ``ajpq.envs``).

``gymnasium.make("ajpq/LayerCompress-v0")`` and ``gymnasium.make("ajpq/ChannelCompress-v0")`` work with no
arguments on the embedded default (digits_cnn on digits, pretrained once and cached); pass ``problem=`` (a
:class:`CompressionProblem`, e.g. from :func:`problem_from_workspace`) for any other model, data or budget.
"""

from __future__ import annotations

import gymnasium

from ajpq.envs.compress_env import ChannelCompressEnv, LayerCompressEnv, default_problem, problem_from_workspace
from ajpq.envs.core import CompressionProblem, Episode, EpisodeResult, bits_of

LAYER_ENV_ID = "ajpq/LayerCompress-v0"
CHANNEL_ENV_ID = "ajpq/ChannelCompress-v0"

for _id, _entry in (
    (LAYER_ENV_ID, "ajpq.envs.compress_env:LayerCompressEnv"),
    (CHANNEL_ENV_ID, "ajpq.envs.compress_env:ChannelCompressEnv"),
):
    if _id not in gymnasium.registry:
        gymnasium.register(id=_id, entry_point=_entry)

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
