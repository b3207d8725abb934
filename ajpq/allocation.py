"""Strong starting policies for AJPQ's search: an analytic allocation from the sensitivity curves, and uniform.

The RL search should improve on the best policy known before it starts, not rediscover it (issue 8). This module
turns a :class:`~ajpq.sensitivity.SensitivityTable` into policies within the budget, by the greedy form of a
Lagrangian allocation (the rule MCT and AIMET allocate bits by): start from 8-bit weights, nothing pruned, and
repeatedly take the one move (one layer step loses a bit, loses one more chunk of its least important channels, or,
when activation bits are searched, loses an activation bit) with the least estimated damage per unit of cost saved,
until the budget is met. A layer step's damage is the sum of its measured pruning, weight and activation damages.
Variants weigh pruning damage up and down, fill the budget back up after the last move with the hard-mode
projection, and tilt bits towards the important channels within a layer step (the channel level), so the search
starts from a spread of good policies. Every policy follows the one importance order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ajpq.analysis import ModelAnalysis
from ajpq.budget import Budget, max_pruned, project_to_budget
from ajpq.cost import CostModel, CostReport
from ajpq.envs.core import policy_key
from ajpq.policy import Policy
from ajpq.sensitivity import SensitivityTable, step_groups

PRUNE_WEIGHTS: tuple[float, ...] = (1.0, 0.5, 2.0)
"""Multipliers of the pruning damage, one allocation each: the curves are estimates, so hedge between them."""
PRUNE_CHUNKS = 16
"""A layer step's channels are pruned in steps of ``ceil(size / PRUNE_CHUNKS)`` (the search's chunk size)."""


@dataclass
class _Step:
    group: int
    size: int
    limit: int
    """Channels that may be removed (0 when the step may not be pruned)."""
    chunk: int
    pruned: int = 0
    bits: int = 8
    abits: int = 8


def budget_load(budget: Budget, report: CostReport) -> float:
    """The largest ``ratio / budget`` over the given budgets (<= 1 fits)."""
    loads = [0.0]
    if budget.size is not None:
        loads.append(report.size_ratio / budget.size)
    if budget.bops is not None:
        loads.append(report.bops_ratio / budget.bops)
    return max(loads)


def _policy(analysis: ModelAnalysis, steps: list[_Step]) -> Policy:
    policy = Policy.uniform(analysis, 8, 8)
    for step in steps:
        group = analysis.groups[step.group]
        removed = group.order[group.size - step.pruned :] if step.pruned else np.empty(0, dtype=np.int64)
        for member in group.members:
            layer = policy.layers[member]
            layer.weight_bits[:] = step.bits
            layer.weight_bits[np.isin(analysis.out_root[member], removed)] = 0
            layer.activation_bits = step.abits
    return policy


def _damage(table: SensitivityTable, step: _Step, prune_weight: float) -> float:
    return (
        prune_weight * table.prune_damage(step.group, step.pruned / step.size)
        + table.quant_damage(step.group, step.bits)
        + table.act_damage(step.group, step.abits)
    )


def greedy_allocation(
    analysis: ModelAnalysis,
    cost_model: CostModel,
    table: SensitivityTable,
    budget: Budget,
    *,
    max_sparsity: float,
    activation_bits: int,
    search_activation_bits: bool = False,
    prune_weight: float = 1.0,
) -> tuple[Policy, Policy | None]:
    """The greedy allocation that meets ``budget``, and the one before its last move (over budget; None if the
    start already fits), whose projection fills the budget back up."""
    steps = []
    for gid in step_groups(analysis):
        group = analysis.groups[gid]
        limit = max_pruned(group.size, max_sparsity) if group.prunable else 0
        steps.append(_Step(gid, group.size, limit, max(1, math.ceil(group.size / PRUNE_CHUNKS)), abits=activation_bits))
    min_abits = 2 if search_activation_bits else activation_bits
    load = budget_load(budget, cost_model.evaluate(_policy(analysis, steps)))
    previous: Policy | None = None
    while load > 1.0:
        best: tuple[float, int, str, float] | None = None
        for index, step in enumerate(steps):
            before = _damage(table, step, prune_weight)
            for move in ("bits", "prune", "abits"):
                trial = _Step(**step.__dict__)
                if move == "bits" and trial.bits > 1:
                    trial.bits -= 1
                elif move == "prune" and trial.pruned < trial.limit:
                    trial.pruned = min(trial.limit, trial.pruned + trial.chunk)
                elif move == "abits" and trial.abits > min_abits:
                    trial.abits -= 1
                else:
                    continue
                trial_steps = [*steps[:index], trial, *steps[index + 1 :]]
                saved = load - budget_load(budget, cost_model.evaluate(_policy(analysis, trial_steps)))
                if saved <= 1e-12:
                    continue
                ratio = max(_damage(table, trial, prune_weight) - before, 0.0) / saved
                if best is None or ratio < best[0]:
                    best = (ratio, index, move, saved)
        if best is None:
            break  # nothing left to lower; the projection will do what it can
        previous = _policy(analysis, steps)
        _, index, move, saved = best
        step = steps[index]
        if move == "bits":
            step.bits -= 1
        elif move == "prune":
            step.pruned = min(step.limit, step.pruned + step.chunk)
        else:
            step.abits -= 1
        load -= saved
    return _policy(analysis, steps), previous


def tilted(analysis: ModelAnalysis, policy: Policy) -> Policy:
    """The channel level: within each layer, the more important half of the kept channels one bit more (up to 8),
    the less important half one bit less (down to 1)."""
    result = policy.copy()
    for layer in analysis.layers:
        bits = result.layers[layer.name].weight_bits
        order = analysis.channel_order(layer.name)
        kept = order[bits[order] > 0]
        half = kept.size // 2
        bits[kept[:half]] = np.minimum(bits[kept[:half]] + 1, 8)
        bits[kept[kept.size - half :]] = np.maximum(bits[kept[kept.size - half :]] - 1, 1)
    return result


def warm_start_policies(
    analysis: ModelAnalysis,
    cost_model: CostModel,
    table: SensitivityTable | None,
    budget: Budget,
    *,
    max_sparsity: float,
    activation_bits: int,
    search_activation_bits: bool = False,
) -> list[Policy]:
    """Distinct starting policies, each within ``budget`` (projected where needed), the most trusted first.

    Without a sensitivity table only the uniform policy (the highest width that fits, projected when none does).
    A soft ``budget`` is met as well: a start within it is not penalized.
    """

    def project(policy: Policy) -> Policy:
        return project_to_budget(
            policy,
            analysis,
            cost_model,
            budget.hard(),
            max_sparsity=max_sparsity,
            min_activation_bits=2 if search_activation_bits else activation_bits,
        )[0]

    candidates: list[Policy] = []
    if table is not None:
        for weight in PRUNE_WEIGHTS:
            fit, before_last = greedy_allocation(
                analysis,
                cost_model,
                table,
                budget,
                max_sparsity=max_sparsity,
                activation_bits=activation_bits,
                search_activation_bits=search_activation_bits,
                prune_weight=weight,
            )
            filled = project(before_last) if before_last is not None else fit
            candidates += [filled, project(fit)]
            if weight == PRUNE_WEIGHTS[0]:
                candidates.append(project(tilted(analysis, filled)))
    uniform = next(
        (
            p
            for bits in range(8, 0, -1)
            if budget_load(budget, cost_model.evaluate(p := Policy.uniform(analysis, bits, activation_bits))) <= 1.0
        ),
        None,
    )
    candidates.append(uniform if uniform is not None else project(Policy.uniform(analysis, 1, activation_bits)))
    unique: list[Policy] = []
    seen: set[bytes] = set()
    for policy in candidates:
        key = policy_key(policy)
        if key not in seen:
            seen.add(key)
            unique.append(policy)
    return unique
