"""experiments/recovery_check.py: re-tuning a finished compare with one recovery setting turned gives the row that a
compare run with that setting gives."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import torch

from ajpq.cli import main as ajpq_main


def load_script() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "experiments" / "recovery_check.py"
    spec = importlib.util.spec_from_file_location("recovery_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_compare(tmp_path: Path, name: str, learn_ranges: bool) -> Path:
    out = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        "default:\n  methods: [uniform]\n  budgets: ['1/16']\n  bops_budgets: ['1/64']\n  finetune_epochs: 1\n"
        f"  search: {{search_activation_bits: true}}\n  learn_ranges: {str(learn_ranges).lower()}\n"
        f"  out_dir: {out}\n"
    )
    assert ajpq_main(["compare", "--config", str(config), "--device", "cpu"]) == 0
    return out


def test_switched_retune_equals_a_compare_run_with_the_setting(tmp_path, capsys):
    script = load_script()
    plain = run_compare(tmp_path, "plain", learn_ranges=False)
    learned = run_compare(tmp_path, "learned", learn_ranges=True)
    threads = str(torch.get_num_threads())  # the compares ran in this process, with its threads
    capsys.readouterr()

    assert script.main(["--compare", str(plain), "--switch", "learn_ranges", "--threads", threads]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    rows = {r["budget"]: r for r in report["rows"]}
    assert set(rows) == {"1/16", "BOPs 1/64"}
    expected = {r["budget"]: r for r in csv.DictReader((learned / "compare.csv").open())}
    plain_rows = {r["budget"]: r for r in csv.DictReader((plain / "compare.csv").open())}
    for budget, row in rows.items():
        assert row["test_compare"] == float(plain_rows[budget]["test_after"])
        assert row["test_other"] == float(expected[budget]["test_after"])
        assert (row["compare_recipe"], row["other_recipe"]) == ("distilled", "distilled, learned ranges")
    assert "| plain | uniform | BOPs 1/64 |" in captured.err

    # `none` re-runs compare's own recipe: the same accuracies, and both folders give a median table
    assert script.main(["--compare", str(plain), str(learned), "--switch", "none", "--threads", threads]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert all(r["test_other"] == r["test_compare"] for r in report["rows"])
    assert [(m["budget"], m["runs"]) for m in report["medians"]] == [("1/16", 2), ("BOPs 1/64", 2)]
    assert "| uniform | 1/16 | 2 |" in captured.err


def test_a_folder_that_is_not_a_finished_compare_is_one_line(tmp_path, capsys):
    script = load_script()
    assert script.main(["--compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path} is not a finished ajpq compare folder: compare_config.yaml is missing"
