"""Size, BOPs and latency budgets: parsing, the feasibility check, the soft penalty and the hard-mode projection.

A budget is a ratio of the FP32 reference (``size_budget=0.05`` means at most 5% of the FP32 size in bits, as the
:class:`~ajpq.cost.CostModel` counts it). Every search method (AJPQ's RL, random, uniform, OPQ, OLMP, ADMM) uses the
same three pieces:

* :class:`Budget` checks the ratios once, with messages that say what to pass instead;
* :func:`check_feasible` refuses, before any search, a budget that even the smallest policy the search can produce
  cannot meet (:func:`smallest_policy`), and says what the smallest achievable ratio is;
* :func:`project_to_budget` (hard mode) turns any policy into one that meets the budget by lowering the bits of the
  least important channels first, then pruning the least important channels, following the one importance order of
  :meth:`ajpq.analysis.ModelAnalysis.channel_order` (coupled groups are pruned in all member layers together and the
  classifier's outputs are never pruned), as HAQ and AMC limit their actions; in soft mode it leaves the policy as
  it is, and :meth:`Budget.excess` is the reward's penalty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Literal

import numpy as np

from ajpq.analysis import ModelAnalysis
from ajpq.cost import CostModel, CostReport
from ajpq.errors import BudgetError, ConfigError
from ajpq.policy import Policy

BudgetMode = Literal["hard", "soft"]
BUDGET_MODES: tuple[str, ...] = ("hard", "soft")


def check_ratio(name: str, value: object) -> float | None:
    """A budget ratio in (0, 1] (or None for "no budget"); raise :class:`BudgetError` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BudgetError(f"{name} must be a number in (0, 1] (a ratio of the FP32 model), but got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise BudgetError(
            f"{name} must be in (0, 1], but got {value:g}; it is a ratio of the FP32 model (e.g. 0.05 for 20x smaller)"
        )
    return value


def parse_ratio(name: str, value: object) -> float | None:
    """A ratio written as a number (0.0625) or a fraction string ("1/16"), checked by :func:`check_ratio`.

    The one reader of budget ratios: search flags, YAML configs and ``compare`` all accept both forms.
    """
    if isinstance(value, str):
        try:
            value = float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"{name}: expected a ratio like 0.0625 or 1/16, but got {value!r}") from None
    return check_ratio(name, value)


@dataclass(frozen=True)
class Budget:
    """A size and/or BOPs budget as ratios of FP32; ``None`` leaves that cost free."""

    size: float | None = None
    """Largest allowed ``size_bits / reference_size_bits``."""
    bops: float | None = None
    """Largest allowed ``bops / reference_bops``."""
    mode: str = "hard"
    """``hard``: policies are projected onto the budget; ``soft``: a penalty is subtracted from the reward."""
    latency: float | None = None
    """Largest allowed predicted latency over FP32's measured latency (the cost model needs a latency table)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", parse_ratio("size_budget", self.size))
        object.__setattr__(self, "bops", parse_ratio("bops_budget", self.bops))
        object.__setattr__(self, "latency", parse_ratio("latency_budget", self.latency))
        if self.mode not in BUDGET_MODES:
            raise BudgetError(f"budget mode must be one of {', '.join(BUDGET_MODES)}, but got {self.mode!r}")

    def fits(self, report: CostReport) -> bool:
        """Whether a cost report meets every given budget."""
        return self.fits_ratios(report.size_ratio, report.bops_ratio, self._latency_ratio(report))

    def fits_ratios(self, size_ratio: float, bops_ratio: float, latency_ratio: float | None = None) -> bool:
        """Whether a size, a BOPs and a latency ratio of FP32 meet every given budget (for estimates without a
        report)."""
        return (
            (self.size is None or size_ratio <= self.size)
            and (self.bops is None or bops_ratio <= self.bops)
            and (self.latency is None or (latency_ratio is not None and latency_ratio <= self.latency))
        )

    def _latency_ratio(self, report: CostReport) -> float | None:
        if self.latency is not None and report.latency_ratio is None:
            raise BudgetError(
                "a latency budget needs a cost model with a latency table (ajpq.latency.load_or_measure_table); "
                "this report has no latency"
            )
        return report.latency_ratio

    def excess(self, report: CostReport) -> float:
        """Relative violation ``sum_k max(0, ratio_k / budget_k - 1)`` (0 when the policy fits); the soft penalty."""
        total = 0.0
        if self.size is not None:
            total += max(0.0, report.size_ratio / self.size - 1.0)
        if self.bops is not None:
            total += max(0.0, report.bops_ratio / self.bops - 1.0)
        latency = self._latency_ratio(report)
        if self.latency is not None and latency is not None:
            total += max(0.0, latency / self.latency - 1.0)
        return total

    def hard(self) -> Budget:
        """The same limits in hard mode (for a caller that needs policies that fit, whatever the search's mode)."""
        return replace(self, mode="hard")

    def describe(self) -> str:
        parts = []
        if self.size is not None:
            parts.append(f"size <= {self.size:g} of FP32")
        if self.bops is not None:
            parts.append(f"BOPs <= {self.bops:g} of FP32")
        if self.latency is not None:
            parts.append(f"latency <= {self.latency:g} of FP32")
        return " and ".join(parts) if parts else "no budget"


def describe_ratios(report: CostReport) -> str:
    """ "size ratio S, BOPs ratio B[, latency ratio L]" of a cost report, for messages."""
    text = f"size ratio {report.size_ratio:.4g}, BOPs ratio {report.bops_ratio:.4g}"
    return text if report.latency_ratio is None else f"{text}, latency ratio {report.latency_ratio:.4g}"


def max_pruned(size: int, max_sparsity: float) -> int:
    """Channels a group of ``size`` may lose at ``max_sparsity`` (always keeping one)."""
    return min(size - 1, round(max_sparsity * size))


def smallest_policy(analysis: ModelAnalysis, max_sparsity: float, activation_bits: int | dict[str, int]) -> Policy:
    """The cheapest policy a search can produce: 1 bit everywhere, the least important ``max_sparsity`` of each
    prunable group removed, activation bits as given (one value, or one per layer)."""
    policy = Policy.uniform(analysis, weight_bits=1)
    for layer in analysis.layers:
        abits = activation_bits[layer.name] if isinstance(activation_bits, dict) else activation_bits
        policy.layers[layer.name].activation_bits = int(abits)
    for group in analysis.groups:
        if not group.prunable:
            continue
        policy.prune_group(analysis, group.id, group.order[group.size - max_pruned(group.size, max_sparsity) :])
    return policy


def check_feasible(
    analysis: ModelAnalysis,
    cost_model: CostModel,
    budget: Budget,
    *,
    max_sparsity: float,
    activation_bits: int | dict[str, int],
) -> CostReport:
    """Refuse a budget that the smallest policy cannot meet; return that policy's cost report otherwise."""
    report = cost_model.evaluate(smallest_policy(analysis, max_sparsity, activation_bits))
    problems = []
    if budget.size is not None and report.size_ratio > budget.size:
        problems.append(f"size_budget {budget.size:g} (the smallest achievable size ratio is {report.size_ratio:.4g})")
    if budget.bops is not None and report.bops_ratio > budget.bops:
        problems.append(f"bops_budget {budget.bops:g} (the smallest achievable BOPs ratio is {report.bops_ratio:.4g})")
    if budget.latency is not None and report.latency_ratio is not None and report.latency_ratio > budget.latency:
        problems.append(
            f"latency_budget {budget.latency:g} (the smallest achievable latency ratio is {report.latency_ratio:.4g}: "
            "what pruning cannot remove, the framework's per-call work and the unprunable layers, stays)"
        )
    if problems:
        abits = activation_bits if isinstance(activation_bits, int) else min(activation_bits.values())
        raise BudgetError(
            f"the budget cannot be met by model '{analysis.model_name}': {' and '.join(problems)}; the smallest policy "
            f"(1-bit weights, {max_sparsity:.0%} of each prunable layer's channels removed, {abits}-bit activations) "
            "is still too large. Raise the budget, raise --max-sparsity, or lower the activation bits "
            "(--activation-bits / --search-activation-bits)"
        )
    return report


def _channel_table(analysis: ModelAnalysis) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every (layer, channel) ordered least important first: rank percentile in its group's order, ties by layer."""
    names: list[str] = []
    layer_ids: list[np.ndarray] = []
    channels: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    for index, layer in enumerate(analysis.layers):
        order = analysis.channel_order(layer.name)
        names.append(layer.name)
        layer_ids.append(np.full(order.size, index))
        channels.append(order)
        keys.append(np.arange(order.size) / order.size)
    key = np.concatenate(keys)
    ids = np.concatenate(layer_ids)
    sort = np.lexsort((ids, -key))
    return names, ids[sort], np.concatenate(channels)[sort]


def project_to_budget(
    policy: Policy,
    analysis: ModelAnalysis,
    cost_model: CostModel,
    budget: Budget,
    *,
    max_sparsity: float = 0.8,
    min_activation_bits: int | None = None,
) -> tuple[Policy, CostReport]:
    """The hard-mode projection: a copy of ``policy`` that meets ``budget``, and its cost report.

    In soft mode a policy is not projected (its excess is penalized in the reward instead): ``policy`` itself is
    returned with its report. A caller that needs a fitting policy whatever the mode projects onto
    ``budget.hard()``.

    1. If the policy would not fit even with every weight at 1 bit, channels must go anyway, and they go first: the
       least important group channels of the prunable groups are removed (in all member layers together, never
       beyond ``max_sparsity`` of a group, never the classifier's outputs) with the policy's bits kept; the smallest
       number of removals that fits is found by bisection. (Lowering every bit to 1 before removing any channel
       made 41-53% of the RL episodes at LeNet-5's joint budget 1-bit networks whatever the controllers chose;
       README, "Projection: channels before bits".)
    2. Otherwise (or if removing every allowed channel is not enough) bits are lowered one at a time in sweeps over
       all channels, least important first (by rank in their group's importance order), down to 1 bit, stopping at
       the first decrement after which the policy fits. Pruning is unchanged here, so size and BOPs are linear in
       the bits and the stopping point is found exactly. (A layer with weight sparsity keeps its mask, and a
       decrement saves at least a bit per stored weight, which is what is counted: the stop can come a few
       decrements late, never early.)
    3. If all weights are at 1 bit and it still does not fit, channels are removed as in 1.
    4. If it still does not fit, activation bits are lowered to ``min_activation_bits`` (when given), largest BOPs
       first.

    A policy that already fits is returned unchanged. If nothing fits, the smallest policy reached is returned
    (:func:`check_feasible` is there to refuse such budgets before a search).
    """
    report = cost_model.evaluate(policy)
    if budget.mode != "hard" or budget.fits(report):
        return policy, report
    one_bit = policy.copy()
    for layer_policy in one_bit.layers.values():
        np.minimum(layer_policy.weight_bits, 1, out=layer_policy.weight_bits)
    if not budget.fits(cost_model.evaluate(one_bit)):
        pruned = _remove_fewest(policy, analysis, cost_model, budget, max_sparsity)
        if pruned is not None:
            return pruned
    result = policy.copy()
    names, ids, channels = _channel_table(analysis)
    bits = np.array([result.layers[names[i]].weight_bits[c] for i, c in zip(ids, channels, strict=True)])
    inputs = cost_model.kept_inputs(result)
    fan = np.concatenate(
        [
            cost_model.stored_weights(
                layer,
                result.layers[layer.name].weight_bits,
                inputs[layer.name],
                result.layers[layer.name].weight_sparsity,
            )
            for layer in analysis.layers
        ]
    )
    starts = np.cumsum([0] + [layer.out_channels for layer in analysis.layers])
    fan = fan[starts[ids] + channels]
    hw_act = np.array(
        [analysis.layers[i].out_hw * result.layers[names[i]].activation_bits for i in range(len(names))], dtype=float
    )[ids]
    size_need = -math.inf if budget.size is None else report.size_bits - budget.size * report.reference_size_bits
    bops_need = -math.inf if budget.bops is None else report.bops - budget.bops * report.reference_bops
    for _ in range(8):
        lower = np.flatnonzero(bits > 1)
        if lower.size == 0:
            break
        size_saved = np.cumsum(fan[lower].astype(float))
        bops_saved = np.cumsum(fan[lower] * hw_act[lower])
        ok = np.flatnonzero((size_saved >= size_need) & (bops_saved >= bops_need))
        if ok.size:
            bits[lower[: ok[0] + 1]] -= 1
            break
        bits[lower] -= 1
        size_need -= size_saved[-1]
        bops_need -= bops_saved[-1]
    for i, name in enumerate(names):
        mask = ids == i
        result.layers[name].weight_bits[channels[mask]] = bits[mask]
    report = cost_model.evaluate(result)
    if budget.fits(report):
        return result, report

    result, report = _remove_fewest(result, analysis, cost_model, budget, max_sparsity, or_all=True) or (result, report)
    if budget.fits(report):
        return result, report

    if min_activation_bits is not None:
        for cost in sorted(report.layers, key=lambda c: -c.bops):
            if result.layers[cost.name].activation_bits > min_activation_bits:
                result.layers[cost.name].activation_bits = min_activation_bits
                report = cost_model.evaluate(result)
                if budget.fits(report):
                    break
    return result, report


def _remove_fewest(
    policy: Policy,
    analysis: ModelAnalysis,
    cost_model: CostModel,
    budget: Budget,
    max_sparsity: float,
    *,
    or_all: bool = False,
) -> tuple[Policy, CostReport] | None:
    """``policy`` with the fewest of its least important removable group channels removed that make it fit (found by
    bisection), its bits kept, and its cost report; when removing all of them does not fit either: all of them
    removed if ``or_all``, else None."""
    candidates = _prune_candidates(analysis, policy, max_sparsity)
    if not candidates:
        return None
    tried: dict[int, tuple[Policy, CostReport]] = {}  # each removal count built and costed once

    def pruned(k: int) -> tuple[Policy, CostReport]:
        if k not in tried:
            trial = policy.copy()
            by_group: dict[int, list[int]] = {}  # one pass per group, not per channel (MobileNetV2 has thousands)
            for gid, channel in candidates[:k]:
                by_group.setdefault(gid, []).append(channel)
            for gid, channels in by_group.items():
                trial.prune_group(analysis, gid, channels)
            tried[k] = trial, cost_model.evaluate(trial)
        return tried[k]

    low, high = 0, len(candidates)
    if not budget.fits(pruned(high)[1]):
        return pruned(high) if or_all else None
    while high - low > 1:
        mid = (low + high) // 2
        if budget.fits(pruned(mid)[1]):
            high = mid
        else:
            low = mid
    return pruned(high)


def _prune_candidates(analysis: ModelAnalysis, policy: Policy, max_sparsity: float) -> list[tuple[int, int]]:
    """Group channels that may still be removed, least important first (rank percentile in the group)."""
    rows: list[tuple[float, int, int]] = []
    for group in analysis.groups:
        if not group.prunable:
            continue
        kept = policy.group_kept(analysis, group.id)
        allowed = max_pruned(group.size, max_sparsity) - int((~kept).sum())
        if allowed <= 0:
            continue
        alive = [(rank, int(channel)) for rank, channel in enumerate(group.order) if kept[channel]]
        for rank, channel in alive[len(alive) - allowed :]:
            rows.append((-rank / group.size, group.id, channel))
    rows.sort()
    return [(gid, channel) for _, gid, channel in rows]
