"""Every method on the digits default: a valid policy within the budget, and the run folder it promises."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ajpq.budget import Budget
from ajpq.checkpoint import load_checkpoint, load_weights
from ajpq.cost import CostModel
from ajpq.methods import METHOD_MODULES, run_method
from ajpq.methods.olmp import ncs_minimize
from ajpq.methods.opq import opq_policy
from ajpq.models import build_model
from ajpq.policy import load_policy
from ajpq.runs import RunDir
from ajpq.workspace import WorkspaceSpec, open_workspace

BUDGET = 1 / 16
FAST = {
    "uniform": {},
    "random": {"episodes": 3},
    "opq": {},
    "olmp": {"rounds": 1, "population": 2, "iterations": 1, "retrain_epochs": 0.5},
    "admm": {"steps": 2, "admm_epochs": 0.5, "retrain_epochs": 0.5, "quant_epochs": 0.5},
}


@pytest.fixture(scope="module")
def workspace():
    return open_workspace(WorkspaceSpec(device="cpu"), progress=False)


@pytest.mark.parametrize("method", sorted(METHOD_MODULES))
def test_method_yields_a_valid_policy_within_the_budget(workspace, method, tmp_path):
    run_dir = RunDir.create(tmp_path, "digits_cnn", "digits", 0, path=tmp_path / method)
    result = run_method(method, workspace, Budget(size=BUDGET), 0, FAST[method], run_dir)
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
    assert report.size_bits == result.report.size_bits
    if method in ("random", "olmp"):
        episodes = run_dir.read_episodes()
        assert len(episodes) == result.evaluations > 0
        assert {"accuracy", "size_ratio", "feasible"} <= set(episodes[0])
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


def test_unknown_option_and_impossible_budget_are_refused(workspace):
    from ajpq.errors import BudgetError, ConfigError

    with pytest.raises(ConfigError, match="unknown option"):
        run_method("olmp", workspace, Budget(size=BUDGET), 0, {"round": 2})
    with pytest.raises(BudgetError, match="cannot meet the budget"):
        run_method("uniform", workspace, Budget(size=1e-4), 0, {})
    torch.manual_seed(0)
