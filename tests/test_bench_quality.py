"""experiments/bench_quality.py: which compare runs a benchmark launches (the runs themselves are stubbed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from experiments_scripts import load_experiment


@pytest.mark.parametrize(("seeds_given", "expected"), [(False, [0]), (True, [0, 1])])
def test_resnet20_seed_limit_yields_to_listed_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seeds_given: bool, expected: list[int]
) -> None:
    """ResNet-20's one-seed limit holds for the default seeds; `--seed-list 0 1` runs both (it used to skip seed 1
    silently); seeds after the first run the searches only."""
    bench = load_experiment("bench_quality")
    launched: list[tuple[int, list[str]]] = []

    def fake_compare(config: Any, backend: Any = None) -> dict[str, Any]:
        launched.append((config.seed, list(config.methods)))
        return {"fp32": {"test": 0.9}, "rows": []}

    monkeypatch.setattr(bench, "run_compare", fake_compare)
    runs = bench.suites(quick=False, episodes=None, proxy_steps=10)["resnet20"]
    bench.run_compare_suite("resnet20", runs, [0, 1], tmp_path, seeds_given=seeds_given)
    assert [seed for seed, _ in launched] == expected
    assert launched[0][1] == ["ajpq", "local", "random", "uniform", "opq", "olmp", "admm"]
    if seeds_given:
        assert launched[1][1] == ["ajpq", "local", "random"]


def test_the_table_names_the_reference_each_suite_was_measured_against(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A README number repeats only on the reference it was measured on: the suite keeps compare's reference record
    (weights digest, versions, device) and the markdown says it under the suite's heading."""
    bench = load_experiment("bench_quality")
    reference = {"weights_digest": "afd5e70aa7a597c4", "ajpq": "0", "torch": "2.15.0+cu132", "device": "cpu"}
    monkeypatch.setattr(
        bench, "run_compare", lambda config, backend=None: {"fp32": {"test": 0.9}, "rows": [], "reference": reference}
    )
    runs = bench.suites(quick=False, episodes=None, proxy_steps=10)["resnet20"]
    suite = bench.run_compare_suite("resnet20", runs, [0], tmp_path)
    assert suite["reference"] == reference
    text = bench.markdown({"mode": "full", "wall_time_s": 1.0, "suites": {"resnet20": suite}})
    assert "## resnet20 (FP32 test 0.9000)" in text
    assert "Reference weights digest afd5e70aa7a597c4, torch 2.15.0+cu132, on cpu." in text
