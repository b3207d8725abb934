"""The Gymnasium environments, the budget projection and the feasibility check."""

from __future__ import annotations

import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from torch import nn

from ajpq.allocation import warm_start_policies
from ajpq.analysis import analyze_model
from ajpq.budget import Budget, check_feasible, project_to_budget, smallest_policy
from ajpq.cost import CostModel
from ajpq.envs import CHANNEL_ENV_ID, LAYER_ENV_ID, CompressionProblem, LayerCompressEnv
from ajpq.errors import BudgetError
from ajpq.policy import Policy, validate_policy


class ResDepthNet(nn.Module):
    """A stem, a residual block (coupled channels) and a depthwise conv: the hard cases of channel coupling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.block(x))
        x = torch.relu(self.pointwise(torch.relu(self.depthwise(x))))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def res_problem() -> CompressionProblem:
    torch.manual_seed(0)
    analysis = analyze_model(ResDepthNet(), (1, 8, 8), model_name="resdepth")

    def evaluate(policy: Policy) -> float:  # a cheap deterministic stand-in for accuracy: more bits, better
        bits = np.concatenate([layer.weight_bits for layer in policy.layers.values()])
        return float(bits.mean() / 8.0)

    return CompressionProblem(analysis, evaluate, 1.0, budget=Budget(size=0.2))


def _check_both(env: gymnasium.Env) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(env)
        sb3_check_env(env)


@pytest.mark.parametrize("env_id", [LAYER_ENV_ID, CHANNEL_ENV_ID])
def test_registered_envs_pass_both_checkers_on_digits(env_id: str) -> None:
    env = gymnasium.make(env_id)
    _check_both(env.unwrapped)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)


@pytest.mark.parametrize("discrete", [True, False])
def test_envs_pass_both_checkers_on_residual_depthwise_net(res_problem: CompressionProblem, discrete: bool) -> None:
    assert any(len(g.members) > 1 for g in res_problem.analysis.groups), "the residual block must couple channels"
    _check_both(gymnasium.make(LAYER_ENV_ID, problem=res_problem, channel_discrete=discrete).unwrapped)
    _check_both(gymnasium.make(CHANNEL_ENV_ID, problem=res_problem, discrete=discrete).unwrapped)


@pytest.mark.parametrize("search_act", [False, True])
def test_full_episode_gives_valid_policy_within_budget(res_problem: CompressionProblem, search_act: bool) -> None:
    problem = CompressionProblem(
        res_problem.analysis, res_problem.evaluate, 1.0, budget=Budget(size=0.15), search_activation_bits=search_act
    )
    env = LayerCompressEnv(problem, channel_controller=lambda obs: 7)
    env.action_space.seed(1)
    env.reset(seed=1)
    steps, done, info = 0, False, {}
    while not done:
        _, reward, done, _, info = env.step(env.action_space.sample())
        steps += 1
    assert steps == len(problem.units) and info["feasible"] and info["size_ratio"] <= 0.15
    assert reward == pytest.approx(info["accuracy"] - 1.0)
    validate_policy(env.episode.result.policy, problem.analysis)


def test_projection_lowers_least_important_bits_first_and_keeps_groups(res_problem: CompressionProblem) -> None:
    analysis = res_problem.analysis
    cost = CostModel(analysis)
    policy = Policy.uniform(analysis, 8)
    loose = cost.evaluate(policy).size_ratio * 0.9
    projected, report = project_to_budget(policy, analysis, cost, Budget(size=loose))
    assert report.size_ratio <= loose and (projected.layers["fc"].weight_bits > 0).all()
    for layer in analysis.layers:  # bits never increase along the importance order
        bits = projected.layers[layer.name].weight_bits[analysis.channel_order(layer.name)]
        assert (np.diff(bits) <= 0).all()
    smallest = cost.evaluate(smallest_policy(analysis, 0.8, 8)).size_ratio
    tight, report = project_to_budget(policy, analysis, cost, Budget(size=smallest * 1.01))
    assert report.size_ratio <= smallest * 1.01
    validate_policy(tight, analysis)  # coupled groups pruned together, classifier kept


def test_projection_removes_channels_first_when_one_bit_would_not_fit(res_problem: CompressionProblem) -> None:
    """A policy over a budget that even 1-bit weights would not meet loses channels, not its bits: lowering every
    bit to 1 first made about half of the RL episodes at LeNet-5's joint budget 1-bit networks."""
    analysis = res_problem.analysis
    cost = CostModel(analysis)
    policy = Policy.uniform(analysis, 4)
    one_bit = cost.evaluate(Policy.uniform(analysis, 1)).size_ratio
    budget = Budget(size=one_bit * 0.9)
    projected, report = project_to_budget(policy, analysis, cost, budget)
    assert report.size_ratio <= budget.size
    validate_policy(projected, analysis)
    removed = 0
    for layer in analysis.layers:
        bits = projected.layers[layer.name].weight_bits
        assert set(bits[bits > 0].tolist()) == {4}, layer.name  # the kept channels keep their bits
        ordered = bits[analysis.channel_order(layer.name)]
        assert (np.diff((ordered > 0).astype(int)) <= 0).all(), layer.name  # the least important ones went
        removed += int((bits == 0).sum())
    assert removed > 0
    # a budget that 1-bit weights meet is still met by lowering bits, keeping every channel
    lowered, report = project_to_budget(policy, analysis, cost, Budget(size=one_bit * 1.5))
    assert report.size_ratio <= one_bit * 1.5
    assert all((lowered.layers[layer.name].weight_bits > 0).all() for layer in analysis.layers)


def test_a_soft_budget_is_penalized_not_projected(res_problem: CompressionProblem) -> None:
    analysis = res_problem.analysis
    cost = CostModel(analysis)
    policy = Policy.uniform(analysis, 8)
    full = cost.evaluate(policy)
    soft = Budget(size=full.size_ratio / 2, mode="soft")
    same, report = project_to_budget(policy, analysis, cost, soft)
    assert same is policy and report == full and soft.excess(report) == pytest.approx(1.0)
    fitted, report = project_to_budget(policy, analysis, cost, soft.hard())
    assert soft.hard().mode == "hard" and report.size_ratio <= soft.size and fitted is not policy
    soft_problem = CompressionProblem(analysis, res_problem.evaluate, 1.0, budget=soft, soft_penalty=0.5)
    result = soft_problem.finish(policy)
    assert not result.projected and not result.feasible and result.report == full
    assert result.reward == pytest.approx(1.0 - 1.0 - 0.5 * 1.0)  # accuracy 8/8 bits, FP32 1.0, excess 1
    # a warm start meets a soft budget too (the 1-bit uniform policy does not fit this one: it is projected)
    tight = Budget(size=cost.evaluate(smallest_policy(analysis, 0.8, 8)).size_ratio * 1.01, mode="soft")
    assert not tight.fits(cost.evaluate(Policy.uniform(analysis, 1)))
    (start,) = warm_start_policies(analysis, cost, None, tight, max_sparsity=0.8, activation_bits=8)
    assert tight.fits(cost.evaluate(start))


def test_budget_messages_and_feasibility(res_problem: CompressionProblem) -> None:
    with pytest.raises(BudgetError, match=r"size_budget must be in \(0, 1\], but got 1.7"):
        Budget(size=1.7)
    with pytest.raises(BudgetError, match="bops_budget must be in"):
        Budget(bops=0.0)
    both = Budget(size=0.1, bops=0.2)
    assert both.fits_ratios(0.1, 0.2) and not both.fits_ratios(0.1, 0.21) and not both.fits_ratios(0.11, 0.2)
    assert Budget(size=0.1).fits_ratios(0.1, 5.0)  # no BOPs budget: any BOPs
    analysis = res_problem.analysis
    with pytest.raises(BudgetError, match="smallest achievable size ratio is"):
        check_feasible(analysis, CostModel(analysis), Budget(size=1e-4), max_sparsity=0.8, activation_bits=8)
