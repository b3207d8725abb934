"""Gymnasium registration of AJPQ's two environments, done by ``import ajpq``.

Only ids and ``module:Class`` strings are registered: Gymnasium imports :mod:`ajpq.envs.compress_env` when an
environment is first made, so ``import ajpq`` stays as light as it was.
"""

from __future__ import annotations

import gymnasium

LAYER_ENV_ID = "ajpq/LayerCompress-v0"
CHANNEL_ENV_ID = "ajpq/ChannelCompress-v0"
ENTRY_POINTS: dict[str, str] = {
    LAYER_ENV_ID: "ajpq.envs.compress_env:LayerCompressEnv",
    CHANNEL_ENV_ID: "ajpq.envs.compress_env:ChannelCompressEnv",
}


def register_envs() -> None:
    """Register both environments with Gymnasium, once (a second call, or a re-import, changes nothing)."""
    for env_id, entry_point in ENTRY_POINTS.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, entry_point=entry_point)
