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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ajpq.analysis import NETWORK_INPUT, LayerInfo, ModelAnalysis
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
    if budget.latency is not None and report.latency_ratio is not None:
        loads.append(report.latency_ratio / budget.latency)
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


MOVES: tuple[str, ...] = ("bits", "prune", "abits")
"""The greedy's moves on a layer step, in the order ties between them are broken."""


def _moved(step: _Step, move: str, min_abits: int) -> _Step | None:
    """The step after ``move`` (a new object), or None when the step cannot make that move."""
    trial = _Step(**step.__dict__)
    if move == "bits" and trial.bits > 1:
        trial.bits -= 1
    elif move == "prune" and trial.pruned < trial.limit:
        trial.pruned = min(trial.limit, trial.pruned + trial.chunk)
    elif move == "abits" and trial.abits > min_abits:
        trial.abits -= 1
    else:
        return None
    return trial


class _GreedyCosts:
    """Exact size and BOPs of the greedy's current policy, kept per layer, so that a move is priced by re-costing
    only the layers it changes rather than the whole model (what made the warm start take minutes on MobileNetV2).

    A layer's cost (:meth:`CostModel.layer_cost`) depends on its own step's bits, activation bits and kept channels,
    and on the kept channels of the groups its inputs read. So a bits or activation-bits move changes only its
    step's member layers, and a pruning move also the layers that read the step's channels.
    """

    def __init__(self, analysis: ModelAnalysis, cost_model: CostModel, steps: list[_Step]) -> None:
        self.analysis = analysis
        self.cost_model = cost_model
        self.step_of = {step.group: step for step in steps}
        self.kept = [self._kept_mask(self.step_of[group.id]) for group in analysis.groups]
        self.members: dict[int, list[LayerInfo]] = {group.id: [] for group in analysis.groups}
        self.readers: dict[int, list[LayerInfo]] = {group.id: [] for group in analysis.groups}
        for layer in analysis.layers:
            self.members[layer.group].append(layer)
            for gid in np.unique(analysis.in_group[layer.name]):
                if gid != NETWORK_INPUT:
                    self.readers[int(gid)].append(layer)
        self.fan_in = {layer.name: self._fan_in(layer, self.kept) for layer in analysis.layers}
        self.layer_costs = {
            layer.name: self._cost(layer, self.step_of[layer.group], self.kept) for layer in analysis.layers
        }
        self.size = cost_model.other_bits + sum(size for size, _, _ in self.layer_costs.values())
        self.bops = sum(bops for _, bops, _ in self.layer_costs.values())
        self.latency = sum(latency for _, _, latency in self.layer_costs.values())

    def touched(self, group_id: int) -> set[str]:
        """Names of the layers whose cost a move of this step may change."""
        return {layer.name for layer in (*self.members[group_id], *self.readers[group_id])}

    def _kept_mask(self, step: _Step) -> np.ndarray:
        group = self.analysis.groups[step.group]
        kept = np.ones(group.size, dtype=bool)
        if step.pruned:
            kept[group.order[group.size - step.pruned :]] = False
        return kept

    def _fan_in(self, layer: LayerInfo, kept: list[np.ndarray]) -> np.ndarray:
        return self.cost_model.fan_in(layer, self.cost_model.input_kept(layer, kept))

    def _cost(
        self, layer: LayerInfo, step: _Step, kept: list[np.ndarray], fan_in: np.ndarray | None = None
    ) -> tuple[int, int, float]:
        bits = np.where(kept[layer.group][self.analysis.out_root[layer.name]], step.bits, 0)
        cost = self.cost_model.layer_cost(
            layer, bits, step.abits, self.fan_in[layer.name] if fan_in is None else fan_in
        )
        latency = 0.0
        if self.cost_model.latency is not None:
            latency = self.cost_model.layer_latency(layer, self.cost_model.input_kept(layer, kept), bits)
        return cost.size_bits, cost.bops, latency

    def _trial(self, trial: _Step, move: str) -> dict[str, tuple[int, int, float, np.ndarray | None]]:
        """New cost (size, bops, latency) and fan-in (None if unchanged) of every layer the move changes."""
        gid = trial.group
        if move != "prune":
            return {layer.name: (*self._cost(layer, trial, self.kept), None) for layer in self.members[gid]}
        kept = list(self.kept)
        kept[gid] = self._kept_mask(trial)
        result: dict[str, tuple[int, int, float, np.ndarray | None]] = {}
        for layer in self.readers[gid]:
            fan_in = self._fan_in(layer, kept)
            step = trial if layer.group == gid else self.step_of[layer.group]
            result[layer.name] = (*self._cost(layer, step, kept, fan_in), fan_in)
        for layer in self.members[gid]:
            if layer.name not in result:
                result[layer.name] = (*self._cost(layer, trial, kept), None)
        return result

    def delta(self, trial: _Step, move: str) -> tuple[int, int, float]:
        """Change of the total size and BOPs (bits) and latency (ms) if ``trial`` replaced its step by ``move``."""
        size = bops = 0
        latency = 0.0
        for name, (new_size, new_bops, new_latency, _) in self._trial(trial, move).items():
            old_size, old_bops, old_latency = self.layer_costs[name]
            size += new_size - old_size
            bops += new_bops - old_bops
            latency += new_latency - old_latency
        return size, bops, latency

    def apply(self, trial: _Step, move: str) -> None:
        """Make the move: ``trial`` replaces its step."""
        changes = self._trial(trial, move)
        self.step_of[trial.group] = trial
        if move == "prune":
            self.kept[trial.group] = self._kept_mask(trial)
        for name, (size, bops, latency, fan_in) in changes.items():
            old_size, old_bops, old_latency = self.layer_costs[name]
            self.size += size - old_size
            self.bops += bops - old_bops
            self.latency += latency - old_latency
            self.layer_costs[name] = (size, bops, latency)
            if fan_in is not None:
                self.fan_in[name] = fan_in


def _trial_loads(
    budget: Budget,
    cost_model: CostModel,
    size: int,
    bops: int,
    dsize: np.ndarray,
    dbops: np.ndarray,
    latency: float = 0.0,
    dlatency: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`budget_load` of every candidate move's policy, bit for bit as it computes it from a cost report.

    Python divides ints with correct rounding; numpy does the same while the ints are below 2**53, where float64
    holds them exactly (every reference model up to ~8e12 MACs). Beyond that the loads are computed one by one.
    """
    reference_size, reference_bops = cost_model.reference_size_bits, cost_model.reference_bops
    if max(reference_size, reference_bops) >= 2**53:
        exact = np.array(
            [
                budget_load(budget, CostReport(size + int(ds), bops + int(db), reference_size, reference_bops))
                for ds, db in zip(dsize, dbops, strict=True)
            ]
        )
        return _with_latency(exact, budget, cost_model, latency, dlatency)
    loads = np.zeros(dsize.size)
    if budget.size is not None:
        loads = np.maximum(loads, (size + dsize) / reference_size / budget.size)
    if budget.bops is not None:
        loads = np.maximum(loads, (bops + dbops) / reference_bops / budget.bops)
    return _with_latency(loads, budget, cost_model, latency, dlatency)


def _with_latency(
    loads: np.ndarray, budget: Budget, cost_model: CostModel, latency: float, dlatency: np.ndarray | None
) -> np.ndarray:
    """``loads`` and the latency budget's load (the table's sum of layer predictions, as the cost model's)."""
    if budget.latency is None or cost_model.latency is None or dlatency is None:
        return loads
    return np.maximum(loads, (latency + dlatency) / cost_model.latency.reference_ms / budget.latency)


def _stale_after_move(
    costs: _GreedyCosts, steps: list[_Step]
) -> tuple[list[list[tuple[int, tuple[str, ...]]]], list[list[tuple[int, tuple[str, ...]]]]]:
    """For a bits or activation-bits move (first list) and a pruning move (second) of each step: the other steps
    whose moves must be re-priced, and which of their moves.

    A move of step ``j`` re-costs ``j``'s member layers (and, pruning, their readers); those costs are stale when a
    layer among them changed. A bits move of ``i`` changes only ``i``'s members; pruning ``i`` changes them and the
    fan-in of ``i``'s readers.
    """
    members = [{layer.name for layer in costs.members[step.group]} for step in steps]
    readers = [{layer.name for layer in costs.readers[step.group]} for step in steps]
    touched = [costs.touched(step.group) for step in steps]
    others = [[j for j in range(len(steps)) if j != i] for i in range(len(steps))]
    after_bits: list[list[tuple[int, tuple[str, ...]]]] = [
        [(j, ("prune",)) for j in others[i] if touched[j] & members[i]] for i in range(len(steps))
    ]
    after_prune = [
        [(j, MOVES if members[j] & readers[i] else ("prune",)) for j in others[i] if touched[j] & touched[i]]
        for i in range(len(steps))
    ]
    return after_bits, after_prune


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
    start already fits), whose projection fills the budget back up.

    Each candidate move's saving is kept and re-priced only when a move changes a layer it is priced on
    (:class:`_GreedyCosts`, :func:`_stale_after_move`), so every choice, ties included, is the one the plain greedy
    makes by re-costing the whole model for every candidate, at a fraction of the cost.
    """
    steps = []
    for gid in step_groups(analysis):
        group = analysis.groups[gid]
        limit = max_pruned(group.size, max_sparsity) if group.prunable else 0
        steps.append(_Step(gid, group.size, limit, max(1, math.ceil(group.size / PRUNE_CHUNKS)), abits=activation_bits))
    min_abits = 2 if search_activation_bits else activation_bits
    load = budget_load(budget, cost_model.evaluate(_policy(analysis, steps)))
    costs = _GreedyCosts(analysis, cost_model, steps)
    stale = _stale_after_move(costs, steps)
    # One entry per (step, move), in the order the moves are tried: a tie goes to the first (argmin's first hit).
    valid = np.zeros(len(steps) * len(MOVES), dtype=bool)
    damage = np.zeros(valid.size)
    dsize = np.zeros(valid.size, dtype=np.int64)
    dbops = np.zeros(valid.size, dtype=np.int64)
    dlatency = np.zeros(valid.size)

    def refresh(index: int, moves: tuple[str, ...] = MOVES, with_damage: bool = True) -> None:
        """Re-price ``moves`` of step ``index`` (their damage too after the step itself moved)."""
        step = steps[index]
        before = _damage(table, step, prune_weight) if with_damage else 0.0
        for k, move in enumerate(MOVES):
            if move not in moves:
                continue
            entry = index * len(MOVES) + k
            trial = _moved(step, move, min_abits)
            valid[entry] = trial is not None
            if trial is None:
                continue
            if with_damage:
                damage[entry] = _damage(table, trial, prune_weight) - before
            dsize[entry], dbops[entry], dlatency[entry] = costs.delta(trial, move)

    for index in range(len(steps)):
        refresh(index)
    last: tuple[int, _Step] | None = None
    while load > 1.0:
        saved = load - _trial_loads(budget, cost_model, costs.size, costs.bops, dsize, dbops, costs.latency, dlatency)
        candidates = np.flatnonzero(valid & (saved > 1e-12))
        if candidates.size == 0:
            break  # nothing left to lower; the projection will do what it can
        best = int(candidates[np.argmin(np.maximum(damage[candidates], 0.0) / saved[candidates])])
        index, kind = divmod(best, len(MOVES))
        move = MOVES[kind]
        trial = _moved(steps[index], move, min_abits)
        assert trial is not None  # only valid moves are candidates
        costs.apply(trial, move)
        last = (index, steps[index])
        steps[index] = trial
        load -= float(saved[best])
        refresh(index)
        for neighbour, moves in stale[move == "prune"][index]:
            refresh(neighbour, moves, with_damage=False)
    previous = None
    if last is not None:
        index, step = last
        previous = _policy(analysis, [*steps[:index], step, *steps[index + 1 :]])
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
    also: Sequence[Policy] = (),
) -> list[Policy]:
    """Distinct starting policies, each within ``budget`` (projected where needed), the most trusted first.

    Without a sensitivity table only the uniform policy (the highest width that fits, projected when none does).
    ``also`` are further starts (such as OPQ's allocation when weight sparsity is searched), placed before the
    uniform one. A soft ``budget`` is met as well: a start within it is not penalized.
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
    candidates += [project(policy) for policy in also]
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
