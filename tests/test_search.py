"""``ajpq search`` / ``ajpq export``: run folder, best policy within budget, TensorBoard, agents, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ajpq.cli import main
from ajpq.cost import CostModel
from ajpq.policy import load_policy
from ajpq.runner import run_search
from ajpq.runs import TIME_KEYS, RunDir
from ajpq.search_config import SearchConfig
from ajpq.workspace import WorkspaceSpec, open_workspace

FAST = {"warmup_episodes": 2, "episodes_per_update": 2, "checkpoint_every": 4, "progress": False}


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "episodes.jsonl").read_text().splitlines()]


def test_short_search_writes_valid_best_policy_and_tensorboard(tmp_path: Path) -> None:
    config = SearchConfig(episodes=8, size_budget=0.08, run_dir=str(tmp_path / "run"), **FAST)
    result = run_search(config)
    run = result.run_dir
    rows = _lines(run)
    assert [r["episode"] for r in rows] == list(range(1, 9))
    assert {"reward", "accuracy", "size_ratio", "bops_ratio", "feasible", "wall_time"} <= set(rows[0])
    workspace = open_workspace(WorkspaceSpec(), progress=False)
    policy = load_policy(run / "best_policy.json", workspace.analysis)
    assert CostModel(workspace.analysis).evaluate(policy).size_ratio <= 0.08
    assert policy.metrics["reward"] == max(r["reward"] for r in rows if r["feasible"])

    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("search/reward", "search/best_reward", "search/accuracy", "search/size_ratio", "search/bops_ratio"):
        assert tag in scalars
    assert "time/episodes_per_s" in scalars
    assert any(t.startswith("layer_agent/train/") for t in scalars)
    assert any(t.startswith("channel_agent/train/") for t in scalars)
    assert "best_policy/bits" in acc.Tags()["images"] and "best_policy/weight_bits" in acc.Tags()["histograms"]

    out = tmp_path / "exported.json"
    assert main(["export", "--run", str(run), "--episode", "3", "--out", str(out)]) == 0
    assert load_policy(out, workspace.analysis).metrics["episode"] == 3


def _phase_bests(rows: list[dict]) -> dict[str, tuple[int, float]]:
    """Per phase, (episode, accuracy) of the feasible episode with the highest reward, the earliest of equals."""
    bests: dict[str, tuple[int, float]] = {}
    for phase in {r["phase"] for r in rows}:
        feasible = [r for r in rows if r["phase"] == phase and r["feasible"]]
        top = min(feasible, key=lambda r: (-r["reward"], r["episode"]))
        bests[phase] = (top["episode"], top["accuracy"])
    return bests


def test_the_summary_says_what_each_search_phase_found(tmp_path: Path, capsys) -> None:
    """Warm start, RL episodes and refinement each get their best val accuracy, over the resumed run as a whole."""
    run = tmp_path / "run"
    flags = ["--episodes-per-update", "2", "--checkpoint-every", "4", "--size-budget", "0.08", "--no-progress"]
    assert main(["search", "--episodes", "8", "--run-dir", str(run), *flags]) == 0
    out = capsys.readouterr().out
    bests = _phase_bests(_lines(run))
    assert set(bests) == {"warm_start", "rl", "refine"}
    names = {"warm_start": "warm start", "rl": "RL episodes", "refine": "refinement"}
    parts = [f"{names[p]} {bests[p][1]:.4f} (episode {bests[p][0]})" for p in ("warm_start", "rl", "refine")]
    best_episode = json.loads((run / "best_policy.json").read_text())["metrics"]["episode"]
    source = next(names[p] for p in ("warm_start", "rl", "refine") if bests[p][0] == best_episode)
    line = f"best val accuracy by phase: {', '.join(parts)}; the best policy came from the {source}"
    assert line in out.splitlines(), out

    assert main(["search", "--resume", str(run), "--episodes", "10", "--json", *flags[-1:]]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = _lines(run)
    assert len(rows) == 10
    expected = {phase: {"episode": e, "accuracy": a} for phase, (e, a) in _phase_bests(rows).items()}
    got = {
        phase: {k: v for k, v in found.items() if k != "reward"} for phase, found in summary["best_by_phase"].items()
    }
    assert got == expected and "warm_start" in got  # the episodes before the resume count too

    assert main(["search", "--resume", str(run), "--episodes", "10", "--json", *flags[-1:]]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["already_finished"] and again["best_by_phase"] == summary["best_by_phase"]


def test_a_weight_sparsity_search_starts_from_opq_and_finds_sparse_policies_within_budget(tmp_path: Path) -> None:
    config = SearchConfig(
        episodes=16,
        size_budget=None,
        bops_budget=1 / 64,
        search_weight_sparsity=True,
        run_dir=str(tmp_path / "run"),
        **FAST,
    )
    run = run_search(config).run_dir
    rows = _lines(run)
    assert all(r["bops_ratio"] <= 1 / 64 for r in rows)
    workspace = open_workspace(WorkspaceSpec(), progress=False)
    run_dir = RunDir.open(run)
    policies = [run_dir.read_policy(r["episode"], "digits_cnn", None) for r in rows]
    warm = [p for p, r in zip(policies, rows, strict=True) if r["phase"] == "warm_start"]
    assert any(layer.weight_sparsity > 0 for p in warm for layer in p.layers.values())  # OPQ's allocation
    rl = [p for p, r in zip(policies, rows, strict=True) if r["phase"] == "rl"]
    assert len({layer.weight_sparsity for p in rl for layer in p.layers.values()}) > 3  # the agent picks them
    best = load_policy(run / "best_policy.json", workspace.analysis)
    assert workspace.cost_model.evaluate(best).bops_ratio <= 1 / 64


@pytest.mark.parametrize("layer,channel", [("ppo", "ppo"), ("ppo", "ddpg"), ("ddpg", "ppo"), ("ddpg", "ddpg")])
def test_every_agent_combination_runs(tmp_path: Path, layer: str, channel: str) -> None:
    config = SearchConfig(episodes=4, layer_agent=layer, channel_agent=channel, run_dir=str(tmp_path / "run"), **FAST)
    result = run_search(config)
    assert result.episode_count == 4 and result.best is not None


def test_same_seed_same_episodes(tmp_path: Path) -> None:
    runs = [run_search(SearchConfig(episodes=6, seed=3, run_dir=str(tmp_path / f"r{i}"), **FAST)) for i in (0, 1)]
    strip = [[{k: v for k, v in r.items() if k not in TIME_KEYS} for r in _lines(x.run_dir)] for x in runs]
    assert strip[0] == strip[1]


def test_impossible_budget_is_refused_before_searching(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["search", "--size-budget", "0.0001", "--run-root", str(tmp_path), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot be met" in err and "smallest achievable size ratio" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv,message",
    [
        (["search", "--size-budget", "1.7"], r"size_budget must be in (0, 1], but got 1.7"),
        (["search", "--episodes", "0"], "episodes must be an integer >= 1"),
        (["search", "--max-weight-sparsity", "1"], "max_weight_sparsity must be in [0, 1), but got 1.0"),
        (["search", "--resume", "/nonexistent/run"], "no such run folder"),
        (["export", "--run", "/nonexistent/run", "--out", "x.json"], "no such run folder"),
    ],
)
def test_bad_inputs_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_config_file_keys_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "x.yaml"
    config.write_text("default:\n  size_budgt: 0.1\n")
    assert main(["search", "--config", str(config)]) == 2
    assert "did you mean 'size_budget'" in capsys.readouterr().err


def test_resume_after_kill(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "ajpq.cli",
        "search",
        "--episodes",
        "40",
        "--warmup-episodes",
        "2",
        "--episodes-per-update",
        "2",
        "--checkpoint-every",
        "4",
        "--run-dir",
        str(run),
        "--no-progress",
    ]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        state = run / "checkpoint" / "state.json"
        if state.is_file() and json.loads(state.read_text())["episode"] >= 4 and len(_lines(run)) >= 6:
            break
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    checkpointed = json.loads((run / "checkpoint" / "state.json").read_text())["episode"]
    assert checkpointed >= 4
    assert checkpointed < 40
    assert main(["search", "--resume", str(run), "--no-progress"]) == 0  # its own --episodes 40
    episodes = [r["episode"] for r in _lines(run)]
    assert episodes == list(range(1, 41))
    policies = [json.loads(line)["episode"] for line in (run / "policies.jsonl").read_text().splitlines()]
    assert policies == episodes
    load_policy(run / "best_policy.json")


def test_a_seed_gives_the_same_search_on_one_thread_and_on_two(tmp_path) -> None:
    """The agents are built and trained on AGENT_CPU_THREADS threads: orthogonal initialisation (a QR decomposition)
    and the PPO updates differ with the thread count, and a search chained them into a different run (digits at 0.05,
    seed 0: 0.9861 on one thread, 0.9896 on two, before the agents were pinned)."""
    before = torch.get_num_threads()
    lines = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            config = SearchConfig(
                size_budget=0.05, episodes=48, seed=0, progress=False, run_dir=str(tmp_path / f"t{threads}")
            )
            result = run_search(config)
            assert torch.get_num_threads() == threads
            lines[threads] = [
                {k: v for k, v in row.items() if k not in ("wall_time", "eval_time")}
                for row in RunDir(result.run_dir).read_episodes()
            ]
    finally:
        torch.set_num_threads(before)
    assert len(lines[1]) == 48 and lines[1] == lines[2]


def test_run_json_names_the_reference_and_resume_refuses_other_weights(tmp_path: Path, capsys) -> None:
    """A run records which FP32 weights and which software it was measured on; resuming it on other weights (the same
    path, other values) is refused before anything is truncated, and other software is only noted."""
    from ajpq.analysis import weights_digest
    from ajpq.checkpoint import save_checkpoint
    from ajpq.models import build_model

    torch.manual_seed(0)
    model = build_model("digits_cnn", (1, 8, 8), 10)
    weights = tmp_path / "ref.pt"
    save_checkpoint(weights, model, {"model": "digits_cnn", "dataset": "digits"})
    run = tmp_path / "run"
    workspace = WorkspaceSpec(weights=str(weights), device="cpu")
    run_search(SearchConfig(episodes=4, run_dir=str(run), workspace=workspace, **FAST))
    info = json.loads((run / "run.json").read_text())
    assert info["weights_digest"] == weights_digest(model)
    assert info["environment"]["torch"] == torch.__version__ and info["environment"]["device"] == "cpu"
    assert set(info["environment"]) >= {"ajpq", "python", "numpy", "gymnasium", "stable_baselines3"}

    # the same values saved again give the same digest; one changed weight another
    reloaded = build_model("digits_cnn", (1, 8, 8), 10)
    reloaded.load_state_dict(torch.load(weights, weights_only=True)["state_dict"])
    assert weights_digest(reloaded) == info["weights_digest"]
    with torch.no_grad():
        next(reloaded.parameters()).view(-1)[0] += 1e-3
    assert weights_digest(reloaded) != info["weights_digest"]

    save_checkpoint(weights, reloaded, {"model": "digits_cnn", "dataset": "digits"})
    before = (run / "episodes.jsonl").read_text()
    capsys.readouterr()
    assert main(["search", "--resume", str(run), "--episodes", "6", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"FP32 weights with digest {info['weights_digest']}" in err[0]
    assert "resume with the weights the run was made on" in err[0]
    assert (run / "episodes.jsonl").read_text() == before

    # the original weights back, a recorded torch version this install lacks: resumed, with one note
    save_checkpoint(weights, model, {"model": "digits_cnn", "dataset": "digits"})
    (run / "run.json").write_text(json.dumps({**info, "environment": {**info["environment"], "torch": "0.1"}}))
    assert main(["search", "--resume", str(run), "--episodes", "6", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"made with other software (torch 0.1 -> {torch.__version__})" in err
    assert [r["episode"] for r in _lines(run)] == list(range(1, 7))
