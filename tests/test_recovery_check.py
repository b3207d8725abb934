"""experiments/recovery_check.py: re-tuning a finished compare with one recovery setting turned gives the row that a
compare run with that setting gives."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from experiments_scripts import load_experiment

from ajpq.cli import main as ajpq_main


def run_compare(tmp_path: Path, name: str, extra: str) -> Path:
    out = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        "default:\n  methods: [uniform]\n  budgets: ['1/16']\n  bops_budgets: ['1/64']\n  finetune_epochs: 1\n"
        f"  search: {{search_activation_bits: true}}\n{extra}  out_dir: {out}\n"
    )
    assert ajpq_main(["compare", "--config", str(config), "--device", "cpu"]) == 0
    return out


def test_switched_retune_equals_a_compare_run_with_the_setting(tmp_path, capsys):
    script = load_experiment("recovery_check")
    folders = {
        "learned": run_compare(tmp_path, "learned", ""),
        "plain": run_compare(tmp_path, "plain", "  learn_ranges: false\n"),
    }
    after = {
        name: {r["budget"]: float(r["test_after"]) for r in csv.DictReader((folder / "compare.csv").open())}
        for name, folder in folders.items()
    }
    assert all(after["learned"][budget] != after["plain"][budget] for budget in ("1/16", "BOPs 1/64"))
    threads = str(torch.get_num_threads())  # the compares ran in this process, with its threads
    capsys.readouterr()

    for name, other in (("plain", "learned"), ("learned", "plain")):
        assert script.main(["--compare", str(folders[name]), "--switch", "learn_ranges", "--threads", threads]) == 0
        captured = capsys.readouterr()
        rows = {r["budget"]: r for r in json.loads(captured.out)["rows"]}
        assert set(rows) == {"1/16", "BOPs 1/64"}
        for budget, row in rows.items():  # each equals the compare run with the other setting
            assert (row["test_compare"], row["test_other"]) == (after[name][budget], after[other][budget])
            recipes = ("distilled", "distilled, learned ranges")
            assert (row["compare_recipe"], row["other_recipe"]) == (recipes if name == "plain" else recipes[::-1])
    assert "| learned | uniform | BOPs 1/64 | distilled, learned ranges |" in captured.err

    # a folder from before the setting existed (no learn_ranges in its config) calibrated its ranges
    config = folders["plain"] / "compare_config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(True) if "learn_ranges" not in line))
    assert script.main(["--compare", str(folders["plain"]), "--switch", "none", "--threads", threads]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)["rows"]
    assert {r["compare_recipe"] for r in rows} == {"distilled"}
    assert all(r["test_other"] == r["test_compare"] for r in rows)  # `none` re-runs compare's own recipe

    argv = ["--compare", str(folders["learned"]), str(folders["plain"]), "--switch", "none", "--threads", threads]
    assert script.main(argv) == 0  # two folders: a median per method and budget
    captured = capsys.readouterr()
    assert [(m["budget"], m["runs"]) for m in json.loads(captured.out)["medians"]] == [("1/16", 2), ("BOPs 1/64", 2)]
    assert "| uniform | 1/16 | 2 |" in captured.err


def test_a_folder_that_is_not_a_finished_compare_is_one_line(tmp_path, capsys):
    script = load_experiment("recovery_check")
    assert script.main(["--compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path} is not a finished ajpq compare folder: compare_config.yaml is missing"
