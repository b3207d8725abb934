"""The environments as a Gymnasium user meets them: registered by ``import ajpq``, and documented index by index."""

from __future__ import annotations

import subprocess
import sys

import gymnasium
import numpy as np
import pytest
import torch
from nets import ResidualDepthwiseNet

from ajpq.agents import make_controller
from ajpq.analysis import analyze_model
from ajpq.budget import Budget, max_pruned
from ajpq.cost import CostModel
from ajpq.envs import ChannelCompressEnv, CompressionProblem, LayerCompressEnv
from ajpq.envs.core import CHANNEL_OBS_DIM, LAYER_OBS_DIM
from ajpq.errors import ConfigError
from ajpq.policy import Policy

IMPORT_AJPQ_ALONE = """
import sys, warnings
import gymnasium
import ajpq

ids = ("ajpq/LayerCompress-v0", "ajpq/ChannelCompress-v0")
specs = [gymnasium.spec(env_id) for env_id in ids]
assert "ajpq.envs" not in sys.modules, "import ajpq imported the environments"

import torch
from torch import nn
from ajpq.analysis import analyze_model

with warnings.catch_warnings():
    warnings.simplefilter("error")  # gymnasium warns when an id is registered again
    from ajpq.envs import CompressionProblem
assert [gymnasium.spec(env_id) for env_id in ids] == specs

torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
problem = CompressionProblem(analyze_model(net, (1, 4, 4)), lambda policy: 0.5, 1.0)
for env_id in ids:
    env = gymnasium.make(env_id, problem=problem)
    obs, _ = env.reset(seed=0)
    print(env_id, type(env.unwrapped).__name__, obs.shape[0])
"""


def test_import_ajpq_alone_registers_both_envs() -> None:
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_AJPQ_ALONE], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [
        f"ajpq/LayerCompress-v0 LayerCompressEnv {LAYER_OBS_DIM}",
        f"ajpq/ChannelCompress-v0 ChannelCompressEnv {CHANNEL_OBS_DIM}",
    ]


def _table_indices(doc: str, section: str) -> list[int]:
    """The indices in the first column of the table under ``## <section>`` ("7" or a span "0-23")."""
    text = doc.split(f"## {section}\n", 1)[1].split("\n    ## ", 1)[0]
    rows = [line.strip() for line in text.splitlines() if line.strip().startswith("|")][2:]  # header, separator
    indices: list[int] = []
    for row in rows:
        cell = row.split("|")[1].strip()
        first, _, last = cell.partition("-")
        indices.extend(range(int(first), int(last or first) + 1))
    return indices


@pytest.fixture(scope="module")
def problem() -> CompressionProblem:
    torch.manual_seed(0)
    analysis = analyze_model(ResidualDepthwiseNet(), (1, 4, 4))

    def evaluate(policy: Policy) -> float:
        return 0.5

    return CompressionProblem(analysis, evaluate, 1.0, budget=Budget(size=0.5), search_activation_bits=True)


@pytest.fixture(scope="module")
def sparse_problem(problem: CompressionProblem) -> CompressionProblem:
    """``problem`` with weight sparsity searched too (up to 0.8), priced by a cost model that has the weights."""
    torch.manual_seed(0)
    net = ResidualDepthwiseNet()
    analysis = analyze_model(net, (1, 4, 4))
    return CompressionProblem(
        analysis,
        problem.evaluate,
        1.0,
        budget=Budget(size=0.5),
        search_activation_bits=True,
        search_weight_sparsity=True,
        max_weight_sparsity=0.8,
        pricing=CostModel.from_model(analysis, net),
    )


@pytest.mark.parametrize(
    ("env_class", "dim"), [(LayerCompressEnv, LAYER_OBS_DIM), (ChannelCompressEnv, CHANNEL_OBS_DIM)]
)
def test_documented_observation_table_matches_the_space(
    problem: CompressionProblem,
    sparse_problem: CompressionProblem,
    env_class: type[LayerCompressEnv] | type[ChannelCompressEnv],
    dim: int,
) -> None:
    doc = env_class.__doc__ or ""
    assert _table_indices(doc, "Observation Space") == list(range(dim + 1))  # the last row: weight sparsity only
    assert env_class(problem).observation_space.shape == (dim,)
    assert env_class(sparse_problem).observation_space.shape == (dim + 1,)
    assert f"Box(-1, 1, ({dim},), float32)" in doc and f"{dim + 1} with ``search_weight_sparsity``" in doc
    for section in ("Action Space", "Observation Space", "Rewards", "Starting State", "Episode End", "Arguments"):
        assert f"\n    ## {section}\n" in doc


def test_documented_layer_action_table_matches_the_space(sparse_problem: CompressionProblem) -> None:
    env = LayerCompressEnv(sparse_problem)
    assert _table_indices(LayerCompressEnv.__doc__ or "", "Action Space") == list(range(env.action_space.shape[0]))


def test_the_weight_sparsity_action_reaches_the_policy_and_both_observations(
    sparse_problem: CompressionProblem,
) -> None:
    with pytest.raises(ConfigError, match=r"^search_weight_sparsity needs a cost model built with the weights"):
        CompressionProblem(sparse_problem.analysis, sparse_problem.evaluate, 1.0, search_weight_sparsity=True)
    problem = sparse_problem
    env = LayerCompressEnv(problem, channel_controller=lambda obs: 3)  # 4 bits everywhere
    obs, _ = env.reset(seed=0)
    assert obs.shape == (31,) and obs[30] == 0.0  # no step decided yet
    first = problem.units[0]
    obs, *_ = env.step(np.array([-1.0, 1.0, 0.0], dtype=np.float32))  # no pruning, 8-bit activations, (0+1)/2*0.8
    assert obs[30] == pytest.approx(0.4 / 0.8)
    for member in first.members:
        assert env.episode.policy.layers[member.name].weight_sparsity == 0.4
    channel_env = ChannelCompressEnv(problem, layer_controller=lambda obs: np.array([-1.0, 1.0, 0.5]))
    channel_obs, _ = channel_env.reset(seed=0)
    assert channel_obs.shape == (34,) and channel_obs[33] == pytest.approx(0.6 / 0.8)  # (0.5+1)/2*0.8 = 0.6
    # what the episode counts as used is the magnitude mask's count, up to its rounding
    while not env.episode.all_decided:
        env.step(np.array([-1.0, 1.0, 0.0], dtype=np.float32))
    report = problem.cost_model.evaluate(env.episode.policy)
    assert env.episode.bops_used == pytest.approx(report.bops, rel=0.05)
    assert all(cost.storage != "dense" for cost in report.layers)


def test_observations_hold_what_the_tables_say(problem: CompressionProblem) -> None:
    """Spot checks of documented entries against numbers worked out by hand for the first layer step."""
    layer_env = LayerCompressEnv(problem)
    obs, _ = layer_env.reset(seed=0)
    first = problem.units[0]
    assert obs[0] == 0.0  # step index
    assert obs[1] == 1.0 and obs[3] == 0.0  # conv1 (with conv2, coupled by the residual sum) is a dense conv
    assert obs[4] == 1.0  # coupled
    assert obs[7] == pytest.approx(np.log2(first.group.size + 1) / 14)
    assert obs[28] == 0.0 and obs[29] == 1.0  # nothing decided yet
    obs, reward, terminated, truncated, _ = layer_env.step(np.array([1.0, -1.0], dtype=np.float32))
    pruned = max_pruned(first.group.size, problem.max_sparsity)
    assert obs[28] == pytest.approx(pruned / first.group.size)  # previous step: max sparsity
    assert obs[29] == pytest.approx(2 / 8)  # previous step: the lowest activation bits
    assert (reward, terminated, truncated) == (0.0, False, False)

    channel_env = ChannelCompressEnv(problem, layer_controller=lambda obs: np.array([1.0, 1.0]))
    channel_obs, _ = channel_env.reset(seed=0)
    first_layer_obs, _ = LayerCompressEnv(problem).reset()
    np.testing.assert_array_equal(channel_obs[:24], first_layer_obs[:24])  # indices 0-23 shared
    assert channel_obs[24] == 0.0  # the first chunk holds the most important channel
    assert channel_obs[26] == pytest.approx(pruned / first.group.size / problem.max_sparsity)
    assert channel_obs[27] == 0.0 and channel_obs[28] == 0.0  # nothing decided in the step yet
    channel_obs, *_ = channel_env.step(3)  # 4 bits
    assert channel_obs[28] == pytest.approx(4 / 8)


def test_final_channel_observation_is_the_documented_row(problem: CompressionProblem) -> None:
    """After the last chunk indices 24-28 are ``1, 0, sparsity / max_sparsity, 1, 0``; the last step is the output
    layer, which is never pruned, so its sparsity entry is 0."""
    channel_env = ChannelCompressEnv(problem, layer_controller=lambda obs: np.array([1.0, 1.0]))
    channel_env.reset(seed=0)
    terminated = False
    while not terminated:
        channel_obs, _, terminated, _, _ = channel_env.step(0)
    assert not problem.units[-1].group.prunable
    np.testing.assert_array_equal(channel_obs[24:29], [1.0, 0.0, 0.0, 1.0, 0.0])


class MultiDiscreteEnv(gymnasium.Env):
    """An action space PPO accepts but the controllers cannot sample warm-up actions from."""

    def __init__(self) -> None:
        self.observation_space = gymnasium.spaces.Box(-1.0, 1.0, (3,), np.float32)
        self.action_space = gymnasium.spaces.MultiDiscrete([2, 3])


@pytest.mark.parametrize("kind", ["ppo", "ddpg"])
def test_controllers_refuse_action_spaces_they_cannot_act_in(kind: str) -> None:
    with pytest.raises(ConfigError, match=r"^layer: .*Box.*MultiDiscrete\(\[2 3\]\)$"):
        make_controller(kind, "layer", MultiDiscreteEnv(), 0, np.random.default_rng(0))
