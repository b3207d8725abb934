"""An accuracy predictor fitted on the episodes a search has evaluated, so the agents can learn between evaluations.

A real evaluation (a candidate scored on validation images, perhaps after QAT steps) costs milliseconds to seconds;
the agents need thousands of episodes. As APQ (Wang et al., CVPR 2020) did for joint pruning and quantization, the
search fits a predictor of a candidate's score on the candidates it has evaluated and lets the agents learn from
predicted episodes (Dyna-style), spending real evaluations only on the proposals worth it.

Features (:func:`policy_features`), per layer step (coupled channel group) ``u``, from the sensitivity table
(:mod:`ajpq.sensitivity`) and the policy: the estimated damage of its pruning (the measured curve at its removed
fraction), of its weight bits (each channel's share of the step's weights times the curve at its bits), of its
activation bits, and the kept fraction and mean bits themselves; plus the total estimated damage and the size and
BOPs ratios. The damages are ``log1p``'d: the curves span orders of magnitude.

The model (:class:`ScorePredictor`) is an ensemble of ridge regressions, each fitted on a bootstrap resample of the
evaluated episodes with its own regularisation drawn from a grid: with tens to hundreds of points and tens of
features, linear models on good features rank better than flexible ones, and the spread of the members says where
the predictor is unsure (far from the evaluated policies), which is where a real evaluation teaches it most.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ajpq.envs.core import CompressionProblem
from ajpq.policy import Policy

STEP_FEATURES = 5
"""Per layer step: log1p pruning, weight and activation damage; kept fraction; mean weight bits / 8."""
GLOBAL_FEATURES = 3
"""log1p of the total estimated damage, log size ratio, log BOPs ratio."""


def policy_features(problem: CompressionProblem, policy: Policy) -> np.ndarray:
    """The predictor's features of a complete (projected) policy (see the module docstring)."""
    analysis, table = problem.analysis, problem.sensitivity
    report = problem.cost_model.evaluate(policy)
    rows: list[float] = []
    total = 0.0
    for unit in problem.units:
        group = unit.group
        kept = policy.group_kept(analysis, group.id)
        kept_fraction = float(kept.mean()) if kept.size else 1.0
        weights, quant, bits_sum = 0.0, 0.0, 0.0
        for member in unit.members:
            bits = policy.layers[member.name].weight_bits
            share = member.params / max(member.out_channels, 1)
            alive = bits[bits > 0]
            weights += share * alive.size
            bits_sum += share * float(alive.sum())
            if table is not None:
                quant += share * sum(table.quant_damage(group.id, int(b)) * n for b, n in _counts(alive))
        mean_bits = bits_sum / weights if weights else 0.0
        prune = act = 0.0
        if table is not None:
            quant = quant / weights if weights else 0.0
            prune = table.prune_damage(group.id, 1.0 - kept_fraction) if group.prunable else 0.0
            act = table.act_damage(group.id, int(policy.layers[unit.members[0].name].activation_bits))
        total += prune + quant + act
        rows += [np.log1p(prune), np.log1p(quant), np.log1p(act), kept_fraction, mean_bits / 8.0]
    rows += [np.log1p(total), np.log(max(report.size_ratio, 1e-9)), np.log(max(report.bops_ratio, 1e-9))]
    return np.asarray(rows, dtype=np.float64)


def _counts(values: np.ndarray) -> list[tuple[int, int]]:
    found, counts = np.unique(values, return_counts=True)
    return [(int(b), int(n)) for b, n in zip(found, counts, strict=True)]


RIDGE_GRID: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
"""Regularisation strengths (on standardized features) the ensemble's members draw from."""


@dataclass
class ScorePredictor:
    """A bootstrap ensemble of ridge regressions: ``predict`` gives the members' mean and standard deviation."""

    members: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        self._weights: np.ndarray | None = None
        self._center = np.zeros(0)
        self._scale = np.ones(0)
        self._offset = 0.0

    @property
    def fitted(self) -> bool:
        return self._weights is not None

    def fit(self, features: Sequence[np.ndarray] | np.ndarray, scores: Sequence[float] | np.ndarray) -> None:
        """Fit the members on ``(features, score)`` pairs (at least two distinct scores)."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(scores, dtype=np.float64)
        self._center = x.mean(axis=0)
        self._scale = x.std(axis=0)
        self._scale[self._scale < 1e-12] = 1.0
        self._offset = float(y.mean())
        z = (x - self._center) / self._scale
        rng = np.random.default_rng(self.seed)
        weights = []
        for member in range(self.members):
            rows = rng.integers(0, len(y), len(y)) if member else np.arange(len(y))  # member 0 sees all points
            alpha = RIDGE_GRID[member % len(RIDGE_GRID)]
            zb, yb = z[rows], y[rows] - self._offset
            gram = zb.T @ zb + alpha * len(rows) * np.eye(z.shape[1])
            weights.append(np.linalg.solve(gram, zb.T @ yb))
        self._weights = np.stack(weights)

    def predict(self, features: Sequence[np.ndarray] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation over the members of the predicted scores."""
        if self._weights is None:
            raise RuntimeError("fit the predictor before predicting")
        z = (np.asarray(features, dtype=np.float64) - self._center) / self._scale
        predictions = z @ self._weights.T + self._offset
        return predictions.mean(axis=1), predictions.std(axis=1)


def ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of ``values``, ties sharing their average rank."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    result = np.empty(len(x))
    result[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        result[tied] = result[tied].mean()
    return result


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / norm) if norm > 0 else float("nan")


__all__ = ["ScorePredictor", "policy_features", "ranks", "spearman"]
