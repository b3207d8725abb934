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


def run_compare(tmp_path: Path, name: str, learn_ranges: str) -> Path:
    out = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        "default:\n  methods: [uniform, random]\n  budgets: ['1/16']\n  episodes: 3\n  finetune_epochs: 1\n"
        f"  search: {{search_activation_bits: true}}\n  learn_ranges: {learn_ranges}\n  out_dir: {out}\n"
    )
    assert ajpq_main(["compare", "--config", str(config), "--device", "cpu"]) == 0
    return out


def test_switched_retune_equals_a_compare_run_with_the_setting(tmp_path, capsys):
    script = load_script()
    folders = {setting: run_compare(tmp_path, setting, setting) for setting in ("auto", "true", "false")}
    after = {
        setting: {r["method"]: float(r["test_after"]) for r in csv.DictReader((folder / "compare.csv").open())}
        for setting, folder in folders.items()
    }
    fewest = {}
    for method in ("uniform", "random"):  # random searched the activation bits, too
        policy = json.loads((folders["auto"] / f"{method}__1_16" / "best_policy.json").read_text())
        fewest[method] = min(layer["activation_bits"] for layer in policy["layers"])
    assert fewest["uniform"] == 8 and fewest["random"] < 8
    # auto: uniform's 8-bit activations keep calibrated ranges, random's policy learns them
    assert after["auto"] == {"uniform": after["false"]["uniform"], "random": after["true"]["random"]}
    assert after["true"]["random"] != after["false"]["random"]
    threads = str(torch.get_num_threads())  # the compares ran in this process, with its threads
    capsys.readouterr()

    assert script.main(["--compare", str(folders["auto"]), "--switch", "learn_ranges", "--threads", threads]) == 0
    captured = capsys.readouterr()
    rows = {r["method"]: r for r in json.loads(captured.out)["rows"]}
    assert {method: (r["compare_recipe"], r["other_recipe"]) for method, r in rows.items()} == {
        "uniform": ("distilled", "distilled, learned ranges"),
        "random": ("distilled, learned ranges", "distilled"),
    }
    for method, row in rows.items():  # turned per policy: each row equals the compare run with the other choice
        assert row["test_compare"] == after["auto"][method]
        assert row["test_other"] == after["true" if method == "uniform" else "false"][method]
    assert "| auto | random | 1/16 | distilled, learned ranges |" in captured.err

    # `none` re-runs compare's own recipe: the same accuracies, and two folders give a median table
    argv = ["--compare", str(folders["true"]), str(folders["false"]), "--switch", "none", "--threads", threads]
    assert script.main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert all(r["test_other"] == r["test_compare"] for r in report["rows"])
    assert [(m["method"], m["runs"]) for m in report["medians"]] == [("uniform", 2), ("random", 2)]
    assert "| uniform | 1/16 | 2 |" in captured.err


def test_a_folder_that_is_not_a_finished_compare_is_one_line(tmp_path, capsys):
    script = load_script()
    assert script.main(["--compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path} is not a finished ajpq compare folder: compare_config.yaml is missing"
