"""What both environments share: the compression problem (model, budget, reward) and the episode state.

An *episode* is one pass over the model's layer steps (a layer, or a coupled group of layers decided together) in
execution order. At each layer step a sparsity is chosen (and, optionally, activation bits); the least important
``round(sparsity * channels)`` channels of the step get 0 bits; then bits 1..8 are chosen for the surviving channels
of each member layer, in importance order, one channel (or one chunk of adjacent channels) at a time. At the end the
policy is projected onto the budget (hard mode) and evaluated. :class:`Episode` holds that state;
``LayerCompress-v0`` and ``ChannelCompress-v0`` are two views of it (each asks a controller for the other level's
actions), and the search drives one episode through both agents.

With ``search_weight_sparsity`` each layer step also gets a *weight sparsity*: the fraction of its kept channels'
weights removed by magnitude (policy version 2, whose sparse storage and BOPs the cost model counts exactly). A BOPs
budget credits a removed weight with its MACs, which is how OPQ, OLMP and ADMM meet one while keeping every channel;
the option lets the layer controller spend the budget the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ajpq.analysis import ChannelGroup, LayerInfo, ModelAnalysis
from ajpq.budget import Budget, max_pruned, project_to_budget, smallest_policy
from ajpq.cost import INDEX_BITS, CostModel, CostReport, channel_extra_bits
from ajpq.errors import ConfigError
from ajpq.policy import Policy
from ajpq.sensitivity import SensitivityTable

MAX_STEPS_PER_LAYER = 16
"""Default bound on channel steps per layer: wider layers are decided in chunks of adjacent channels."""
ACTIVATION_CHOICES: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
"""Activation bits the layer agent picks from with ``search_activation_bits``."""
SHAPE_FEATURES = 16
SENSITIVITY_FEATURES = 8
"""Damage of pruning 25/50/75%, 1/2/4-bit weights, 2/4-bit activations (see :mod:`ajpq.sensitivity`)."""
LAYER_STATIC = SHAPE_FEATURES + SENSITIVITY_FEATURES
LAYER_OBS_DIM = LAYER_STATIC + 6
CHANNEL_OBS_DIM = LAYER_STATIC + 9
"""Observation sizes; ``search_weight_sparsity`` appends one feature to each (``layer_obs_dim``)."""
WEIGHT_SPARSITY_DECIMALS = 2
"""A layer action's weight sparsity is rounded to this many decimals (a finite set of masks, as OPQ's grid)."""


@dataclass(frozen=True)
class EpisodeResult:
    """Outcome of one evaluated episode."""

    reward: float
    accuracy: float
    report: CostReport
    feasible: bool
    projected: bool
    policy: Policy
    eval_time: float

    def metrics(self) -> dict[str, Any]:
        return {
            "reward": self.reward,
            "accuracy": self.accuracy,
            "size_ratio": self.report.size_ratio,
            "bops_ratio": self.report.bops_ratio,
            "compression_rate": self.report.compression_rate,
            "feasible": self.feasible,
            **({} if self.report.latency_ratio is None else {"latency_ratio": self.report.latency_ratio}),
        }


@dataclass
class Unit:
    """One layer step: a coupled channel group and the member layers whose output channels it holds."""

    index: int
    group: ChannelGroup
    members: list[LayerInfo]
    features: np.ndarray
    max_prune: int


def _squash(x: float) -> float:
    return float(x / (1.0 + abs(x)))


@dataclass
class CompressionProblem:
    """The static part of an episode: model analysis, cost model, budget, evaluator and action mapping."""

    analysis: ModelAnalysis
    evaluate: Callable[[Policy], float]
    """Validation accuracy of a complete policy (e.g. the simulated model on the validation split)."""
    fp32_accuracy: float
    budget: Budget = field(default_factory=lambda: Budget(size=0.1))
    max_sparsity: float = 0.8
    activation_bits: int = 8
    search_activation_bits: bool = False
    channel_group_size: int | None = None
    """Channels decided per channel step (None: enough to keep each layer at <= 16 steps)."""
    soft_penalty: float = 1.0
    """Soft mode: reward -= soft_penalty * sum_k max(0, ratio_k / budget_k - 1)."""
    sensitivity: SensitivityTable | None = None
    """Measured damage per layer step, given to both controllers (zeros in the observations when None)."""
    backend: Any = field(default=None, repr=False)
    """Evaluation backend of :meth:`finish_many` (an :class:`ajpq.backends.Backend`; None: ``evaluate`` in-process)."""
    search_weight_sparsity: bool = False
    """Let the layer agent pick each layer step's weight sparsity (magnitude, within kept channels) as an action."""
    max_weight_sparsity: float = 0.95
    """Largest weight sparsity the layer agent may pick, in [0, 1)."""
    pricing: CostModel | None = field(default=None, repr=False)
    """The cost model to use; one built with the model's weights (``CostModel.from_model``) is needed to price weight
    sparsity. None: one without weights (dense policies only)."""

    def __post_init__(self) -> None:
        self._cache: dict[bytes, float] = {}
        self.evaluations = 0
        """Policies actually evaluated (cache hits not counted)."""
        if not 0.0 <= self.max_sparsity < 1.0:
            raise ConfigError(f"max_sparsity must be in [0, 1), but got {self.max_sparsity}")
        if self.channel_group_size is not None and self.channel_group_size < 1:
            raise ConfigError(f"channel_group_size must be >= 1, but got {self.channel_group_size}")
        if not 0.0 <= self.max_weight_sparsity < 1.0:
            raise ConfigError(f"max_weight_sparsity must be in [0, 1), but got {self.max_weight_sparsity}")
        self.cost_model = self.pricing if self.pricing is not None else CostModel(self.analysis)
        if self.search_weight_sparsity and not self.cost_model.prices_sparsity:
            raise ConfigError(
                "search_weight_sparsity needs a cost model built with the weights: pass "
                "pricing=CostModel.from_model(analysis, model) (problem_from_workspace does)"
            )
        min_abits = min(ACTIVATION_CHOICES) if self.search_activation_bits else self.activation_bits
        self.min_activation_bits = min_abits
        cheapest = smallest_policy(self.analysis, self.max_sparsity, min_abits)
        smallest = self.cost_model.evaluate(cheapest)
        self.min_layer_size = {c.name: c.size_bits for c in smallest.layers}
        self.min_layer_bops = {c.name: c.bops for c in smallest.layers}
        self.size_budget_bits = (self.budget.size or 1.0) * self.cost_model.reference_size_bits
        self.bops_budget = (self.budget.bops or 1.0) * self.cost_model.reference_bops
        table = self.cost_model.latency
        if self.budget.latency is not None and table is None:
            raise ConfigError(
                "a latency budget needs a cost model with a latency table: pass pricing=CostModel(..., latency=table) "
                "(ajpq.latency.load_or_measure_table; ajpq.search does it)"
            )
        self.latency_features = self.budget.latency is not None
        """With a latency budget both controllers also see the latency used and left (two more features)."""
        inputs = self.cost_model.kept_inputs(cheapest)
        self.min_layer_latency = {
            layer.name: self.cost_model.layer_latency(
                layer, inputs[layer.name], cheapest.layers[layer.name].weight_bits
            )
            for layer in self.analysis.layers
        }
        self.latency_budget_ms = (self.budget.latency or 1.0) * (table.reference_ms if table is not None else 1.0)
        self.units = self._build_units()

    def _build_units(self) -> list[Unit]:
        analysis = self.analysis
        total_params = sum(layer.params for layer in analysis.layers) or 1
        total_macs = analysis.total_macs or 1
        seen: set[int] = set()
        units: list[Unit] = []
        for layer in analysis.layers:
            if layer.group in seen:
                continue
            seen.add(layer.group)
            group = analysis.groups[layer.group]
            members = [analysis.layer(name) for name in group.members]
            members.sort(key=lambda m: m.index)
            first = members[0]
            imp = np.sort(group.importance)[::-1]
            mean = float(imp.mean()) if imp.size else 0.0
            top_half = float(imp[: max(1, imp.size // 2)].sum() / imp.sum()) if imp.sum() > 0 else 0.5
            features = np.array(
                [
                    0.0,  # index, filled below
                    float(any(m.type == "conv" for m in members)),
                    float(any(m.type in ("depthwise", "grouped_conv") for m in members)),
                    float(any(m.type == "linear" for m in members)),
                    float(len(members) > 1),
                    float(group.prunable),
                    math.log2(first.in_channels + 1) / 14.0,
                    math.log2(group.size + 1) / 14.0,
                    math.log2(first.kernel_area + 1) / 6.0,
                    max(first.stride) / 4.0,
                    math.log2(first.out_hw + 1) / 16.0,
                    math.log10(sum(m.params for m in members) + 1) / 9.0,
                    math.log10(sum(m.macs for m in members) + 1) / 12.0,
                    sum(m.params for m in members) / total_params,
                    sum(m.macs for m in members) / total_macs,
                    _squash(float(imp.std() / mean) if mean > 0 else 0.0) + top_half - 0.5,
                    *(
                        self.sensitivity.features(group.id)
                        if self.sensitivity is not None
                        else np.zeros(SENSITIVITY_FEATURES)
                    ),
                ],
                dtype=np.float64,
            )
            units.append(Unit(len(units), group, members, features, max_pruned(group.size, self.max_sparsity)))
        for unit in units:
            unit.features[0] = unit.index / max(1, len(units) - 1)
        return units

    @property
    def layer_action_dim(self) -> int:
        return 1 + int(self.search_activation_bits) + int(self.search_weight_sparsity)

    @property
    def layer_obs_dim(self) -> int:
        return LAYER_OBS_DIM + int(self.search_weight_sparsity) + 2 * int(self.latency_features)

    @property
    def channel_obs_dim(self) -> int:
        return CHANNEL_OBS_DIM + int(self.search_weight_sparsity) + 2 * int(self.latency_features)

    @property
    def weight_sparsity_index(self) -> int:
        """Index of the weight sparsity in a layer action (after the activation bits when those are searched)."""
        return 1 + int(self.search_activation_bits)

    def sparsity_of(self, action: np.ndarray) -> float:
        """Layer action in [-1, 1] -> sparsity in [0, max_sparsity]."""
        a = float(np.clip(action[0], -1.0, 1.0))
        return (a + 1.0) / 2.0 * self.max_sparsity

    def activation_bits_of(self, action: np.ndarray) -> int:
        if not self.search_activation_bits:
            return self.activation_bits
        a = float(np.clip(action[1], -1.0, 1.0))
        index = min(len(ACTIVATION_CHOICES) - 1, int((a + 1.0) / 2.0 * len(ACTIVATION_CHOICES)))
        return ACTIVATION_CHOICES[index]

    def weight_sparsity_of(self, action: np.ndarray) -> float:
        """Layer action -> weight sparsity in [0, max_weight_sparsity] (0 when it is not searched)."""
        if not self.search_weight_sparsity:
            return 0.0
        a = float(np.clip(action[self.weight_sparsity_index], -1.0, 1.0))
        return round((a + 1.0) / 2.0 * self.max_weight_sparsity, WEIGHT_SPARSITY_DECIMALS)

    def weight_sparsity_action(self, sparsity: float) -> float:
        """The layer action entry that gives ``sparsity`` (clipped to what may be picked); inverse of the above."""
        if self.max_weight_sparsity <= 0:
            return -1.0
        return float(np.clip(2.0 * sparsity / self.max_weight_sparsity - 1.0, -1.0, 1.0))

    def project(self, policy: Policy) -> tuple[Policy, CostReport, bool]:
        """The policy that is evaluated (projected onto the budget in hard mode), its cost, and whether it moved."""
        final, report = project_to_budget(
            policy,
            self.analysis,
            self.cost_model,
            self.budget,
            max_sparsity=self.max_sparsity,
            min_activation_bits=self.min_activation_bits,
        )
        return final, report, final is not policy

    def score(
        self, final: Policy, report: CostReport, projected: bool, accuracy: float, eval_time: float
    ) -> EpisodeResult:
        """Reward a projected, evaluated policy."""
        feasible = self.budget.fits(report)
        reward = accuracy - self.fp32_accuracy
        if self.budget.mode == "soft":
            reward -= self.soft_penalty * self.budget.excess(report)
        return EpisodeResult(reward, accuracy, report, feasible, projected, final, eval_time)

    def remember(self, key: bytes, accuracy: float) -> None:
        """Put an already evaluated policy (its :func:`policy_key`) in the cache (a resumed search's past)."""
        self._cache[key] = accuracy

    def finish(self, policy: Policy) -> EpisodeResult:
        """Project (hard mode), evaluate and reward a complete policy."""
        return self.finish_many([policy])[0]

    def finish_many(self, policies: Sequence[Policy]) -> list[EpisodeResult]:
        """Project every policy, evaluate the distinct projected policies not seen before in one call of the
        evaluation backend (``backend``, default in-process), and reward them, in input order.

        Identical projected policies (common near the budget) are evaluated once per problem: a cached one is
        recorded with ``eval_time`` 0.
        """
        from ajpq.backends import LocalBackend

        if self.backend is None:
            self.backend = LocalBackend(self.evaluate)
        projected = [self.project(policy) for policy in policies]
        keys = [policy_key(final) for final, _, _ in projected]
        todo: dict[bytes, Policy] = {}
        for key, (final, _, _) in zip(keys, projected, strict=True):
            if key not in self._cache and key not in todo:
                todo[key] = final
        fresh: dict[bytes, float] = {}
        if todo:
            for key, evaluation in zip(todo, self.backend.evaluate_many(list(todo.values())), strict=True):
                self._cache[key] = evaluation.accuracy
                fresh[key] = evaluation.eval_time
        self.evaluations += len(todo)
        results = []
        for key, (final, report, moved) in zip(keys, projected, strict=True):
            results.append(self.score(final, report, moved, self._cache[key], fresh.pop(key, 0.0)))
        return results


def policy_key(policy: Policy) -> bytes:
    """Bytes that are equal exactly when two policies of one model compress it identically."""
    parts = []
    for name in sorted(policy.layers):
        layer = policy.layers[name]
        parts.append(
            f"{name}|{layer.activation_bits}|{layer.weight_sparsity!r}|".encode() + layer.weight_bits.tobytes()
        )
    return b"\0".join(parts)


class Episode:
    """The mutable state of one episode (the partial policy and the budget used so far), shared by both envs."""

    def __init__(self, problem: CompressionProblem) -> None:
        self.problem = problem
        self.reset()

    def reset(self) -> None:
        p = self.problem
        self.policy = Policy.uniform(p.analysis, 8, p.activation_bits)
        self.unit_index = -1
        self.size_used = float(p.cost_model.other_bits)
        self.bops_used = 0.0
        self.min_rest_size = float(sum(p.min_layer_size.values()))
        self.min_rest_bops = float(sum(p.min_layer_bops.values()))
        self.latency_used = 0.0
        self.min_rest_latency = float(sum(p.min_layer_latency.values()))
        self.prev_sparsity = 0.0
        self.prev_abits = 1.0
        self.weight_sparsity = 0.0
        """Weight sparsity of the current layer step (of the previous one in :meth:`layer_obs`)."""
        self.chunks: list[tuple[LayerInfo, np.ndarray, np.ndarray]] = []
        self.chunk_index = 0
        self.sparsity = 0.0
        self.unit_bits_sum = 0.0
        self.unit_bits_count = 0
        self.unit_surviving = 1
        self.result: EpisodeResult | None = None

    # ---- progress ----------------------------------------------------------------------------------------
    @property
    def next_unit(self) -> Unit | None:
        index = self.unit_index + 1
        return self.problem.units[index] if index < len(self.problem.units) else None

    @property
    def unit_done(self) -> bool:
        return self.chunk_index >= len(self.chunks)

    @property
    def all_decided(self) -> bool:
        return self.unit_index == len(self.problem.units) - 1 and self.unit_done

    # ---- observations ------------------------------------------------------------------------------------
    def _budget_features(self) -> list[float]:
        p = self.problem
        left_size = p.size_budget_bits - self.size_used - self.min_rest_size
        left_bops = p.bops_budget - self.bops_used - self.min_rest_bops
        features = [
            _squash(self.size_used / p.size_budget_bits),
            _squash(left_size / p.size_budget_bits),
            _squash(self.bops_used / p.bops_budget),
            _squash(left_bops / p.bops_budget),
        ]
        if p.latency_features:
            left_latency = p.latency_budget_ms - self.latency_used - self.min_rest_latency
            features += [_squash(self.latency_used / p.latency_budget_ms), _squash(left_latency / p.latency_budget_ms)]
        return features

    def layer_obs(self) -> np.ndarray:
        """Observation before deciding the next layer step (the last one's when the episode is over)."""
        unit = self.next_unit or self.problem.units[-1]
        extra = [self.prev_sparsity, self.prev_abits, *self._weight_sparsity_feature()]
        obs = np.concatenate([unit.features, self._budget_features(), extra]).astype(np.float32)
        return np.clip(obs, -1.0, 1.0)

    def _weight_sparsity_feature(self) -> list[float]:
        p = self.problem
        return [self.weight_sparsity / max(p.max_weight_sparsity, 1e-9)] if p.search_weight_sparsity else []

    def channel_obs(self) -> np.ndarray:
        """Observation before assigning bits to the next chunk of channels."""
        unit = self.problem.units[max(self.unit_index, 0)]
        sparsity = self.sparsity / max(self.problem.max_sparsity, 1e-9)
        if self.unit_done or not self.chunks:
            extra = [1.0, 0.0, sparsity, 1.0, 0.0]
        else:
            layer, channels, ranks = self.chunks[self.chunk_index]
            importance = self.problem.analysis.layer_importance[layer.name]
            mean = float(importance.mean()) or 1.0
            mean_bits = self.unit_bits_sum / self.unit_bits_count / 8.0 if self.unit_bits_count else 0.0
            extra = [
                float(ranks.mean()),
                _squash(float(importance[channels].mean()) / mean),
                sparsity,
                self.unit_bits_count / max(1, self.unit_surviving),
                mean_bits,
            ]
        obs = np.concatenate([unit.features, extra, self._budget_features(), self._weight_sparsity_feature()])
        return np.clip(obs.astype(np.float32), -1.0, 1.0)

    # ---- transitions -------------------------------------------------------------------------------------
    def begin_unit(self, action: np.ndarray) -> None:
        """Apply a layer action to the next layer step: prune its least important channels, queue the rest."""
        unit = self.next_unit
        if unit is None:
            raise RuntimeError("the episode has no layer step left; call reset()")
        p = self.problem
        self.unit_index += 1
        sparsity = p.sparsity_of(action) if unit.group.prunable else 0.0
        abits = p.activation_bits_of(action)
        self.weight_sparsity = p.weight_sparsity_of(action)
        group = unit.group
        n_prune = min(unit.max_prune, round(sparsity * group.size)) if group.prunable else 0
        surviving = group.order[: group.size - n_prune]
        self.sparsity = n_prune / group.size
        self.prev_sparsity = self.sparsity
        self.prev_abits = abits / 8.0
        group_kept = p.cost_model.group_kept(self.policy)
        keep_mask = np.zeros(group.size, dtype=bool)
        keep_mask[surviving] = True
        group_kept[group.id] = keep_mask
        self.chunks = []
        self._fan: dict[str, np.ndarray] = {}
        for layer in unit.members:
            layer_policy = self.policy.layers[layer.name]
            rank = p.analysis.channel_rank(layer.name)
            kept = rank < surviving.size
            layer_policy.weight_bits[~kept] = 0
            layer_policy.activation_bits = abits
            layer_policy.weight_sparsity = self.weight_sparsity
            order = p.analysis.channel_order(layer.name)
            alive = order[kept[order]]
            input_kept = p.cost_model.input_kept(layer, group_kept)
            self._fan[layer.name] = p.cost_model.fan_in(layer, input_kept)
            if p.latency_features:  # a layer's latency is set by its kept inputs and outputs, known from here on
                self.latency_used += p.cost_model.layer_latency(layer, input_kept, layer_policy.weight_bits)
                self.min_rest_latency -= p.min_layer_latency[layer.name]
            size = p.channel_group_size or max(1, math.ceil(alive.size / MAX_STEPS_PER_LAYER))
            for start in range(0, alive.size, size):
                channels = alive[start : start + size]
                self.chunks.append((layer, channels, rank[channels] / group.size))
            self.min_rest_size -= p.min_layer_size[layer.name]
            self.min_rest_bops -= p.min_layer_bops[layer.name]
        self.chunk_index = 0
        self.unit_bits_sum = 0.0
        self.unit_bits_count = 0
        self.unit_surviving = sum(len(c[1]) for c in self.chunks)

    def assign(self, bits: int) -> None:
        """Give the next chunk of channels ``bits`` (1..8) bits."""
        layer, channels, _ = self.chunks[self.chunk_index]
        bits = int(min(8, max(1, bits)))
        self.policy.layers[layer.name].weight_bits[channels] = bits
        fan = float(self._fan[layer.name][channels].sum())
        stored = fan * (1.0 - self.weight_sparsity)  # the magnitude mask's count, up to rounding
        index = min(INDEX_BITS * stored, fan) if self.weight_sparsity > 0 else 0.0  # relative index or bitmap
        self.size_used += stored * bits + index + channel_extra_bits(layer) * channels.size
        self.bops_used += stored * bits * layer.out_hw * self.policy.layers[layer.name].activation_bits
        self.unit_bits_sum += bits * channels.size
        self.unit_bits_count += channels.size
        self.chunk_index += 1

    def finish(self) -> EpisodeResult:
        self.result = self.problem.finish(self.policy)
        return self.result

    def demonstrate(
        self, target: Policy, channel_discrete: bool
    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]:
        """Walk a new episode towards ``target``: the actions that reproduce its pruning, activation bits, weight
        sparsity (when searched; clipped to ``max_weight_sparsity``) and (per chunk, rounded mean) weight bits, with
        the observations they are taken in.

        Returns the layer and the channel (observation, action) pairs; the episode is then complete and can be
        finished. This is how known good policies (the warm start) become demonstrations for the agents.
        """
        p = self.problem
        self.reset()
        layer_steps: list[tuple[np.ndarray, np.ndarray]] = []
        channel_steps: list[tuple[np.ndarray, np.ndarray]] = []
        while (unit := self.next_unit) is not None:
            group = unit.group
            member = group.members[0]
            pruned = int((target.layers[member].weight_bits == 0).sum()) if group.prunable else 0
            sparsity = pruned / group.size
            action = [2.0 * sparsity / p.max_sparsity - 1.0 if p.max_sparsity > 0 else -1.0]
            if p.search_activation_bits:
                index = ACTIVATION_CHOICES.index(
                    min(ACTIVATION_CHOICES, key=lambda b: abs(b - target.layers[member].activation_bits))
                )
                action.append(-1.0 + (index + 0.5) / len(ACTIVATION_CHOICES) * 2.0)
            if p.search_weight_sparsity:
                action.append(p.weight_sparsity_action(target.layers[member].weight_sparsity))
            layer_action = np.clip(np.array(action, dtype=np.float32), -1.0, 1.0)
            layer_steps.append((self.layer_obs(), layer_action))
            self.begin_unit(layer_action.astype(np.float64))
            while not self.unit_done:
                layer, channels, _ = self.chunks[self.chunk_index]
                wanted = target.layers[layer.name].weight_bits[channels]
                bits = int(np.clip(round(float(wanted[wanted > 0].mean())) if (wanted > 0).any() else 1, 1, 8))
                channel_action = (
                    np.array([bits - 1]) if channel_discrete else np.array([-1.0 + (bits - 0.5) / 4.0], np.float32)
                )
                channel_steps.append((self.channel_obs(), channel_action))
                self.assign(bits)
        return layer_steps, channel_steps


def bits_of(action: Any, discrete: bool) -> int:
    """Channel action -> bits: ``Discrete(8)`` index 0..7 -> 1..8, or ``Box(-1, 1)`` split into 8 equal bins."""
    if discrete:
        return int(np.asarray(action).reshape(-1)[0]) + 1
    a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
    return 1 + min(7, int((a + 1.0) / 2.0 * 8))
