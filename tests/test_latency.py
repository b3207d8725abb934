"""The latency budget: the per-layer table, its predictions against values computed by hand, the budget and its
projection, the table file, and a search under a latency budget end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ajpq.allocation import warm_start_policies
from ajpq.budget import Budget, check_feasible, project_to_budget, smallest_policy
from ajpq.cli import main
from ajpq.cost import CostModel
from ajpq.errors import BudgetError, ConfigError
from ajpq.latency import (
    LatencyError,
    LatencyTable,
    LayerLatency,
    check_target,
    kept_grid,
    load_or_measure_table,
    machine_signature,
    measure_table,
)
from ajpq.policy import Policy
from ajpq.runner import run_search
from ajpq.runs import RunDir
from ajpq.search_config import SearchConfig
from ajpq.sensitivity import load_or_measure
from ajpq.workspace import WorkspaceSpec, open_workspace


@pytest.fixture(scope="module")
def workspace():
    return open_workspace(WorkspaceSpec(device="cpu"), progress=False)


def bilinear(kin: float, kout: float) -> float:
    """The synthetic layers' latency: bilinear in kept inputs and outputs, so interpolation reproduces it exactly."""
    return 0.01 + 0.0002 * kin + 0.001 * kout + 0.00005 * kin * kout


def synthetic_table(analysis, reference_ms: float = 3.0, residual_ms: float = 0.02) -> LatencyTable:
    layers = {}
    for layer in analysis.layers:
        ins, outs = kept_grid(layer.in_channels), kept_grid(layer.out_channels)
        ms = np.array([[bilinear(i, o) for o in outs] for i in ins])
        layers[layer.name] = LayerLatency(layer.name, ins, outs, ms, residual_ms, layer.out_channels)
    return LatencyTable(
        model_name=analysis.model_name,
        fingerprint=analysis.fingerprint,
        target="torch-cpu",
        batch=1,
        reference_ms=reference_ms,
        layers=layers,
        machine=machine_signature("torch-cpu"),
    )


def test_a_layer_interpolates_between_grid_points_and_extrapolates_beyond_them() -> None:
    entry = LayerLatency(
        "conv",
        in_grid=np.array([2, 6]),
        out_grid=np.array([4, 8]),
        ms=np.array([[1.0, 2.0], [3.0, 6.0]]),
        residual_ms=0.4,
        out_channels=8,
    )
    # kin 4 is halfway: rows 1.0..2.0 and 3.0..6.0; kout 6 halfway: 1.5 and 4.5 -> 3.0; residual 0.4 * 6/8
    assert entry.predict(4, 6) == pytest.approx(3.0 + 0.3)
    assert entry.predict(6, 8) == pytest.approx(6.0 + 0.4)
    # below the grid: the line through the first two points (kout 2: 1.0 - 1*(2/4)... = 0.5 at kin 2)
    assert entry.predict(2, 2) == pytest.approx(0.5 + 0.1)
    assert entry.predict(5, 0) == 0.0  # the layer is gone


def test_kept_grid_times_one_channel_and_the_fractions() -> None:
    assert kept_grid(16).tolist() == [1, 3, 6, 10, 13, 16]
    assert kept_grid(1).tolist() == [1]
    assert kept_grid(3).tolist() == [1, 2, 3]


def test_the_cost_model_predicts_the_sum_of_its_layers_from_kept_inputs_and_outputs(workspace) -> None:
    analysis = workspace.analysis
    table = synthetic_table(analysis, reference_ms=3.0)
    cost = CostModel(analysis, latency=table)
    policy = Policy.uniform(analysis, 4, 8)
    conv2 = analysis.layer("conv2")
    removed = analysis.channel_order("conv2")[-8:]  # 8 of conv2's 32 channels
    policy.prune_group(analysis, conv2.group, removed)
    report = cost.evaluate(policy)
    # by hand: conv1 1->16, conv2 16->24, conv3 reads 24 of 32 inputs -> 32, fc1 512->64, fc2 64->10
    expected = sum(
        bilinear(kin, kout) + 0.02 * kout / out
        for kin, kout, out in ((1, 16, 16), (16, 24, 32), (24, 32, 32), (512, 64, 64), (64, 10, 10))
    )
    assert analysis.layer("conv3").in_channels == 32 and analysis.layer("fc1").in_channels == 512
    assert report.latency_ms == pytest.approx(expected)
    assert report.latency_ratio == pytest.approx(expected / 3.0)
    assert report.as_dict()["latency_ratio"] == pytest.approx(expected / 3.0)
    # bits do not change latency: the exported model computes in float
    assert (
        cost.evaluate(Policy.uniform(analysis, 2, 8)).latency_ms
        == cost.evaluate(Policy.uniform(analysis, 8, 8)).latency_ms
    )
    assert CostModel(analysis).evaluate(policy).latency_ratio is None


def test_budget_fits_and_penalizes_the_latency_ratio(workspace) -> None:
    analysis = workspace.analysis
    table = synthetic_table(analysis)
    report = CostModel(analysis, latency=table).evaluate(Policy.uniform(analysis, 8, 8))
    ratio = report.latency_ratio
    assert ratio is not None
    assert Budget(latency=ratio * 1.01).fits(report)
    assert not Budget(latency=ratio * 0.99).fits(report)
    assert Budget(latency=ratio / 2, mode="soft").excess(report) == pytest.approx(1.0)
    assert "latency <= 0.5 of FP32" in Budget(latency=0.5).describe()
    with pytest.raises(BudgetError, match="a latency budget needs a cost model with a latency table"):
        Budget(latency=0.5).fits(CostModel(analysis).evaluate(Policy.uniform(analysis, 8, 8)))


def test_the_projection_removes_channels_until_the_latency_fits_and_keeps_the_bits(workspace) -> None:
    analysis = workspace.analysis
    table = synthetic_table(analysis)
    cost = CostModel(analysis, latency=table)
    full = cost.evaluate(Policy.uniform(analysis, 6, 8)).latency_ratio
    budget = Budget(latency=0.7 * full)
    projected, report = project_to_budget(Policy.uniform(analysis, 6, 8), analysis, cost, budget, max_sparsity=0.8)
    assert report.latency_ratio <= budget.latency
    bits = np.concatenate([projected.layers[layer.name].weight_bits for layer in analysis.layers])
    assert set(bits.tolist()) == {0, 6}  # channels removed, the others' bits kept
    # one removal fewer would not fit: the projection removes the fewest
    assert report.latency_ratio > 0.6 * full


def test_the_warm_start_meets_a_latency_budget_and_an_unreachable_one_is_refused(workspace) -> None:
    analysis = workspace.analysis
    table = synthetic_table(analysis)
    cost = CostModel(analysis, latency=table)
    full = cost.evaluate(Policy.uniform(analysis, 8, 8)).latency_ratio
    sensitivity, _ = load_or_measure(
        workspace.model, workspace.simulated, analysis, workspace.splits.val, 8, None, progress=False
    )
    budget = Budget(size=0.2, latency=0.6 * full)
    starts = warm_start_policies(analysis, cost, sensitivity, budget, max_sparsity=0.8, activation_bits=8)
    assert starts
    for policy in starts:
        assert budget.fits(cost.evaluate(policy))
    with pytest.raises(BudgetError, match=r"latency_budget 0.01 \(the smallest achievable latency ratio is"):
        check_feasible(analysis, cost, Budget(latency=0.01), max_sparsity=0.8, activation_bits=8)


def test_a_table_file_round_trips_and_a_wrong_one_is_refused_in_one_line(workspace, tmp_path: Path) -> None:
    analysis = workspace.analysis
    table = synthetic_table(analysis, reference_ms=1.5)
    path = table.save(tmp_path / "table.json")
    loaded = LatencyTable.load(path, analysis)
    policy = Policy.uniform(analysis, 8, 8)
    policy.prune_group(analysis, analysis.layer("conv3").group, analysis.channel_order("conv3")[-5:])
    assert CostModel(analysis, latency=loaded).evaluate(policy).latency_ms == pytest.approx(
        CostModel(analysis, latency=table).evaluate(policy).latency_ms
    )
    data = json.loads(path.read_text())
    cases = {
        "fingerprint": ({**data, "fingerprint": "x" * 64}, "measured on another architecture"),
        "nan": (
            {**data, "layers": [{**data["layers"][0], "ms": [[float("nan")] * 6]}, *data["layers"][1:]]},
            "ms must be a 1 x 6 table of numbers",
        ),
        "grid": (
            {**data, "layers": [{**data["layers"][0], "out_grid": list(range(1, 40))}, *data["layers"][1:]]},
            "out_grid must be 1 to 16 increasing channel counts",
        ),
        "layers": ({**data, "layers": data["layers"][:2]}, "it must time the model's 5 layers"),
        "reference": ({**data, "reference_ms": -1}, "reference_ms -1 is not a positive number"),
        "format": ([1, 2], "not an AJPQ latency table"),
    }
    for name, (content, message) in cases.items():
        bad = tmp_path / f"{name}.json"
        bad.write_text(json.dumps(content))
        with pytest.raises(LatencyError, match=message) as info:
            LatencyTable.load(bad, analysis)
        assert "\n" not in str(info.value)
    huge = tmp_path / "huge.json"
    huge.write_bytes(b" " * (5 * 2**20))
    with pytest.raises(LatencyError, match="more than any latency table"):
        LatencyTable.load(huge, analysis)


def test_cuda_is_refused_where_torch_sees_no_device(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(LatencyError, match="latency_target cuda needs a CUDA device"):
        check_target("cuda")
    code = main(["search", "--latency-budget", "0.5", "--latency-target", "cuda", "--episodes", "4", "--no-progress"])
    assert code == 2
    assert "latency_target cuda needs a CUDA device" in capsys.readouterr().err


def test_a_measured_table_times_every_layer_and_is_cached(workspace, tmp_path: Path) -> None:
    analysis = workspace.analysis

    def measure() -> tuple[LatencyTable, bool]:
        return load_or_measure_table(
            workspace.model,
            analysis,
            workspace.splits.input_shape,
            target="torch-cpu",
            batch=2,
            model_name="digits_cnn",
            cache=tmp_path,
            progress=False,
        )

    table, cached = measure()
    assert not cached
    assert list(table.layers) == analysis.layer_names
    for layer in analysis.layers:
        entry = table.layers[layer.name]
        assert entry.out_grid.tolist() == kept_grid(layer.out_channels).tolist()
        assert entry.ms.shape == (kept_grid(layer.in_channels).size, entry.out_grid.size)
        assert (entry.ms > 0).all()
    assert table.reference_ms > 0 and table.full_slim_ms > 0
    # the table's sum at full width is calibrated to the unpruned slim model's measured latency
    full = CostModel(analysis, latency=table).evaluate(Policy.uniform(analysis, 8, 8)).latency_ms
    covered = sum(float(entry.ms[-1, -1]) for entry in table.layers.values())
    assert full == pytest.approx(max(table.full_slim_ms, covered), rel=1e-6)
    again, cached = measure()
    assert cached and again.to_dict() == table.to_dict()
    (path,) = tmp_path.glob("*.json")
    path.write_text("{ damaged")
    _, cached = measure()
    assert not cached  # measured anew, not trusted


def test_a_search_under_a_latency_budget_records_and_meets_it(workspace, tmp_path: Path, caplog) -> None:
    analysis = workspace.analysis
    table = measure_table(
        workspace.model,
        analysis,
        workspace.splits.input_shape,
        target="torch-cpu",
        batch=64,
        model_name="digits_cnn",
        progress=False,
    )
    cost = CostModel(analysis, latency=table)
    full = cost.evaluate(Policy.uniform(analysis, 8, 8)).latency_ratio
    least = cost.evaluate(smallest_policy(analysis, 0.8, 8)).latency_ratio
    if least >= 0.95:
        pytest.skip(f"this machine's table leaves no latency budget below 1 to search (smallest ratio {least:.3f})")
    given = table.save(tmp_path / "given.json")
    budget = round(least + 0.6 * (min(full, 1.0) - least), 4)  # between the smallest policy and the unpruned one
    config = SearchConfig(
        size_budget=0.2,
        latency_budget=budget,
        latency_batch=64,
        latency_table=str(given),
        episodes=16,
        warmup_episodes=2,
        episodes_per_update=4,
        checkpoint_every=8,
        progress=False,
        run_dir=str(tmp_path / "run"),
    )
    result = run_search(config, workspace=workspace)
    run = RunDir(result.run_dir)
    records = run.read_episodes()
    assert len(records) == 16
    assert all(r["latency_ratio"] <= budget + 1e-9 for r in records)
    assert all(r["feasible"] for r in records)
    assert result.best is not None and result.best["latency_ratio"] <= budget
    assert LatencyTable.load(run.latency_table_path, analysis).to_dict() == table.to_dict()
    assert workspace.cost_model.latency is not None
    # a resume on another machine keeps the run's table and says that its predictions may not hold
    data = json.loads(run.latency_table_path.read_text())
    data["machine"]["processor"] = "another processor"
    run.latency_table_path.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="ajpq"):
        run_search(SearchConfig.from_dict({**config.to_dict(), "episodes": 20}), resume=result.run_dir)
    assert "was measured on another machine or set-up (processor" in caplog.text
    # a later search without a latency budget on the same workspace predicts no latency
    run_search(
        SearchConfig(size_budget=0.2, episodes=2, progress=False, run_dir=str(tmp_path / "plain")),
        workspace=workspace,
    )
    assert workspace.cost_model.latency is None
    assert "latency_ratio" not in RunDir(tmp_path / "plain").read_episodes()[0]


def test_a_table_for_another_batch_is_refused(workspace, tmp_path: Path, capsys) -> None:
    path = synthetic_table(workspace.analysis).save(tmp_path / "batch1.json")
    code = main(
        [
            "search",
            "--latency-budget",
            "0.9",
            "--latency-batch",
            "8",
            "--latency-table",
            str(path),
            "--episodes",
            "2",
            "--no-progress",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "was measured on torch-cpu at batch 1, but the search asks for torch-cpu at batch 8" in err
    assert "Traceback" not in err


def test_the_onnxruntime_target_times_the_float_onnx_of_each_layer(workspace) -> None:
    pytest.importorskip("onnxruntime")
    analysis = workspace.analysis
    table = measure_table(
        workspace.model,
        analysis,
        workspace.splits.input_shape,
        target="onnxruntime-cpu",
        batch=1,
        model_name="digits_cnn",
        repeats=3,
        progress=False,
    )
    assert table.target == "onnxruntime-cpu" and "onnxruntime" in table.machine
    assert all((entry.ms > 0).all() for entry in table.layers.values())
    assert table.reference_ms > 0 and table.full_slim_ms > 0


def test_compare_takes_latency_budgets_and_refuses_a_bad_target() -> None:
    from ajpq.compare import CompareConfig, budget_label, compare_budgets, run_folder_name

    config = CompareConfig(budgets=[], latency_budgets=["1/2", 0.3], latency_batch=64)
    budgets = compare_budgets(config)
    assert [b.latency for b in budgets] == [0.5, 0.3]
    assert [budget_label(b) for b in budgets] == ["latency 0.5", "latency 0.3"]
    assert run_folder_name("opq", budget_label(budgets[1])) == "opq__latency_0.3"
    with pytest.raises(ConfigError, match="latency_target must be one of torch-cpu, onnxruntime-cpu, cuda"):
        CompareConfig(latency_budgets=[0.5], latency_target="tpu")
    with pytest.raises(BudgetError, match="latency_budgets must be in"):
        CompareConfig(latency_budgets=[2])


def test_bench_latency_spreads_policies_from_the_sparsest_to_dense(workspace) -> None:
    from experiments_scripts import load_experiment

    bench = load_experiment("bench_latency")
    analysis = workspace.analysis
    policies = bench.spread_policies(analysis, 5, 0.8, seed=0)
    kept = [
        np.mean([(p.layers[g.members[0]].weight_bits > 0).mean() for g in analysis.groups if g.prunable])
        for p in policies
    ]
    assert kept[0] < 0.45 and kept[-1] > 0.85  # levels 0.2 .. 1.0, each group within 15 points of its level
    assert all(0.2 - 1e-9 <= k <= 1.0 for k in kept)


@pytest.mark.expensive
def test_bench_latency_quick_mode_reports_the_predictor(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "experiments" / "bench_latency.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "latency_validation.json").read_text())
    (row,) = summary["results"]
    assert len(row["rows"]) == 8 and -1.0 <= row["spearman"] <= 1.0
    assert all(r["predicted_ms"] > 0 and r["measured_ms"] > 0 for r in row["rows"])
    assert "Spearman" in (tmp_path / "latency_validation.md").read_text()
