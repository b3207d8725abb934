"""random: random policies from AJPQ's own action space, as many as an AJPQ run evaluates; the RL's yardstick.

Each episode walks the same layer steps as AJPQ's environments (:class:`ajpq.envs.Episode`): a layer sparsity
uniform in ``[0, max_sparsity]`` removes the least important channels of the step, then every chunk of surviving
channels gets bits uniform in 1..8, in importance order; the policy is projected onto the budget (hard mode) and
evaluated on the validation split by the same :class:`ajpq.envs.CompressionProblem`. The best feasible one wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ajpq.envs import Episode
from ajpq.errors import BudgetError
from ajpq.methods.base import MethodOptions, SearchContext, register_method


@dataclass(frozen=True)
class RandomOptions(MethodOptions):
    """None of its own: random searches the search's space (``episodes``, ``max_sparsity``, ``activation_bits``,
    the budget, the proxy), exactly as ajpq's episodes do, so the two compare like for like."""


BATCH = 8
"""Policies drawn, then evaluated together through the problem's backend (the draws do not depend on it)."""


def _random_policy(problem: Any, rng: np.random.Generator) -> Any:
    """One episode of uniformly random actions (sparsity per layer step, then bits per chunk of channels)."""
    episode = Episode(problem)
    while episode.next_unit is not None:
        episode.begin_unit(rng.uniform(-1.0, 1.0, problem.layer_action_dim))
        while not episode.unit_done:
            episode.assign(int(rng.integers(1, 9)))
    return episode.policy


@register_method
class RandomSearch:
    """Draws from the search's own problem (the same space, projection, proxy and cache as ajpq's episodes)."""

    name = "random"
    Options = RandomOptions
    resumable = False
    episodic = True

    def run(self, context: SearchContext, options: RandomOptions) -> None:
        problem = context.problem
        rng = np.random.default_rng(context.config.seed)
        batch = max(BATCH, 4 * getattr(problem.backend, "workers", 1))
        episodes = context.config.episodes
        while (done := context.recorder.episode) < episodes:
            context.evaluate([_random_policy(problem, rng) for _ in range(min(batch, episodes - done))])
        if context.recorder.best is None:
            raise BudgetError(
                f"random found no policy within the budget ({problem.budget.describe()}) in {episodes} episodes"
            )
