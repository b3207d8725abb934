"""What makes the search strong: sensitivity curves, the warm start, demonstrations and the local refinement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ajpq.agents import make_controller
from ajpq.allocation import budget_load, greedy_allocation, warm_start_policies
from ajpq.analysis import analyze_model
from ajpq.budget import Budget, project_to_budget
from ajpq.compress import SimulatedModel
from ajpq.cost import CostModel
from ajpq.data import TensorSplit
from ajpq.envs import ChannelCompressEnv, CompressionProblem, Episode, LayerCompressEnv
from ajpq.policy import Policy, validate_policy
from ajpq.refine import neighbour, policy_key, refine
from ajpq.sensitivity import SensitivityTable, load_or_measure, measure_sensitivity, step_groups


class SmallNet(nn.Module):
    """conv (BN) -> conv -> flatten -> fc -> fc: four layer steps on 1x6x6 inputs, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 3 * 3, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def small() -> dict:
    torch.manual_seed(0)
    model = SmallNet().eval()
    bn = model.bn1
    bn.running_mean.copy_(torch.randn(8) * 0.1)
    bn.running_var.copy_(torch.rand(8) + 0.5)
    analysis = analyze_model(model, (1, 6, 6), model_name="small")
    x = torch.randn(64, 1, 6, 6)
    y = torch.randint(0, 3, (64,))
    val = TensorSplit(x, y)
    simulated = SimulatedModel(model, analysis, x[:32])
    return {"model": model, "analysis": analysis, "val": val, "simulated": simulated, "x": x}


def test_sensitivity_equals_a_direct_computation(small: dict) -> None:
    model, analysis, simulated, x = small["model"], small["analysis"], small["simulated"], small["x"]
    table = measure_sensitivity(model, simulated, analysis, small["val"], images=64)
    assert list(table.groups) == step_groups(analysis)
    with torch.no_grad():
        reference = F.log_softmax(model(x).double(), dim=1)

        @torch.no_grad()
        def kl(policy: Policy) -> float:
            log_q = F.log_softmax(simulated.apply(policy)(x).double(), dim=1)
            return float((reference.exp() * (reference - log_q)).sum(dim=1).mean())

        base = kl(Policy.uniform(analysis, 8, 8))
        conv2 = analysis.layer("conv2").group
        pruned = Policy.uniform(analysis, 8, 8)
        order = analysis.groups[conv2].order  # most important first: 50% of 8 channels = the last 4
        pruned.layers["conv2"].weight_bits[order[4:]] = 0
        two_bit = Policy.uniform(analysis, 8, 8)
        two_bit.layers["conv2"].weight_bits[:] = 2
        act2 = Policy.uniform(analysis, 8, 8)
        act2.layers["fc1"].activation_bits = 2
    u = table.groups.index(conv2)
    assert table.prune[u, 1] == pytest.approx(kl(pruned) - base, abs=1e-9)
    assert table.quant[u, 1] == pytest.approx(kl(two_bit) - base, abs=1e-9)
    fc1 = table.groups.index(analysis.layer("fc1").group)
    assert table.act[fc1, 0] == pytest.approx(kl(act2) - base, abs=1e-9)
    classifier = table.groups.index(analysis.layer("fc2").group)
    assert table.prune[classifier].tolist() == [0.0, 0.0, 0.0]  # the classifier's outputs are never pruned
    assert table.prune[u, 1] > 0 and table.quant[u, 0] > table.quant[u, 2]  # 1 bit hurts more than 4


def test_sensitivity_cache_round_trip_and_interpolation(small: dict, tmp_path) -> None:
    args = (small["model"], small["simulated"], small["analysis"], small["val"], 8, tmp_path)
    table, cached = load_or_measure(*args, images=64)
    again, cached_again = load_or_measure(*args, images=64)
    assert (cached, cached_again) == (False, True)
    np.testing.assert_array_equal(table.prune, again.prune)
    np.testing.assert_array_equal(table.act, again.act)
    assert SensitivityTable.from_dict({"format": "something else"}) is None
    gid = table.groups[1]
    u = 1
    assert table.prune_damage(gid, 0.0) == 0.0
    assert table.prune_damage(gid, 0.375) == pytest.approx((max(table.prune[u, 0], 0) + max(table.prune[u, 1], 0)) / 2)
    assert table.quant_damage(gid, 8) == 0.0
    assert table.quant_damage(gid, 6) == pytest.approx(max(table.quant[u, 2], 0) / 16)
    assert np.all((table.features(gid) >= 0) & (table.features(gid) < 1))


@pytest.mark.parametrize("size", [0.3, 0.1, 0.05])
def test_warm_start_policies_are_valid_and_within_budget(small: dict, size: float) -> None:
    analysis = small["analysis"]
    table = measure_sensitivity(small["model"], small["simulated"], analysis, small["val"], images=64)
    cost_model = CostModel(analysis)
    budget = Budget(size=size)
    policies = warm_start_policies(analysis, cost_model, table, budget, max_sparsity=0.75, activation_bits=8)
    assert len(policies) >= 2
    assert len({policy_key(p) for p in policies}) == len(policies)
    for policy in policies:
        validate_policy(policy, analysis)
        assert budget.fits(cost_model.evaluate(policy))
    fit, before_last = greedy_allocation(analysis, cost_model, table, budget, max_sparsity=0.75, activation_bits=8)
    assert budget_load(budget, cost_model.evaluate(fit)) <= 1.0
    if budget_load(budget, cost_model.evaluate(Policy.uniform(analysis, 8, 8))) <= 1.0:
        assert before_last is None  # 8 bits already fit: nothing to lower
    else:
        assert before_last is not None and budget_load(budget, cost_model.evaluate(before_last)) > 1.0


def test_a_demonstration_reproduces_its_policy(small: dict) -> None:
    analysis = small["analysis"]
    problem = CompressionProblem(analysis, lambda p: 0.5, 0.6, budget=Budget(size=0.3), max_sparsity=0.75)
    target = Policy.uniform(analysis, 3, 8)
    conv1 = analysis.groups[analysis.layer("conv1").group]
    target.layers["conv1"].weight_bits[conv1.order[-2:]] = 0  # 2 of 8 channels of conv1 pruned
    target.layers["fc1"].weight_bits[:] = 5
    episode = Episode(problem)
    layer_steps, channel_steps = episode.demonstrate(target, channel_discrete=True)
    assert len(layer_steps) == len(problem.units)
    assert layer_steps[0][1][0] == pytest.approx(2 * (2 / 8) / 0.75 - 1)
    for name, layer in target.layers.items():
        np.testing.assert_array_equal(episode.policy.layers[name].weight_bits, layer.weight_bits)
    assert {int(a[0]) for _, a in channel_steps} == {2, 4}  # Discrete index = bits - 1


@pytest.mark.parametrize("kind", ["ppo", "ddpg"])
def test_imitation_makes_the_agents_act_like_the_demonstration(small: dict, kind: str) -> None:
    analysis = small["analysis"]
    problem = CompressionProblem(analysis, lambda p: 0.5, 0.6, budget=Budget(size=0.3), max_sparsity=0.75)
    discrete = kind == "ppo"
    layer_env = LayerCompressEnv(problem, channel_discrete=discrete)
    channel_env = ChannelCompressEnv(problem, discrete=discrete)
    rng = np.random.default_rng(0)
    layer_agent = make_controller(kind, "layer", layer_env, 0, rng)
    channel_agent = make_controller(kind, "channel", channel_env, 1, rng)
    target = Policy.uniform(analysis, 2, 8)
    target.layers["conv2"].weight_bits[:] = 6
    layer_steps, channel_steps = layer_env.episode.demonstrate(target, discrete)
    layer_agent.imitate(layer_steps)
    channel_agent.imitate(channel_steps)
    with torch.no_grad():
        for obs, action in channel_steps:
            obs_t = torch.as_tensor(obs).reshape(1, -1)
            if discrete:
                predicted = channel_agent.model.policy._predict(obs_t, deterministic=True).item()
                assert predicted == int(action[0])
            else:
                assert channel_agent.model.actor(obs_t).item() == pytest.approx(float(action[0]), abs=0.1)


def _refine_from_two_bits(problem: CompressionProblem, evaluations: int) -> tuple:
    """Refine from 2 bits everywhere (seed 0): the start, the best result, the evaluations used, and every
    evaluated result."""
    start = problem.finish(Policy.uniform(problem.analysis, 2, 8))
    evaluated: list = []

    def evaluate(policies: list) -> list:
        results = [problem.finish(p) for p in policies]
        evaluated.extend(results)
        return results

    best, used = refine(problem, start, evaluate, evaluations, np.random.default_rng(0))
    return start, best, used, evaluated


def test_refinement_never_returns_worse_or_over_budget(small: dict) -> None:
    analysis = small["analysis"]
    weights = {layer.name: float(i + 1) for i, layer in enumerate(analysis.layers)}

    def score(policy: Policy) -> float:  # deterministic stand-in: bits in later layers are worth more
        return sum(weights[n] * float(layer.weight_bits.mean()) for n, layer in policy.layers.items()) / 100

    budget = Budget(size=0.1)
    problem = CompressionProblem(analysis, score, 1.0, budget=budget, max_sparsity=0.75)
    start, best, used, evaluated = _refine_from_two_bits(problem, 24)
    assert used == len(evaluated) <= 24
    assert all(budget.fits(r.report) for r in evaluated)
    assert best.reward >= start.reward and budget.fits(best.report)
    assert best.reward == max([start.reward, *(r.reward for r in evaluated)])
    assert best.reward > start.reward  # moving bits to the valuable layers must pay off here
    for _ in range(20):
        validate_policy(neighbour(problem, best.policy, np.random.default_rng(_)), analysis)


def _sparse_problem(small: dict, score, budget: Budget) -> CompressionProblem:
    return CompressionProblem(
        small["analysis"],
        score,
        1.0,
        budget=budget,
        max_sparsity=0.75,
        search_weight_sparsity=True,
        max_weight_sparsity=0.8,
        pricing=CostModel.from_model(small["analysis"], small["model"]),
    )


def test_a_demonstration_reproduces_weight_sparsity_clipped_to_the_largest_allowed(small: dict) -> None:
    problem = _sparse_problem(small, lambda p: 0.5, Budget(size=0.3))
    target = Policy.uniform(small["analysis"], 3, 8)
    target.layers["conv2"].weight_sparsity = 0.35
    target.layers["fc1"].weight_sparsity = 0.9  # more than max_weight_sparsity 0.8 allows
    episode = Episode(problem)
    layer_steps, _ = episode.demonstrate(target, channel_discrete=True)
    assert layer_steps[1][1][-1] == pytest.approx(2 * 0.35 / 0.8 - 1)
    sparsity = {name: layer.weight_sparsity for name, layer in episode.policy.layers.items()}
    assert sparsity == {"conv1": 0.0, "conv2": 0.35, "fc1": 0.8, "fc2": 0.0}


def test_projection_of_a_weight_sparse_policy_lowers_bits_only_and_fits(small: dict) -> None:
    analysis = small["analysis"]
    cost = CostModel.from_model(analysis, small["model"])
    policy = Policy.uniform(analysis, 8, 8)
    for name, sparsity in (("conv2", 0.5), ("fc1", 0.7)):
        policy.layers[name].weight_sparsity = sparsity
    before = cost.evaluate(policy)
    budget = Budget(size=before.size_ratio * 0.6)
    projected, report = project_to_budget(policy, analysis, cost, budget, max_sparsity=0.75)
    assert budget.fits(report) and report == cost.evaluate(projected)
    for name, layer in projected.layers.items():
        assert layer.weight_sparsity == policy.layers[name].weight_sparsity  # the masks stay
        assert (layer.weight_bits > 0).all()  # lowering bits was enough: nothing pruned
    stored = {c.name: c.weights for c in report.layers}
    assert stored == {c.name: c.weights for c in before.layers}  # the same weights stored, at fewer bits


def test_refinement_moves_weight_sparsity_within_range_and_budget(small: dict) -> None:
    def score(policy: Policy) -> float:  # stand-in: bits are worth more than dense weights
        return sum(float(layer.weight_bits.mean()) + layer.weight_sparsity for layer in policy.layers.values()) / 40

    budget = Budget(size=0.1)
    problem = _sparse_problem(small, score, budget)
    start, best, _, evaluated = _refine_from_two_bits(problem, 40)
    assert all(budget.fits(r.report) for r in evaluated)
    values = {layer.weight_sparsity for r in evaluated for layer in r.policy.layers.values()}
    assert max(values) > 0 and all(0.0 <= v <= 0.8 and round(v, 2) == v for v in values)
    assert best.reward > start.reward and any(layer.weight_sparsity > 0 for layer in best.policy.layers.values())


def test_warm_start_takes_further_starts_projected_onto_the_budget(small: dict) -> None:
    analysis = small["analysis"]
    cost = CostModel.from_model(analysis, small["model"])
    budget = Budget(bops=0.02)
    sparse = Policy.uniform(analysis, 6, 8)
    for layer in sparse.layers.values():
        layer.weight_sparsity = 0.6
    policies = warm_start_policies(analysis, cost, None, budget, max_sparsity=0.75, activation_bits=8, also=[sparse])
    assert len(policies) == 2  # the further start, then uniform
    assert all(budget.fits(cost.evaluate(p)) for p in policies)
    assert {layer.weight_sparsity for layer in policies[0].layers.values()} == {0.6}
