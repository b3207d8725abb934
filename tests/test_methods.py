"""Every method on the digits default: a valid policy within the budget, and the run folder it promises."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ajpq.budget import Budget
from ajpq.checkpoint import load_checkpoint, load_weights
from ajpq.cost import CostModel
from ajpq.methods import METHODS
from ajpq.methods.olmp import ncs_minimize
from ajpq.methods.opq import opq_policy
from ajpq.models import build_model
from ajpq.policy import load_policy
from ajpq.runner import SearchResult, run_search
from ajpq.runs import RunDir
from ajpq.search_config import SearchConfig
from ajpq.workspace import WorkspaceSpec, open_workspace

BUDGET = 1 / 16
FAST = {
    "ajpq": {},
    "uniform": {},
    "random": {},
    "local": {},
    "opq": {},
    "olmp": {"rounds": 1, "population": 2, "iterations": 1, "retrain_epochs": 0.5},
    "admm": {"steps": 2, "admm_epochs": 0.5, "retrain_epochs": 0.5, "quant_epochs": 0.5},
}


@pytest.fixture(scope="module")
def workspace():
    return open_workspace(WorkspaceSpec(device="cpu"), progress=False)


def run_method(workspace, method, path, budget=BUDGET, options=None, **settings) -> SearchResult:
    """``ajpq search --method METHOD`` on the shared workspace (3 episodes for the episodic methods)."""
    config = SearchConfig(
        method=method,
        size_budget=budget,
        method_options=FAST[method] if options is None else options,
        run_dir=str(path),
        progress=False,
        **{"episodes": 3, "checkpoint_every": 4, **settings},
    )
    return run_search(config, workspace=workspace)


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"ajpq"}))
def test_method_yields_a_valid_policy_within_the_budget(workspace, method, tmp_path):
    run_dir = RunDir(tmp_path / method)
    result = run_method(workspace, method, run_dir.path)
    for name in ("config.yaml", "run.json", "best_policy.json"):
        assert (run_dir.path / name).is_file(), name
    policy = load_policy(run_dir.best_policy_path, workspace.analysis)
    assert policy.meta["method"] == method
    assert policy.metrics["size_ratio"] <= BUDGET
    model = workspace.model
    if method in ("olmp", "admm"):
        weights = run_dir.path / "weights.pt"
        assert policy.meta["weights"] == str(weights)
        model = build_model("digits_cnn", workspace.splits.input_shape, workspace.splits.num_classes)
        load_weights(model, load_checkpoint(weights), "digits_cnn", str(weights))
        model.eval()
    report = CostModel.from_model(workspace.analysis, model).evaluate(policy)
    assert report.size_ratio <= BUDGET
    assert report.size_ratio == pytest.approx(policy.metrics["size_ratio"], abs=1e-8)
    assert result.best is not None and result.best["size_ratio"] == pytest.approx(report.size_ratio, abs=1e-8)
    episodes = run_dir.read_episodes()
    assert len(episodes) == result.evaluations == (3 if method == "random" else len(episodes))
    if method in ("random", "olmp", "uniform", "admm"):
        assert result.evaluations > 0
    if method in ("olmp", "admm", "opq"):
        assert any(layer.weight_sparsity > 0 for layer in policy.layers.values())
        assert json.loads(run_dir.best_policy_path.read_text())["version"] == 2


def test_opq_is_deterministic_and_evaluates_nothing(workspace, monkeypatch):
    simulated = workspace.simulated
    weights = {name: w.numpy() for name, w in simulated.reference_weights().items()}

    def refuse(*_args, **_kwargs):
        raise AssertionError("OPQ must not evaluate anything")

    monkeypatch.setattr(type(simulated), "apply", refuse)
    monkeypatch.setattr("ajpq.train.evaluate_accuracy", refuse)
    first, info = opq_policy(workspace.analysis, simulated.cost_model, weights, Budget(size=BUDGET))
    second, _ = opq_policy(workspace.analysis, simulated.cost_model, weights, Budget(size=BUDGET))
    assert first.to_dict() == second.to_dict()
    assert simulated.cost_model.evaluate(first).size_ratio <= BUDGET
    assert set(info["allocation"]) == set(workspace.analysis.layer_names)
    for name, layer in first.layers.items():
        assert len(set(layer.weight_bits.tolist())) == 1, f"{name}: one shared width per layer"


def test_ncs_finds_the_minimum_of_a_bowl():
    target = np.array([0.3, 0.7, 0.5])
    rng = np.random.default_rng(0)
    best, value = ncs_minimize(
        lambda x: float(((x - target) ** 2).sum()),
        np.zeros(3),
        np.ones(3),
        population=4,
        iterations=100,
        sigma=0.2,
        rng=rng,
    )
    assert value < 0.02 and np.abs(best - target).max() < 0.12


def test_search_cli_runs_a_method(tmp_path, capsys):
    from ajpq.cli import main

    run = tmp_path / "run"
    code = main(["search", "--method", "opq", "--size-budget", "0.0625", "--run-dir", str(run), "--device", "cpu"])
    assert code == 0
    policy = json.loads((run / "best_policy.json").read_text())
    assert policy["meta"]["method"] == "opq" and policy["metrics"]["size_ratio"] <= 0.0625


def test_unknown_option_and_impossible_budget_are_refused(workspace, tmp_path):
    from ajpq.errors import BudgetError, ConfigError

    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['round'\] for method 'olmp'; it takes \[.*'rounds'"):
        SearchConfig(method="olmp", method_options={"round": 2})
    with pytest.raises(ConfigError, match="olmp population must be an integer >= 1, but got 0"):
        SearchConfig(method="olmp", method_options={"population": 0})
    with pytest.raises(BudgetError, match="cannot meet the budget"):
        run_method(workspace, "uniform", tmp_path / "u", budget=1e-4)
    torch.manual_seed(0)


def test_a_registered_method_runs_in_the_search_loop_and_records_like_every_method(workspace, tmp_path):
    """The extension point: a class with a name, an options dataclass and run(); the loop does everything else, and
    its episodes.jsonl has the same keys and the same reward (accuracy change against FP32) as random's."""
    from dataclasses import dataclass

    from ajpq.errors import ConfigError
    from ajpq.methods.base import MethodOptions, register_method
    from ajpq.policy import Policy

    @dataclass(frozen=True)
    class FixedOptions(MethodOptions):
        bits: int = 4
        """Bits of every channel."""

        def __post_init__(self) -> None:
            if not 1 <= self.bits <= 8:
                raise ConfigError(f"fixed_test bits must be 1..8, but got {self.bits}")

    @register_method
    class Fixed:
        name = "fixed_test"
        Options = FixedOptions
        resumable = False
        episodic = False

        def run(self, context, options):
            context.evaluate([Policy.uniform(context.workspace.analysis, options.bits, 8)])

    try:
        with pytest.raises(ConfigError, match=r"fixed_test bits must be 1\.\.8, but got 9"):
            SearchConfig(method="fixed_test", method_options={"bits": 9})
        result = run_search(
            SearchConfig(method="fixed_test", method_options={"bits": 2}, size_budget=0.1, run_dir=str(tmp_path / "f")),
            workspace=workspace,
        )
        random = run_method(workspace, "random", tmp_path / "r", budget=0.1)
    finally:
        METHODS.pop("fixed_test")
    (line,) = RunDir(result.run_dir).read_episodes()
    fp32 = json.loads((result.run_dir / "run.json").read_text())["fp32_accuracy_val"]
    expected = workspace.cost_model.evaluate(Policy.uniform(workspace.analysis, 2, 8))
    assert line["size_ratio"] == pytest.approx(expected.size_ratio, abs=1e-8) and line["feasible"]
    assert line["reward"] == pytest.approx(line["accuracy"] - fp32, abs=1e-7)
    random_lines = RunDir(random.run_dir).read_episodes()
    assert set(line) == set(random_lines[0]) - {"warmup", "phase"} | set(line) and len(random_lines) == 3
    for record in random_lines:
        assert record["reward"] == pytest.approx(record["accuracy"] - fp32, abs=1e-7)
    best = json.loads((result.run_dir / "best_policy.json").read_text())
    assert best["meta"]["method"] == "fixed_test" and best["metrics"]["episode"] == 1
