"""The warm start's greedy allocation re-prices only the moves a move makes stale; it must choose exactly as the
plain greedy that re-costs the whole model for every candidate move (kept here as the reference)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from nets import BatchNormNet, ConcatNet, GroupedConvNet, ResidualDepthwiseNet, randomize_batchnorm
from torch import nn

from ajpq.allocation import _damage, _policy, _Step, budget_load, greedy_allocation
from ajpq.analysis import ModelAnalysis, analyze_model
from ajpq.budget import Budget, max_pruned
from ajpq.cost import CostModel
from ajpq.envs.core import policy_key
from ajpq.policy import Policy
from ajpq.sensitivity import ACT_BITS, PRUNE_FRACTIONS, QUANT_BITS, SensitivityTable, step_groups


def reference_greedy(
    analysis: ModelAnalysis,
    cost_model: CostModel,
    table: SensitivityTable,
    budget: Budget,
    *,
    max_sparsity: float,
    activation_bits: int,
    search_activation_bits: bool,
    prune_weight: float,
) -> tuple[Policy, Policy | None]:
    """The greedy as first written: every candidate move priced by evaluating the whole trial policy."""
    steps = []
    for gid in step_groups(analysis):
        group = analysis.groups[gid]
        limit = max_pruned(group.size, max_sparsity) if group.prunable else 0
        steps.append(_Step(gid, group.size, limit, max(1, math.ceil(group.size / 16)), abits=activation_bits))
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
            break
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


class WideResidualNet(nn.Module):
    """Two residual blocks on one 32-channel stream (a 4-member group read by four layers), then a depthwise
    separable block: coupled groups large enough to need several pruning chunks, on 1x4x4 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(32, 16, 1), nn.Conv2d(16, 32, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(32, 24, 1), nn.Conv2d(24, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 20, 1)
        self.fc = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = x + self.a2(torch.relu(self.a1(x)))
        x = x + self.b2(torch.relu(self.b1(x)))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.fc(x.mean(dim=(2, 3)))


NETS = {
    "residual-depthwise": (ResidualDepthwiseNet, (1, 4, 4)),
    "concat": (ConcatNet, (1, 4, 4)),
    "grouped": (GroupedConvNet, (1, 6, 6)),
    "batchnorm": (BatchNormNet, (1, 8, 8)),
    "wide-residual": (WideResidualNet, (1, 4, 4)),
}


@pytest.fixture(scope="module", params=sorted(NETS))
def net(request: pytest.FixtureRequest) -> ModelAnalysis:
    torch.manual_seed(0)
    factory, shape = NETS[request.param]
    return analyze_model(randomize_batchnorm(factory()), shape, model_name=request.param)


def table_for(analysis: ModelAnalysis, kind: str) -> SensitivityTable:
    """Damages drawn at random ("random"), from three values so that many moves tie ("ties"), or all zero."""
    groups = step_groups(analysis)
    rng = np.random.default_rng(len(groups))
    shape = (len(groups), len(PRUNE_FRACTIONS) + len(QUANT_BITS) + len(ACT_BITS))
    values = {
        "random": rng.lognormal(-3.0, 1.0, size=shape),
        "ties": rng.integers(0, 3, size=shape) * 0.01,
        "zero": np.zeros(shape),
    }[kind]
    a, b = len(PRUNE_FRACTIONS), len(PRUNE_FRACTIONS) + len(QUANT_BITS)
    return SensitivityTable(tuple(groups), values[:, :a], values[:, a:b], values[:, b:], 0.0)


SETTINGS = [
    (Budget(size=0.3), False),
    (Budget(size=0.1), False),
    (Budget(size=0.04), False),
    (Budget(size=1e-4), False),  # out of reach: the greedy runs out of moves
    (Budget(bops=0.05), True),
    (Budget(size=0.1, bops=0.02), True),
]


@pytest.mark.parametrize("kind", ["random", "ties", "zero"])
def test_greedy_allocation_chooses_as_the_reference(net: ModelAnalysis, kind: str) -> None:
    cost_model = CostModel(net)
    table = table_for(net, kind)
    moved = 0
    for budget, search_abits in SETTINGS:
        for weight, sparsity in ((1.0, 0.8), (2.0, 0.5)):
            options = (budget, sparsity, search_abits, weight)
            settings: dict[str, Any] = {
                "max_sparsity": sparsity,
                "activation_bits": 8,
                "search_activation_bits": search_abits,
                "prune_weight": weight,
            }
            fit, before_last = greedy_allocation(net, cost_model, table, budget, **settings)
            expected_fit, expected_before = reference_greedy(net, cost_model, table, budget, **settings)
            assert policy_key(fit) == policy_key(expected_fit), options
            assert (before_last is None) == (expected_before is None)
            if before_last is not None and expected_before is not None:
                assert policy_key(before_last) == policy_key(expected_before), options
                moved += 1
    assert moved > 0  # the settings do make the greedy move


def test_greedy_allocation_prunes_and_lowers_activation_bits(net: ModelAnalysis) -> None:
    """The settings above exercise every kind of move, on every net (else the comparison proves little)."""
    cost_model = CostModel(net)
    fit, _ = greedy_allocation(
        net,
        cost_model,
        table_for(net, "zero"),
        Budget(bops=0.002),
        max_sparsity=0.8,
        activation_bits=8,
        search_activation_bits=True,
    )
    bits = np.concatenate([layer.weight_bits for layer in fit.layers.values()])
    assert (bits == 0).any() and (bits[bits > 0] < 8).any()
    assert min(layer.activation_bits for layer in fit.layers.values()) < 8
