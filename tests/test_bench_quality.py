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
    silently); seeds after the first run ajpq and random only."""
    bench = load_experiment("bench_quality")
    launched: list[tuple[int, list[str]]] = []

    def fake_compare(config: Any, backend: Any = None) -> dict[str, Any]:
        launched.append((config.seed, list(config.methods)))
        return {"fp32": {"test": 0.9}, "rows": []}

    monkeypatch.setattr(bench, "run_compare", fake_compare)
    runs = bench.suites(quick=False, episodes=None, proxy_steps=10)["resnet20"]
    bench.run_compare_suite("resnet20", runs, [0, 1], tmp_path, seeds_given=seeds_given)
    assert [seed for seed, _ in launched] == expected
    assert launched[0][1] == ["ajpq", "random", "uniform", "opq", "olmp", "admm"]
    if seeds_given:
        assert launched[1][1] == ["ajpq", "random"]
