"""Files a user receives must never run code: crafted artifact headers and crafted run-folder checkpoints."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ajpq import load_compressed
from ajpq.analysis import analyze_model
from ajpq.artifact import _PREAMBLE, ARTIFACT_VERSION, MAGIC, PREAMBLE_BYTES
from ajpq.cli import main
from ajpq.errors import ArtifactError
from ajpq.models import build_model
from ajpq.policy import Policy

EVIL_MODULE = """
from pathlib import Path

Path(__file__).with_name("MARKER").write_text("code from a received file ran")


def build(num_classes):
    raise RuntimeError("factory called")
"""


@pytest.fixture(scope="module")
def artifact_data() -> bytes:
    from nets import digits_artifact_bytes

    return digits_artifact_bytes()


def crafted(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """The artifact with its header edited and both checksum fields recomputed (what an attacker can do)."""
    (length,) = _PREAMBLE.unpack_from(data)[3:4]
    header = json.loads(data[PREAMBLE_BYTES : PREAMBLE_BYTES + length])
    payload = data[PREAMBLE_BYTES + length :]
    edit(header)
    raw = json.dumps(header).encode("utf-8")
    preamble = _PREAMBLE.pack(MAGIC, ARTIFACT_VERSION, 0, len(raw), hashlib.sha256(raw).digest())
    return preamble + raw + payload


def _named(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda header: header["model"].update(name=name)


@pytest.fixture
def evil_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "ajpq_evil_factory.py").write_text(textwrap.dedent(EVIL_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_artifact_naming_a_module_does_not_import_it(artifact_data: bytes, evil_dir: Path, capsys) -> None:
    path = evil_dir / "evil.ajpq"
    path.write_bytes(crafted(artifact_data, _named("ajpq_evil_factory:build")))
    with pytest.raises(ArtifactError, match=r"neither a zoo nor a torchvision model; code named in a file"):
        load_compressed(path)
    code = main(["evaluate", "--artifact", str(path), "--json"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "is never imported" in captured.err
    assert not (evil_dir / "MARKER").exists()
    assert "ajpq_evil_factory" not in sys.modules


def test_a_users_own_model_must_match_the_fingerprint(artifact_data: bytes, evil_dir: Path) -> None:
    path = evil_dir / "mine.ajpq"
    path.write_bytes(crafted(artifact_data, _named("mypackage.nets:small")))
    same = build_model("digits_cnn", (1, 8, 8), 10)
    slim = load_compressed(path, model=same)  # the user vouches for the code: same architecture, so it loads
    assert slim(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ArtifactError, match=r"fingerprint .* but the artifact was made from fingerprint"):
        load_compressed(path, model=build_model("lenet300", (1, 8, 8), 10))


@pytest.mark.parametrize(
    "edit,message",
    [
        (_named("this:s"), "neither a zoo nor a torchvision model"),
        (lambda header: header.pop("model"), "its header has no `model` record"),
        (lambda header: header["model"].update(input_shape="1x8x8"), "`model` record is malformed"),
        (lambda header: header.pop("layers"), r"malformed header \(`layers` must be a list of layer records"),
    ],
)
def test_crafted_headers_are_one_line_exit_2(artifact_data, tmp_path: Path, capsys, edit, message) -> None:
    path = tmp_path / "crafted.ajpq"
    path.write_bytes(crafted(artifact_data, edit))
    assert main(["evaluate", "--artifact", str(path), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # `import this` would print the Zen of Python here
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_artifacts_naming_abort_or_debugger_do_nothing(artifact_data: bytes, tmp_path: Path) -> None:
    """In a child process: were the names called, ``os.abort`` would kill it and ``pdb`` would wait on stdin."""
    paths = []
    for name in ("os:abort", "pdb:set_trace", "builtins:breakpoint"):
        path = tmp_path / f"{name.replace(':', '_')}.ajpq"
        path.write_bytes(crafted(artifact_data, _named(name)))
        paths.append(str(path))
    script = (
        "import sys\nfrom ajpq.cli import main\n"
        "codes = [main(['evaluate', '--artifact', p, '--json']) for p in sys.argv[1:]]\n"
        "print(codes)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[2, 2, 2]"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 3 and all("is never imported" in line for line in lines)


# --- run folders ------------------------------------------------------------------------------------------------

FAST = {"warmup_episodes": 2, "episodes_per_update": 2, "checkpoint_every": 2, "progress": False}


def _records(run: Path) -> list[dict[str, Any]]:
    from ajpq.runs import TIME_KEYS

    rows = [json.loads(line) for line in (run / "episodes.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in rows]


@pytest.mark.expensive
@pytest.mark.parametrize("agent", ["ppo", "ddpg"])
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, agent: str) -> None:
    from ajpq.runner import run_search
    from ajpq.search_config import SearchConfig

    # RL episodes only: a run's warm start and refinement are planned for the episode count it starts with, so a
    # finished shorter run continued to 8 episodes is not a run of 8 (test_search's kill test covers all phases)
    options = {**FAST, "layer_agent": agent, "channel_agent": agent, "seed": 1, "warm_start": False}
    options["refine_episodes"] = 0
    whole = run_search(SearchConfig(episodes=8, run_dir=str(tmp_path / "whole"), **options)).run_dir
    part = run_search(SearchConfig(episodes=4, run_dir=str(tmp_path / "part"), **options)).run_dir
    slot = next((part / "checkpoint").glob("ep*"))
    assert sorted(p.name for p in slot.iterdir()) == sorted(
        [f"{a}.pt" for a in ("layer_agent", "channel_agent")]
        + ([f"{a}_replay.npz" for a in ("layer_agent", "channel_agent")] if agent == "ddpg" else [])
    )
    assert main(["search", "--resume", str(part), "--episodes", "8", "--no-progress"]) == 0
    assert _records(part) == _records(whole)


class _Evil:
    """What an attacker pickles: unpickling it calls ``open(marker, "w")``, creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.expensive
def test_crafted_checkpoint_files_do_not_run_on_resume(tmp_path: Path, capsys) -> None:
    import pickle

    from ajpq.runner import run_search
    from ajpq.search_config import SearchConfig

    run = run_search(
        SearchConfig(episodes=2, layer_agent="ddpg", channel_agent="ppo", run_dir=str(tmp_path / "run"), **FAST)
    ).run_dir
    slot = next((run / "checkpoint").glob("ep*"))
    marker = tmp_path / "MARKER"
    evil = pickle.dumps(_Evil(marker))
    for old_name in ("layer_agent.zip", "channel_agent.zip", "layer_agent_replay.pkl"):
        (slot / old_name).write_bytes(evil)  # the file names SB3's own format used: never read
    assert main(["search", "--resume", str(run), "--episodes", "4", "--no-progress"]) == 0
    assert not marker.exists()
    slot = next((run / "checkpoint").glob("ep*"))
    cases = [
        ("layer_agent.pt", lambda path: torch.save({"policy": _Evil(marker)}, path), "not a plain-tensor checkpoint"),
        ("channel_agent.pt", lambda path: path.write_bytes(evil), "not a plain-tensor checkpoint"),
        ("layer_agent_replay.npz", lambda path: path.write_bytes(evil), "not a replay buffer of this run"),
    ]
    for name, plant, message in cases:
        original = (slot / name).read_bytes()
        plant(slot / name)
        capsys.readouterr()
        assert main(["search", "--resume", str(run), "--episodes", "6", "--no-progress"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and message in err[0] and name in err[0], err
        assert not marker.exists()
        (slot / name).write_bytes(original)
    assert len(_records(run)) == 4  # the refused resumes recorded nothing


def test_run_folder_lock_changed_settings_and_finished_runs(tmp_path: Path, capsys) -> None:
    import os

    from ajpq.runs import RunDir

    run = tmp_path / "run"
    flags = ["--warmup-episodes", "2", "--episodes-per-update", "2", "--checkpoint-every", "2", "--no-progress"]
    assert main(["search", "--episodes", "4", "--run-dir", str(run), *flags]) == 0
    out = capsys.readouterr().out
    fp32 = json.loads((run / "run.json").read_text())["fp32_accuracy_val"]
    best = (run / "best_policy.json").read_bytes()
    reward = json.loads(best)["metrics"]["reward"]
    assert f"best reward {reward:+.4f} at episode" in out
    assert f"against FP32 {fp32:.4f} (reward = val accuracy change against FP32)" in out
    assert f"tensorboard --logdir {run / 'tb'}" in out
    assert f"ajpq finetune --model digits_cnn --dataset digits --policy {run / 'best_policy.json'}" in out
    assert "ajpq export-model --model digits_cnn --dataset digits --weights finetuned.pt --out model.ajpq" in out
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file() and p.name != "run.lock"}

    def refused(*argv: str) -> str:
        capsys.readouterr()
        assert main(["search", *argv, "--no-progress"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1, err
        return err[0]

    holder = RunDir(run)
    holder.lock()  # another process holding the folder (flock conflicts between two open files, even in one process)
    message = refused("--resume", str(run), "--episodes", "8")
    assert f"run folder {run} is in use by another ajpq process (pid {os.getpid()})" in message
    holder.unlock()

    message = refused("--resume", str(run), "--size-budget", "0.5", "--model", "lenet5")
    assert "size_budget 0.1 -> 0.5" in message and "model 'digits_cnn' -> 'lenet5'" in message
    assert "only a higher --episodes is allowed" in message
    assert "episodes 4 -> 2" in refused("--resume", str(run), "--episodes", "2")

    capsys.readouterr()
    assert main(["search", "--resume", str(run), "--no-progress"]) == 0
    assert f"run {run} already finished its 4 episodes; nothing changed" in capsys.readouterr().out
    assert (run / "best_policy.json").read_bytes() == best
    meta = json.loads(best)["meta"]
    assert meta["dataset"] == "digits" and meta["budget"] == {"size": 0.1, "bops": None}
    after = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file() and p.name != "run.lock"}
    assert after == before
    assert len(_records(run)) == 4


@pytest.mark.expensive
def test_ctrl_c_before_the_first_checkpoint_resumes_where_it_stopped(tmp_path: Path) -> None:
    import signal
    import time

    run = tmp_path / "run"
    flags = ["--warmup-episodes", "2", "--episodes-per-update", "2", "--checkpoint-every", "100", "--no-progress"]
    command = [sys.executable, "-m", "ajpq.cli", "search", "--episodes", "24", "--run-dir", str(run), *flags]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (
        (run / "episodes.jsonl").is_file() and len((run / "episodes.jsonl").read_text().splitlines()) >= 3
    ):
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    recorded = len(_records(run))
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["episode"] == recorded >= 3  # checkpointed exactly where it stopped, before the first periodic one
    assert "continue with `ajpq search --resume" in err
    assert recorded < 24
    assert main(["search", "--resume", str(run), "--no-progress"]) == 0
    assert [row["episode"] for row in _records(run)] == list(range(1, 25))
    policies = [json.loads(line)["episode"] for line in (run / "policies.jsonl").read_text().splitlines()]
    assert policies == list(range(1, 25))


# --- one clear line, exit 2 --------------------------------------------------------------------------------------


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if " error: " in line]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "content,message",
    [
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply to be a policy file"),
        ('{"format": "ajpq-policy", "layers": "\xe9t\xe9"}'.encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset"),
    ],
)
def test_unreadable_policy_files(tmp_path: Path, capsys, content: bytes, message: str) -> None:
    path = tmp_path / "policy.json"
    path.write_bytes(content)
    assert main(["evaluate", "--policy", str(path)]) == 2
    assert message in _one_error_line(capsys)


def test_bad_config_values_and_folders(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("default:\n  data_dir: 123\n")
    assert main(["search", "--config", str(config)]) == 2
    assert "data_dir must be a path (a string) or null, but got 123" in _one_error_line(capsys)
    config.write_text("default:\n  size_budget: [0.1\n  seed: 1\n")
    assert main(["search", "--config", str(config)]) == 2
    assert "not valid YAML" in _one_error_line(capsys)  # PyYAML's multi-line message, joined on one line
    assert main(["evaluate", "--weights", str(tmp_path)]) == 2
    assert f"weights file {tmp_path} is a folder" in _one_error_line(capsys)


def test_run_dir_that_cannot_be_created(capsys) -> None:
    argv = ["search", "--run-dir", "/proc/ajpq-run/x", "--episodes", "2", "--warmup-episodes", "2", "--no-progress"]
    assert main(argv) == 2
    assert "cannot create run folder /proc/ajpq-run/x" in _one_error_line(capsys)


@pytest.mark.expensive
def test_full_disk_during_a_search(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import ajpq.io

    real_fdopen = ajpq.io.os.fdopen

    class FullDisk:
        """A file that takes 100 bytes, then fails as a full disk does."""

        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def write(self, data: bytes) -> int:
            self.handle.write(data[:100])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.handle, name)

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        handle = real_fdopen(fd, *args, **kwargs)
        return FullDisk(handle) if "checkpoint/ep000004" in os.readlink(f"/proc/self/fd/{fd}") else handle

    import os

    monkeypatch.setattr(ajpq.io.os, "fdopen", fdopen)
    run = tmp_path / "run"
    argv = ["search", "--episodes", "6", "--run-dir", str(run), "--no-progress", "--layer-agent", "ddpg"]
    flags = ["--warmup-episodes", "2", "--episodes-per-update", "2", "--checkpoint-every", "2", "--no-warm-start"]
    assert main([*argv, *flags]) == 2
    message = _one_error_line(capsys)
    assert "No space left on device" in message and f"ajpq search --resume {run}" in message
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["episode"] == 2  # the last whole checkpoint
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written left behind
    assert sorted(p.name for p in (run / "checkpoint" / state["slot"]).iterdir()) == [
        "channel_agent.pt",
        "layer_agent.pt",
        "layer_agent_replay.npz",
    ]
    monkeypatch.setattr(ajpq.io.os, "fdopen", real_fdopen)
    assert main(["search", "--resume", str(run), "--no-progress"]) == 0
    assert [row["episode"] for row in _records(run)] == list(range(1, 7))


def test_failed_download_leaves_no_empty_folders(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import torchvision.datasets.mnist

    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    data = tmp_path / "data"
    data.mkdir()
    (data / "keep").mkdir()
    assert main(["evaluate", "--dataset", "mnist", "--model", "lenet5", "--data-dir", str(data)]) == 2
    message = _one_error_line(capsys)
    assert "mnist not found" in message and "downloading into" in message
    assert sorted(p.name for p in data.rglob("*")) == ["keep"]  # no empty MNIST/raw behind


# --- small things -----------------------------------------------------------------------------------------------


def test_fractions_are_read_wherever_a_ratio_is(tmp_path: Path, capsys) -> None:
    from ajpq.budget import Budget, parse_ratio
    from ajpq.cli import build_parser
    from ajpq.cli.search import config_from_args

    args = build_parser().parse_args(
        ["search", "--size-budget", "1/16", "--bops-budget", "3/8", "--max-sparsity", "1/2"]
    )
    config = config_from_args(args)
    assert (config.size_budget, config.bops_budget, config.max_sparsity) == (0.0625, 0.375, 0.5)
    yaml_config = tmp_path / "c.yaml"
    yaml_config.write_text("default:\n  size_budget: 1/32\n")
    assert config_from_args(build_parser().parse_args(["search", "--config", str(yaml_config)])).size_budget == 1 / 32
    assert Budget(size="1/4").size == 0.25 and parse_ratio("budgets", "1/16") == 0.0625
    assert main(["search", "--size-budget", "3/2"]) == 2
    assert "size_budget must be in (0, 1], but got 1.5" in _one_error_line(capsys)
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal: exit 2 with usage
        main(["search", "--size-budget", "1/0"])
    assert exit_info.value.code == 2
    assert "expected a ratio such as 0.05, 1/16 or 'none', but got '1/0'" in capsys.readouterr().err


def test_bit_allocation_figure_is_readable(tmp_path: Path) -> None:
    import io as bytes_io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator

    from ajpq.runs import RunDir

    model = build_model("digits_cnn", (1, 8, 8), 10)
    analysis = analyze_model(model, (1, 8, 8), model_name="digits_cnn")
    policy = Policy.uniform(analysis)
    policy.layers["conv2"].weight_bits = np.array([0, 8] * 16)
    importance = {name: np.arange(len(layer.weight_bits), dtype=float) for name, layer in policy.layers.items()}
    from ajpq.runs import bit_allocation_figure

    figure = bit_allocation_figure(policy, importance)
    axes = figure.axes[0]
    assert [label.get_text() for label in axes.get_yticklabels()] == list(policy.layers)
    shown = np.ma.filled(axes.images[0].get_array(), -1)
    assert list(shown[1, :4]) == [8, 0, 8, 0]  # conv2's channels, most important (index 31) first
    assert shown[0, 16] == -1  # conv1 has 16 channels: the rest of its row is empty
    run = RunDir(tmp_path)
    run.add_policy_summaries(policy, 1, importance=importance)
    run.close()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    image = Image.open(bytes_io.BytesIO(events.Images("best_policy/bits")[0].encoded_image_string))
    assert image.width >= 800 and image.height >= 200  # not a 512x40 strip


def test_commands_take_model_dataset_and_split_from_the_checkpoint(tmp_path: Path, capsys) -> None:
    from ajpq.checkpoint import save_checkpoint

    checkpoint = tmp_path / "ft.pt"
    model = build_model("lenet300", (1, 8, 8), 10)
    save_checkpoint(checkpoint, model, {"model": "lenet300", "dataset": "digits", "split_seed": 3})
    assert main(["evaluate", "--weights", str(checkpoint), "--json"]) == 0
    captured = capsys.readouterr()
    assert "--model lenet300 (from" in captured.err and "--split-seed 3 (from" in captured.err
    assert 0.0 <= json.loads(captured.out)["accuracy"] <= 1.0
    assert main(["evaluate", "--weights", str(checkpoint), "--model", "lenet5", "--split-seed", "1"]) == 2
    message = _one_error_line(capsys)
    assert (
        "contradicts --model lenet5 (the checkpoint records lenet300), --split-seed 1 (the checkpoint records 3)"
        in (message)
    )
    save_checkpoint(checkpoint, model, {"model": "os:abort", "dataset": "digits"})
    assert main(["evaluate", "--weights", str(checkpoint)]) == 2
    assert "was trained on model 'os:abort'; pass --model os:abort yourself" in _one_error_line(capsys)


def test_lenet5_on_the_default_dataset_names_the_datasets_that_fit(capsys) -> None:
    assert main(["inspect", "--model", "lenet5"]) == 2
    assert "use a dataset with larger images (--dataset mnist, fashion-mnist, cifar10 or cifar100)" in (
        _one_error_line(capsys)
    )


def test_cli_rebuilds_a_users_model_only_from_model_flag(artifact_data, evil_dir: Path, capsys, monkeypatch) -> None:
    import functools

    import ajpq.evaluation
    import ajpq.latency

    monkeypatch.setattr(ajpq.evaluation, "latency_report", functools.partial(ajpq.latency.latency_report, repeats=2))
    (evil_dir / "ajpq_test_mynet.py").write_text(
        "from ajpq.models import DigitsCNN\n\n\ndef build(num_classes, input_shape):\n"
        "    return DigitsCNN(*input_shape, num_classes)\n"
    )
    path = evil_dir / "mine.ajpq"
    path.write_bytes(crafted(artifact_data, _named("ajpq_test_mynet:build")))
    assert main(["evaluate", "--artifact", str(path), "--json"]) == 2
    assert "pass the model yourself (`--model package.module:factory`" in _one_error_line(capsys)
    assert main(["evaluate", "--artifact", str(path), "--model", "ajpq_test_mynet:build", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["payload_bytes"] + report["header_bytes"] == path.stat().st_size and 0 <= report["accuracy"] <= 1
    assert main(["evaluate", "--artifact", str(path), "--model", "ajpq_evil_factory:build"]) == 2  # the user's choice
    assert "factory called" in _one_error_line(capsys)
