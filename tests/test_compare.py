"""``ajpq compare`` on a tiny configuration writes the CSV, the markdown table and the Pareto PNG."""

from __future__ import annotations

import csv

import pytest

from ajpq import load_compressed
from ajpq.cli import main
from ajpq.compare import CompareConfig, load_compare_config
from ajpq.data import load_dataset
from ajpq.errors import BudgetError, ConfigError
from ajpq.train import evaluate_accuracy


def test_compare_writes_csv_table_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f'default:\n  methods: [uniform, opq]\n  budgets: ["1/16"]\n  finetune_epochs: 1\n  out_dir: {out}\n'
    )
    assert main(["compare", "--config", str(config), "--device", "cpu"]) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["uniform", "opq"]
    assert all(float(r["size_compression"]) >= 16 for r in rows)
    assert {"val_before", "test_after", "search_wall_time", "evaluations"} <= set(rows[0])
    for row in rows:  # the exported artifact of every row: its bytes, its own accuracy, its CPU latency
        artifact = out / f"{row['method']}__1_16" / "model.ajpq"
        assert int(row["file_bytes"]) == artifact.stat().st_size
        slim = load_compressed(artifact)
        assert float(row["test_artifact"]) == evaluate_accuracy(slim, load_dataset("digits").test)
        assert float(row["latency_b1_ms"]) > 0 and float(row["fp32_latency_b64_ms"]) > 0
    table = (out / "compare.md").read_text()
    assert "| uniform | 1/16 |" in table and "test after" in table
    assert (out / "compare_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "uniform__1_16" / "best_policy.json").is_file()
    assert "wrote" in capsys.readouterr().out


def test_compare_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'opq'"):
        CompareConfig(methods=["opg"])
    with pytest.raises(ConfigError, match="1/16"):
        CompareConfig(budgets=["one sixteenth"])
    assert CompareConfig(budgets=["1/16", 0.5]).budgets == [0.0625, 0.5]
    with pytest.raises(ConfigError, match=r"^joint_budgets entries must be \[size, bops\] pairs .* but got '1/100'$"):
        CompareConfig(joint_budgets=["1/100"])
    with pytest.raises(BudgetError, match=r"^joint_budgets bops must be in \(0, 1\], but got 3"):
        CompareConfig(joint_budgets=[["1/100", 3]])
    assert CompareConfig(budgets=[], joint_budgets=[["1/100", "1/300"]]).joint_budgets == [[0.01, 1 / 300]]
    with pytest.raises(ConfigError, match=r"^learn_ranges must be true or false, but got 'yes'$"):
        CompareConfig(learn_ranges="yes")
    bad = tmp_path / "bad.yaml"
    bad.write_text("default:\n  method: [opq]\n")
    with pytest.raises(ConfigError, match="did you mean 'methods'"):
        load_compare_config(bad)


def test_shipped_configs_load():
    for name in ("compare_digits", "compare_fmnist_lenet5"):
        config = load_compare_config(f"experiments/{name}.yaml")
        assert len(config.methods) == 6
    assert load_compare_config("experiments/compare_fmnist_lenet5.yaml").budgets == [1 / 32, 1 / 64, 1 / 100]


def test_compare_bops_budget_runs_random_through_the_search(tmp_path):
    """A BOPs row and a joint row; random goes through `ajpq search` with the same search options (activation bits
    searched)."""
    import json

    import yaml

    out = tmp_path / "cmp"
    config = tmp_path / "bops.yaml"
    config.write_text(
        "default:\n  methods: [random, uniform]\n  budgets: []\n  bops_budgets: ['1/64']\n  episodes: 4\n"
        "  joint_budgets: [['1/8', '1/64']]\n"
        f"  finetune_epochs: 0\n  search: {{search_activation_bits: true}}\n  out_dir: {out}\n"
    )
    assert main(["compare", "--config", str(config), "--device", "cpu"]) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("random", "BOPs 1/64"),
        ("uniform", "BOPs 1/64"),
        ("random", "1/8 + BOPs 1/64"),
        ("uniform", "1/8 + BOPs 1/64"),
    ]
    assert all(float(r["bops_compression"]) >= 64 for r in rows)
    assert all(float(r["size_compression"]) >= 8 for r in rows[2:])
    joint = yaml.safe_load((out / "random__1_8__BOPs_1_64" / "config.yaml").read_text())["default"]
    assert (joint["size_budget"], joint["bops_budget"]) == (1 / 8, 1 / 64)
    run = out / "random__BOPs_1_64"
    saved = yaml.safe_load((run / "config.yaml").read_text())["default"]
    assert saved["method"] == "random" and saved["search_activation_bits"] is True and saved["bops_budget"] == 1 / 64
    assert len((run / "episodes.jsonl").read_text().splitlines()) == 4 == int(rows[0]["evaluations"])
    best = json.loads((run / "best_policy.json").read_text())
    assert best["metrics"]["bops_ratio"] <= 1 / 64


def test_compare_with_worker_processes_writes_the_serial_rows(tmp_path):
    rows = {}
    for name, flags in (("serial", []), ("parallel", ["--backend", "processes", "--workers", "2"])):
        out = tmp_path / name
        config = tmp_path / f"{name}.yaml"
        config.write_text(
            f"default:\n  methods: [random, uniform]\n  budgets: [0.1]\n  episodes: 3\n  finetune_epochs: 0\n"
            f"  out_dir: {out}\n"
        )
        assert main(["compare", "--config", str(config), "--device", "cpu", *flags]) == 0
        rows[name] = [
            # times differ, and the header of the exported file names its run folder (serial/ or parallel/)
            {k: v for k, v in r.items() if k not in ("search_wall_time", "file_bytes") and "latency" not in k}
            for r in csv.DictReader((out / "compare.csv").open())
        ]
    assert [r["method"] for r in rows["serial"]] == ["random", "uniform"]
    assert rows["parallel"] == rows["serial"]


def test_an_ajpq_row_says_what_each_search_phase_found(tmp_path):
    """The row (and so ``bench_quality``'s JSON) carries the run's best episode per phase; the CSV keeps its
    columns; the table names the reference weights and software."""
    import json

    from ajpq.compare import COLUMNS, run_compare
    from ajpq.runs import RunDir

    out = tmp_path / "cmp"
    config = CompareConfig.from_dict(
        {"methods": ["ajpq"], "budgets": ["1/16"], "episodes": 6, "finetune_epochs": 0, "out_dir": str(out)}
    )
    result = run_compare(config)
    (row,) = result["rows"]
    # the table names the reference it was measured against: the digest the search's run.json recorded
    digest = RunDir(out / "ajpq__1_16").read_info()["weights_digest"]
    assert result["reference"]["weights_digest"] == digest
    assert f"Reference weights digest {digest}; measured with ajpq " in (out / "compare.md").read_text()
    records = RunDir(out / "ajpq__1_16").read_episodes()
    assert {r["phase"] for r in records} == set(row["best_by_phase"]) == {"warm_start", "rl", "refine"}
    for phase, found in row["best_by_phase"].items():
        top = max(r["reward"] for r in records if r["phase"] == phase and r["feasible"])
        first = next(r for r in records if r["phase"] == phase and r["feasible"] and r["reward"] == top)
        assert found == {"episode": first["episode"], "reward": top, "accuracy": first["accuracy"]}
    assert json.loads(json.dumps(row))["best_by_phase"] == row["best_by_phase"]
    header = (out / "compare.csv").read_text().splitlines()[0].split(",")
    assert header == [*COLUMNS, "note"]
