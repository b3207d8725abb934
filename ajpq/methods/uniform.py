"""uniform: the same bits for every kept channel, the highest that fits the budget; no search.

Optionally (``sparsity``) the least important fraction of every prunable coupled group is removed first, the
channel pruning AJPQ's layer controller does, with the same importance order. ``sparsity: auto`` (the default) uses
no pruning when some width fits, and otherwise the smallest uniform fraction (in steps of ``sparsity_step``, up to
``max_sparsity``) at which 1 bit fits; then the highest bits that fit at that fraction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ajpq.budget import Budget
from ajpq.errors import BudgetError
from ajpq.methods.common import (
    MethodResult,
    Recorder,
    check_bits,
    check_fraction,
    options_with_defaults,
    prune_groups,
    simulate,
)
from ajpq.policy import Policy
from ajpq.runs import RunDir
from ajpq.train import evaluate_accuracy
from ajpq.workspace import Workspace

DEFAULTS: dict[str, Any] = {
    "sparsity": "auto",
    "max_sparsity": 0.9,
    "sparsity_step": 0.05,
    "activation_bits": 8,
}


def uniform_policy(workspace: Workspace, bits: int, sparsity: float, activation_bits: int) -> Policy:
    policy = Policy.uniform(workspace.analysis, bits, activation_bits)
    return prune_groups(workspace, policy, sparsity)


def run(
    workspace: Workspace,
    budget: Budget,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    run_dir: RunDir | None = None,
    search_recorder: Any = None,
) -> MethodResult:
    opts = options_with_defaults("uniform", DEFAULTS, options)
    max_sparsity = check_fraction("uniform max_sparsity", opts["max_sparsity"])
    step = check_fraction("uniform sparsity_step", opts["sparsity_step"])
    abits = int(opts["activation_bits"])
    recorder = Recorder(workspace, "uniform", budget, seed, opts, run_dir, search_recorder)
    simulated = simulate(workspace)
    cost = simulated.cost_model.evaluate
    if opts["sparsity"] == "auto":
        grid = [0.0, *np.arange(step, max_sparsity + 1e-9, step).tolist()] if step > 0 else [0.0]
        fractions = [f for f in grid if budget.fits(cost(uniform_policy(workspace, 1, f, abits)))]
        if not fractions:
            smallest = cost(uniform_policy(workspace, 1, grid[-1], abits))
            raise BudgetError(
                f"uniform cannot meet the budget ({budget.describe()}): 1-bit weights with {grid[-1]:.0%} of every "
                f"prunable layer's channels removed still have size ratio {smallest.size_ratio:.4g} and BOPs ratio "
                f"{smallest.bops_ratio:.4g}; raise the budget or uniform's max_sparsity"
            )
        sparsity = fractions[0]
    else:
        sparsity = check_fraction("uniform sparsity", opts["sparsity"])
    for bits in range(8, 0, -1):
        policy = uniform_policy(workspace, check_bits("bits", bits), sparsity, abits)
        report = cost(policy)
        if budget.fits(report):
            break
    else:
        raise BudgetError(
            f"uniform cannot meet the budget ({budget.describe()}) at sparsity {sparsity:g}: 1-bit weights have size "
            f"ratio {report.size_ratio:.4g}; use sparsity: auto or a larger sparsity"
        )
    accuracy = evaluate_accuracy(simulated.apply(policy), workspace.splits.val, workspace.device)
    recorder.record(policy, accuracy, report, weight_bits=bits, channel_sparsity=sparsity)
    return recorder.finish(policy, simulated, val_accuracy=accuracy, weight_bits=bits, channel_sparsity=sparsity)
