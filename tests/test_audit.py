"""The holes of the hostile audit (issue 25), each reproduced: received files (run folders, configurations, policies,
checkpoints, artifacts, data folders) that ended in a traceback, a silent loss or an accepted bad value."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from ajpq.cli import main
from ajpq.errors import ArtifactError, ConfigError
from ajpq.runs import RunDir

SEARCH_FLAGS = ["--warmup-episodes", "2", "--episodes-per-update", "2", "--checkpoint-every", "2", "--no-progress"]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if " error: " in line]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-episode search (checkpointed after episode 4); copy it before damaging it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["search", "--episodes", "4", "--run-dir", str(run), *SEARCH_FLAGS]) == 0
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("run.lock"))
    return target


def _snapshot(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != "run.lock"
    }


# --- 1. silent data loss -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage,where",
    [
        (lambda lines: lines.__setitem__(1, "{not json"), "line 2: not valid JSON"),
        (lambda lines: lines.__setitem__(2, '{"episode": "3"}'), "line 3: not an episode record"),
        (lambda lines: lines.insert(1, ""), "line 2: not valid JSON"),
        (lambda lines: lines.__setitem__(0, '{"episode": 1' + "0" * 5000 + "}"), "line 1: holds a number of more"),
    ],
)
def test_a_damaged_episode_line_refuses_the_resume_and_rewrites_nothing(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any, where: str
) -> None:
    run = _copy(finished_run, tmp_path)
    lines = (run / "episodes.jsonl").read_text().splitlines()
    damage(lines)
    (run / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["search", "--resume", str(run), "--episodes", "6", "--no-progress"]) == 2
    message = _one_error_line(capsys)
    assert f"{run / 'episodes.jsonl'}, {where}" in message and "the run folder is damaged" in message, message
    assert _snapshot(run) == before


def test_a_damaged_policy_line_refuses_the_resume(finished_run: Path, tmp_path: Path, capsys) -> None:
    run = _copy(finished_run, tmp_path)
    lines = (run / "policies.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["bits"]["conv1"] = "9x"
    lines[1] = json.dumps(row)
    (run / "policies.jsonl").write_text("\n".join(lines) + "\n")
    before = _snapshot(run)
    assert main(["search", "--resume", str(run), "--episodes", "6", "--no-progress"]) == 2
    assert f"{run / 'policies.jsonl'}, episode 2: not a recorded policy" in _one_error_line(capsys)
    assert _snapshot(run) == before


@pytest.mark.expensive
def test_only_a_torn_last_line_is_dropped_on_resume(finished_run: Path, tmp_path: Path) -> None:
    run = _copy(finished_run, tmp_path)
    with (run / "episodes.jsonl").open("a") as handle:
        handle.write('{"episode": 5, "rew')  # killed mid-write
    assert main(["search", "--resume", str(run), "--episodes", "6", "--no-progress"]) == 0
    episodes = [json.loads(line)["episode"] for line in (run / "episodes.jsonl").read_text().splitlines()]
    policies = [json.loads(line)["episode"] for line in (run / "policies.jsonl").read_text().splitlines()]
    assert episodes == policies == [1, 2, 3, 4, 5, 6]


def test_torn_last_line_read_and_damage_elsewhere_refused(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    (tmp_path / "episodes.jsonl").write_text('{"episode": 1}\n{"episode": 2}\n{"episo')
    assert [r["episode"] for r in run.read_episodes()] == [1, 2]
    (tmp_path / "episodes.jsonl").write_bytes(b'{"episode": 1}\n\xff\xfe\n{"episode": 3}\n')
    with pytest.raises(ArtifactError, match=r"episodes.jsonl, line 2: not UTF-8 text"):
        run.read_episodes()


@pytest.mark.parametrize(
    "content,message",
    [
        (b'{"fingerprint": ', r"run.json: not valid JSON \(Expecting value"),
        (b"[1, 2]", r"run.json: expected a JSON object, but got list"),
        (b"\xff", r"run.json: not UTF-8 text"),
    ],
)
def test_damaged_run_json_is_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "run.json").write_bytes(content)
    with pytest.raises(ArtifactError, match=message):
        RunDir(tmp_path).read_info()


def test_config_that_is_not_utf8_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.yaml").write_bytes(b"default:\n  model: \xe9\n")
    with pytest.raises(ConfigError, match=r"config.yaml: not UTF-8 text \(byte 0xe9 at offset 18\)"):
        RunDir(tmp_path).read_config()
    assert main(["search", "--config", str(tmp_path / "config.yaml")]) == 2
    assert "--config" in _one_error_line(capsys)


def test_ctrl_c_before_the_first_episode_says_what_it_stops(tmp_path: Path, monkeypatch, caplog) -> None:
    import ajpq.runner
    from ajpq.runner import run_search
    from ajpq.search_config import SearchConfig

    def interrupted_measurement(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the measurement went on after Ctrl-C")

    monkeypatch.setattr(ajpq.runner, "load_or_measure", interrupted_measurement)
    caplog.set_level("INFO", logger="ajpq")
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run_search(SearchConfig(episodes=4, run_dir=str(tmp_path / "run"), progress=False))
    assert "interrupted: stopping the layer sensitivity measurement (no episode has started" in caplog.text
    assert "finishing this episode" not in caplog.text
    assert signal.getsignal(signal.SIGINT) is handler


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path, capsys) -> None:
    import tracemalloc

    levels = ['a0: &a0 ["lol"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = "default:\n  seed: 1\n" + "\n".join(levels) + "\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    tracemalloc.start()
    try:
        assert main(["search", "--config", str(path)]) == 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20
    assert "line 4 uses a YAML alias (*name)" in _one_error_line(capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(bomb)
    with pytest.raises(ConfigError, match="uses a YAML alias"):
        RunDir(run).read_config()
