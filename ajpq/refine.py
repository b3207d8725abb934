"""The end of AJPQ's search: a local search around the best policy, under the same budget and evaluation count.

The RL's last episodes sample around what the agents have learnt; a short hill climb from the best policy found
uses them better (issue 8). A neighbour moves bits or channels between layers and then meets the budget again with
the hard-mode projection (:func:`ajpq.budget.project_to_budget`), so every candidate fits and follows the one
importance order:

* **shift**: one chunk of a layer's kept channels gains a bit, a chunk of another layer loses one;
* **prune**: a prunable layer step loses its next least important chunk of channels, and a chunk elsewhere gains a
  bit with what that frees;
* **restore**: a layer step gets back its most important removed chunk (at its layer's mean width);
* **activation** (when activation bits are searched): one layer's input activations gain or lose a bit;
* **sparsity** (when weight sparsity is searched): one layer step's weight sparsity rises (and a chunk of the layer
  gains a bit with what that frees) or falls by :data:`SPARSITY_STEP`, within ``[0, max_weight_sparsity]``.

Candidates are evaluated in batches (one ``evaluate`` call each, so a parallel backend fills its workers), and the
best of a batch replaces the current policy only if its reward is higher and it fits: the refinement never returns
a policy worse on validation than its start, or over budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from ajpq.budget import max_pruned, project_to_budget
from ajpq.envs.core import ACTIVATION_CHOICES, WEIGHT_SPARSITY_DECIMALS, CompressionProblem, EpisodeResult, policy_key
from ajpq.policy import Policy

REFINE_CHUNKS = 8
"""A layer's kept channels are moved in chunks of ``ceil(kept / REFINE_CHUNKS)`` adjacent channels (by importance)."""
MOVES: tuple[str, ...] = ("shift", "shift", "prune", "restore")
"""Moves drawn uniformly (shift twice as often); ``activation`` and ``sparsity`` join when those are searched."""
SPARSITY_STEP = 0.05
"""A sparsity move changes a layer step's weight sparsity by this much."""


def _chunk(problem: CompressionProblem, policy: Policy, name: str, rng: np.random.Generator) -> np.ndarray:
    """A random chunk of adjacent kept channels (in importance order) of layer ``name``."""
    order = problem.analysis.channel_order(name)
    kept = order[policy.layers[name].weight_bits[order] > 0]
    size = max(1, math.ceil(kept.size / REFINE_CHUNKS))
    start = int(rng.integers(0, max(1, kept.size - size + 1)))
    return kept[start : start + size]


def neighbour(problem: CompressionProblem, policy: Policy, rng: np.random.Generator) -> Policy:
    """One random move from ``policy`` (see the module docstring), projected onto the budget in hard mode."""
    analysis = problem.analysis
    result = policy.copy()
    names = analysis.layer_names
    moves = (
        *MOVES,
        *(("activation",) if problem.search_activation_bits else ()),
        *(("sparsity",) if problem.search_weight_sparsity else ()),
    )
    move = moves[int(rng.integers(len(moves)))]
    gain = names[int(rng.integers(len(names)))]
    sparser = False
    if move == "shift" and len(names) > 1:
        lose = names[int(rng.integers(len(names) - 1))]
        lose = names[-1] if lose == gain else lose
        bits = result.layers[lose].weight_bits
        channels = _chunk(problem, result, lose, rng)
        bits[channels] = np.maximum(bits[channels] - 1, 1)
    elif move in ("prune", "restore"):
        groups = [g for g in analysis.groups if g.prunable]
        if groups:
            group = groups[int(rng.integers(len(groups)))]
            kept = result.group_kept(analysis, group.id)
            chunk = max(1, math.ceil(group.size / 16))
            if move == "prune":
                allowed = max_pruned(group.size, problem.max_sparsity) - int((~kept).sum())
                alive = [c for c in group.order if kept[c]]
                removed = alive[len(alive) - min(chunk, max(allowed, 0)) :] if allowed > 0 else []
                result.prune_group(analysis, group.id, removed)
            else:
                back = [c for c in group.order if not kept[c]][:chunk]
                for member in group.members:
                    bits = result.layers[member].weight_bits
                    mean = round(float(bits[bits > 0].mean())) if (bits > 0).any() else 8
                    bits[np.isin(analysis.out_root[member], back)] = max(1, mean)
    elif move == "activation":
        layer = result.layers[gain]
        step = 1 if rng.random() < 0.5 else -1
        layer.activation_bits = int(np.clip(layer.activation_bits + step, min(ACTIVATION_CHOICES), 8))
    elif move == "sparsity":
        members = analysis.groups[analysis.layer(gain).group].members
        sparser = rng.random() < 0.5
        sparsity = result.layers[gain].weight_sparsity + (SPARSITY_STEP if sparser else -SPARSITY_STEP)
        sparsity = round(float(np.clip(sparsity, 0.0, problem.max_weight_sparsity)), WEIGHT_SPARSITY_DECIMALS)
        for member in members:
            result.layers[member].weight_sparsity = sparsity
    if move in ("shift", "prune") or sparser:  # what a move frees buys a bit somewhere
        bits = result.layers[gain].weight_bits
        channels = _chunk(problem, result, gain, rng)
        bits[channels] = np.minimum(bits[channels] + 1, 8)
    return project_to_budget(
        result,
        analysis,
        problem.cost_model,
        problem.budget,
        max_sparsity=problem.max_sparsity,
        min_activation_bits=problem.min_activation_bits,
    )[0]


def refine(
    problem: CompressionProblem,
    start: EpisodeResult,
    evaluate: Callable[[Sequence[Policy]], list[EpisodeResult]],
    evaluations: int,
    rng: np.random.Generator,
    *,
    batch_size: int = 4,
    seen: set[bytes] | None = None,
) -> tuple[EpisodeResult, int]:
    """Hill-climb from ``start`` with up to ``evaluations`` evaluated neighbours.

    Returns the best feasible result (``start`` if none beat it) and the evaluations used (fewer when no new
    neighbour is found). ``evaluate`` scores (and records) a batch of policies; ``seen`` holds keys of policies
    already evaluated in this search, which are not proposed again (up to 20 tries per candidate).
    """
    seen = set() if seen is None else seen
    seen.add(policy_key(start.policy))
    current = start
    used = 0
    while used < evaluations:
        batch: list[Policy] = []
        tries = 0
        while len(batch) < min(batch_size, evaluations - used) and tries < 20 * batch_size:
            tries += 1
            candidate = neighbour(problem, current.policy, rng)
            key = policy_key(candidate)
            if key not in seen:
                seen.add(key)
                batch.append(candidate)
        if not batch:
            break  # nothing new nearby: the caller spends the rest of the evaluations elsewhere
        results = evaluate(batch)
        used += len(results)
        best = max(results, key=lambda r: r.reward)
        if best.feasible and best.reward > current.reward:
            current = best
    return current, used
