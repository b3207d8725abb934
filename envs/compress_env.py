"""``ajpq/LayerCompress-v0`` and ``ajpq/ChannelCompress-v0``: the two levels of one compression episode.

Both wrap an :class:`~ajpq.envs.core.Episode`. The layer env takes one step per layer step and asks a *channel
controller* (a callable ``obs -> action``) for the bits of that step's surviving channels; the channel env takes one
step per channel (chunk) and asks a *layer controller* for each layer step's sparsity. Left unset, the controllers
are fixed rules (8 bits for every channel; no pruning), so each env is a complete problem on its own, and the
budget projection keeps every policy within budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ajpq.envs.core import CHANNEL_OBS_DIM, LAYER_OBS_DIM, CompressionProblem, Episode, EpisodeResult, bits_of

Controller = Callable[[np.ndarray], Any]
_DEFAULT_PROBLEM: CompressionProblem | None = None


def default_problem(**kwargs: Any) -> CompressionProblem:
    """The embedded default: digits_cnn on digits (pretrained once and cached), size budget 0.1, validation reward."""
    global _DEFAULT_PROBLEM
    if kwargs:
        return problem_from_workspace(None, **kwargs)
    if _DEFAULT_PROBLEM is None:
        _DEFAULT_PROBLEM = problem_from_workspace(None)
    return _DEFAULT_PROBLEM


def problem_from_workspace(workspace: Any = None, **kwargs: Any) -> CompressionProblem:
    """A :class:`CompressionProblem` whose reward evaluates the simulated model on the validation split."""
    from ajpq.proxy import make_evaluator
    from ajpq.train import evaluate_accuracy
    from ajpq.workspace import WorkspaceSpec, open_workspace

    if workspace is None:
        workspace = open_workspace(WorkspaceSpec(device="cpu"), progress=False)
    fp32 = evaluate_accuracy(workspace.model, workspace.splits.val, workspace.device)
    return CompressionProblem(workspace.analysis, make_evaluator(workspace), fp32, **kwargs)


def _info(result: EpisodeResult | None) -> dict[str, Any]:
    return {} if result is None else {k: v for k, v in result.metrics().items()}


class LayerCompressEnv(gym.Env):
    """One step per layer step; action ``Box(-1, 1)``: sparsity ``(a+1)/2 * max_sparsity`` (and activation bits)."""

    metadata = {"render_modes": []}  # noqa: RUF012

    def __init__(
        self,
        problem: CompressionProblem | None = None,
        channel_controller: Controller | None = None,
        channel_discrete: bool = True,
    ) -> None:
        super().__init__()
        self.problem = problem if problem is not None else default_problem()
        self.episode = Episode(self.problem)
        self.channel_controller = channel_controller
        self.channel_discrete = channel_discrete
        self.observation_space = spaces.Box(-1.0, 1.0, (LAYER_OBS_DIM,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (self.problem.layer_action_dim,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.episode.reset()
        return self.episode.layer_obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        episode = self.episode
        episode.begin_unit(np.asarray(action, dtype=np.float64).reshape(-1))
        while not episode.unit_done:
            if self.channel_controller is None:
                bits = 8
            else:
                bits = bits_of(self.channel_controller(episode.channel_obs()), self.channel_discrete)
            episode.assign(bits)
        if episode.all_decided:
            result = episode.finish()
            return episode.layer_obs(), float(result.reward), True, False, _info(result)
        return episode.layer_obs(), 0.0, False, False, {}


class ChannelCompressEnv(gym.Env):
    """One step per surviving channel (or chunk); action: bits 1..8 as ``Discrete(8)`` or ``Box(-1, 1)``."""

    metadata = {"render_modes": []}  # noqa: RUF012

    def __init__(
        self,
        problem: CompressionProblem | None = None,
        layer_controller: Controller | None = None,
        discrete: bool = True,
    ) -> None:
        super().__init__()
        self.problem = problem if problem is not None else default_problem()
        self.episode = Episode(self.problem)
        self.layer_controller = layer_controller
        self.discrete = discrete
        self.observation_space = spaces.Box(-1.0, 1.0, (CHANNEL_OBS_DIM,), np.float32)
        self.action_space = spaces.Discrete(8) if discrete else spaces.Box(-1.0, 1.0, (1,), np.float32)

    def _begin_next_unit(self) -> None:
        episode = self.episode
        if self.layer_controller is None:
            action = -np.ones(self.problem.layer_action_dim)
            if self.problem.search_activation_bits:
                action[1] = 1.0
        else:
            action = np.asarray(self.layer_controller(episode.layer_obs()), dtype=np.float64).reshape(-1)
        episode.begin_unit(action)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.episode.reset()
        self._begin_next_unit()
        return self.episode.channel_obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        episode = self.episode
        episode.assign(bits_of(action, self.discrete))
        if episode.all_decided:
            result = episode.finish()
            return episode.channel_obs(), float(result.reward), True, False, _info(result)
        if episode.unit_done:
            self._begin_next_unit()
        return episode.channel_obs(), 0.0, False, False, {}
