"""uniform: the same bits for every kept channel, the highest that fits the budget; no search.

Optionally (``sparsity``) the least important fraction of every prunable coupled group is removed first, the
channel pruning AJPQ's layer controller does, with the same importance order. ``sparsity: auto`` (the default) uses
no pruning when some width fits, and otherwise the smallest uniform fraction (in steps of ``sparsity_step``, up to
``max_sparsity``) at which 1 bit fits; then the highest bits that fit at that fraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ajpq.config import check_bits, check_fraction
from ajpq.errors import BudgetError
from ajpq.methods.base import MethodOptions, SearchContext, register_method
from ajpq.methods.common import prune_groups
from ajpq.policy import Policy
from ajpq.workspace import Workspace


@dataclass(frozen=True)
class UniformOptions(MethodOptions):
    sparsity: Any = "auto"
    """Fraction of every prunable group's channels removed, or "auto" (none if some width fits, else the smallest
    step at which 1 bit fits)."""
    max_sparsity: float = 0.9
    """Largest fraction "auto" tries."""
    sparsity_step: float = 0.05
    """Step of the fractions "auto" tries."""
    activation_bits: int = 8
    """Activation bits of every layer."""

    def __post_init__(self) -> None:
        check_fraction("uniform max_sparsity", self.max_sparsity)
        check_fraction("uniform sparsity_step", self.sparsity_step)
        if self.sparsity != "auto":
            check_fraction("uniform sparsity", self.sparsity)
        check_bits("uniform activation_bits", self.activation_bits)


def uniform_policy(workspace: Workspace, bits: int, sparsity: float, activation_bits: int) -> Policy:
    policy = Policy.uniform(workspace.analysis, bits, activation_bits)
    return prune_groups(workspace, policy, sparsity)


@register_method
class Uniform:
    name = "uniform"
    Options = UniformOptions
    resumable = False
    episodic = False

    def run(self, context: SearchContext, options: UniformOptions) -> None:
        workspace, budget = context.workspace, context.problem.budget
        step, abits = options.sparsity_step, options.activation_bits
        simulated = workspace.simulated
        cost = simulated.cost_model.evaluate
        if options.sparsity == "auto":
            grid = [0.0, *np.arange(step, options.max_sparsity + 1e-9, step).tolist()] if step > 0 else [0.0]
            fractions = [f for f in grid if budget.fits(cost(uniform_policy(workspace, 1, f, abits)))]
            if not fractions:
                smallest = cost(uniform_policy(workspace, 1, grid[-1], abits))
                raise BudgetError(
                    f"uniform cannot meet the budget ({budget.describe()}): 1-bit weights with {grid[-1]:.0%} of "
                    f"every prunable layer's channels removed still have size ratio {smallest.size_ratio:.4g} and "
                    f"BOPs ratio {smallest.bops_ratio:.4g}; raise the budget or uniform's max_sparsity"
                )
            sparsity = fractions[0]
        else:
            sparsity = float(options.sparsity)
        for bits in range(8, 0, -1):
            policy = uniform_policy(workspace, bits, sparsity, abits)
            report = cost(policy)
            if budget.fits(report):
                break
        else:
            raise BudgetError(
                f"uniform cannot meet the budget ({budget.describe()}) at sparsity {sparsity:g}: 1-bit weights have "
                f"size ratio {report.size_ratio:.4g}; use sparsity: auto or a larger sparsity"
            )
        accuracy = workspace.val_score(simulated.apply(policy))
        context.record(policy, accuracy, simulated, weight_bits=bits, channel_sparsity=sparsity)
        context.finish(policy, simulated, val_accuracy=accuracy, weight_bits=bits, channel_sparsity=sparsity)
