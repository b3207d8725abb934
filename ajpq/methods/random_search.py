"""random: random policies from AJPQ's own action space, as many as an AJPQ run evaluates; the RL's yardstick.

Each episode walks the same layer steps as AJPQ's environments (:class:`ajpq.envs.Episode`): a layer sparsity
uniform in ``[0, max_sparsity]`` removes the least important channels of the step, then every chunk of surviving
channels gets bits uniform in 1..8, in importance order; the policy is projected onto the budget (hard mode) and
evaluated on the validation split by the same :class:`ajpq.envs.CompressionProblem`. The best feasible one wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ajpq.budget import Budget
from ajpq.methods.common import MethodResult, Recorder, check_fraction, check_positive_int, options_with_defaults
from ajpq.runs import RunDir
from ajpq.train import evaluate_accuracy
from ajpq.workspace import Workspace

DEFAULTS: dict[str, Any] = {"episodes": 300, "max_sparsity": 0.8, "activation_bits": 8}
BATCH = 8
"""Policies drawn, then evaluated together through the problem's backend (the draws do not depend on it)."""


def _random_policy(problem: Any, rng: np.random.Generator) -> Any:
    """One episode of uniformly random actions (sparsity per layer step, then bits per chunk of channels)."""
    from ajpq.envs import Episode

    episode = Episode(problem)
    while episode.next_unit is not None:
        episode.begin_unit(rng.uniform(-1.0, 1.0, problem.layer_action_dim))
        while not episode.unit_done:
            episode.assign(int(rng.integers(1, 9)))
    return episode.policy


def run(
    workspace: Workspace,
    budget: Budget,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    run_dir: RunDir | None = None,
    search_recorder: Any = None,
    problem: Any = None,
) -> MethodResult:
    from ajpq.envs import CompressionProblem
    from ajpq.proxy import make_evaluator

    opts = options_with_defaults("random", DEFAULTS, options)
    episodes = check_positive_int("random episodes", opts["episodes"])
    max_sparsity = check_fraction("random max_sparsity", opts["max_sparsity"])
    recorder = Recorder(workspace, "random", budget, seed, opts, run_dir, search_recorder)
    simulated = workspace.simulated
    val = workspace.splits.val
    if problem is None:
        fp32 = evaluate_accuracy(workspace.model, val, workspace.device)
        problem = CompressionProblem(
            workspace.analysis,
            make_evaluator(workspace),
            fp32,
            budget=budget,
            max_sparsity=max_sparsity,
            activation_bits=int(opts["activation_bits"]),
        )
    rng = np.random.default_rng(seed)
    batch = max(BATCH, 4 * getattr(problem.backend, "workers", 1))
    while recorder.evaluations < episodes:
        policies = [_random_policy(problem, rng) for _ in range(min(batch, episodes - recorder.evaluations))]
        for result in problem.finish_many(policies):
            recorder.record(
                result.policy, result.accuracy, result.report, eval_time=result.eval_time, projected=result.projected
            )
    if recorder.best is None:
        from ajpq.errors import BudgetError

        raise BudgetError(f"random found no policy within the budget ({budget.describe()}) in {episodes} episodes")
    accuracy, policy, _ = recorder.best
    return recorder.finish(policy, simulated, val_accuracy=accuracy)
