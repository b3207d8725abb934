"""A search killed in any phase (warm start, RL, refinement) redoes at most ``checkpoint_every`` episodes on resume,
and the resumed run records what an uninterrupted one records (issue 25); ``local`` is ajpq without its agents
(issue 27)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ajpq.callbacks import Recorder
from ajpq.errors import ConfigError
from ajpq.runner import run_search
from ajpq.runs import TIME_KEYS, RunDir
from ajpq.search_config import SearchConfig

EVERY = 2
OPTIONS: dict[str, Any] = {
    "episodes": 20,
    "seed": 3,
    "checkpoint_every": EVERY,
    "episodes_per_update": 2,
    "refine_episodes": 6,
    "progress": False,
}


class Killed(BaseException):
    """What ``kill -9`` does to the search after an episode is written: nothing more happens in the process."""


def _records(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in RunDir(run).read_episodes()]


def _kill_after(monkeypatch: pytest.MonkeyPatch, episode: int) -> None:
    record = Recorder.record

    def dying(self: Recorder, *args: Any, **kwargs: Any) -> dict[str, Any]:
        written = record(self, *args, **kwargs)
        if self.episode == episode:
            raise Killed
        return written

    monkeypatch.setattr(Recorder, "record", dying)


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("whole")
    return {
        method: _records(run_search(SearchConfig(method=method, run_dir=str(root / method), **OPTIONS)).run_dir)
        for method in ("ajpq", "local")
    }


@pytest.mark.parametrize(
    "method,killed_after,phase",
    [
        ("ajpq", 3, "warm_start"),
        pytest.param("ajpq", 11, "rl", marks=pytest.mark.expensive),
        ("ajpq", 17, "refine"),
        pytest.param("local", 3, "warm_start", marks=pytest.mark.expensive),
        pytest.param("local", 11, "refine", marks=pytest.mark.expensive),
    ],
)
def test_a_kill_in_any_phase_redoes_at_most_checkpoint_every_episodes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    whole: dict[str, list[dict[str, Any]]],
    method: str,
    killed_after: int,
    phase: str,
) -> None:
    run = tmp_path / "run"
    assert whole[method][killed_after - 1]["phase"] == phase  # the kill falls in the phase named
    _kill_after(monkeypatch, killed_after)
    with pytest.raises(Killed):
        run_search(SearchConfig(method=method, run_dir=str(run), **OPTIONS))
    monkeypatch.undo()
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["method_state"]["phase"]["name"] == ("rl" if phase == "rl" else phase)
    redone = killed_after - state["episode"]
    assert 0 <= redone < EVERY

    recorded: list[int] = []
    record = Recorder.record

    def counting(self: Recorder, *args: Any, **kwargs: Any) -> dict[str, Any]:
        recorded.append(self.episode + 1)
        return record(self, *args, **kwargs)

    monkeypatch.setattr(Recorder, "record", counting)
    run_search(SearchConfig(method=method, run_dir=str(run), **OPTIONS), resume=run)
    assert recorded == list(range(state["episode"] + 1, OPTIONS["episodes"] + 1))  # nothing recorded twice
    assert _records(run) == whole[method]  # and the same episodes as the uninterrupted run


def test_local_is_the_warm_start_and_the_refinement_of_ajpq(whole: dict[str, list[dict[str, Any]]]) -> None:
    ajpq, local = whole["ajpq"], whole["local"]
    warm = [r for r in ajpq if r["phase"] == "warm_start"]
    assert warm and [r for r in local if r["phase"] == "warm_start"] == warm  # the same start, evaluated alike
    assert {r["phase"] for r in local} == {"warm_start", "refine"} and len(local) == OPTIONS["episodes"]
    assert "rl" in {r["phase"] for r in ajpq}


def test_local_without_a_warm_start_is_refused(tmp_path: Path) -> None:
    config = SearchConfig(method="local", run_dir=str(tmp_path / "r"), **{**OPTIONS, "warm_start": False})
    with pytest.raises(ConfigError, match="method 'local' climbs from the warm start's best policy"):
        run_search(config)


def test_rl_episodes_that_reach_a_known_policy_are_rolled_again_not_evaluated(tmp_path: Path) -> None:
    """At 2% of the size, different action sequences often project onto one policy (4 of 40 recorded episodes
    repeated an earlier one before skip_known): now the agents learn from the repeat at its known reward and roll
    again, and every recorded policy is new unless its episode ran out of rerolls."""
    from ajpq.envs.core import policy_key
    from ajpq.methods.rl import MAX_REROLLS

    config = SearchConfig(
        size_budget=0.02, episodes=40, seed=0, refine_episodes=0, progress=False, run_dir=str(tmp_path / "r")
    )
    run = RunDir(run_search(config).run_dir)
    rows, policies = run.read_episodes(), run.read_policies(None, None)
    assert sum(row.get("rerolls", 0) for row in rows) > 0
    seen: set[bytes] = set()
    for row in rows:
        key = policy_key(policies[row["episode"]])
        assert key not in seen or row.get("rerolls") == MAX_REROLLS, row
        seen.add(key)
