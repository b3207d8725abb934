"""The score predictor the agents' proposals are screened with (``screen`` > 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ajpq.predictor import ScorePredictor, ranks, spearman
from ajpq.runner import run_search
from ajpq.runs import TIME_KEYS, RunDir
from ajpq.search_config import SearchConfig


def test_ranks_and_spearman_by_hand() -> None:
    assert ranks([3.0, 1.0, 2.0, 1.0]).tolist() == [3.0, 0.5, 2.0, 0.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = rank differences (0, 0, 1, -1): 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_the_ensemble_ranks_held_out_points_and_is_unsure_far_from_its_data() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0, 0.0]) + 0.05 * rng.normal(size=60)
    predictor = ScorePredictor(seed=1)
    predictor.fit(x[:40], y[:40])
    mean, spread = predictor.predict(x[40:])
    assert spearman(mean, y[40:]) > 0.95
    _, far = predictor.predict(x[40:] * 50)
    assert far.mean() > 10 * spread.mean()


def test_a_screened_search_records_its_episodes_and_repeats_from_its_seed(tmp_path: Path) -> None:
    def run(name: str) -> list[dict]:
        config = SearchConfig(
            size_budget=0.05, episodes=16, seed=2, screen=4, progress=False, run_dir=str(tmp_path / name)
        )
        rows = RunDir(run_search(config).run_dir).read_episodes()
        return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in rows]

    first = run("a")
    assert [r["episode"] for r in first] == list(range(1, 17))
    assert sum(r["phase"] == "rl" for r in first) >= 4
    assert run("b") == first
