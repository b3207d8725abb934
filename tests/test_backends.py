"""Evaluation backends: the same episodes with every backend and worker count, worker deaths, a two-node Ray run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ajpq.backends import LocalBackend, ProcessBackend, WorkerSpec
from ajpq.policy import Policy
from ajpq.proxy import ProxyOptions, make_evaluator
from ajpq.runner import run_search
from ajpq.runs import TIME_KEYS
from ajpq.search_config import SearchConfig
from ajpq.workspace import WorkspaceSpec, open_workspace

SEARCH = {
    "episodes": 8,
    "size_budget": 0.08,
    "warmup_episodes": 2,
    "episodes_per_update": 2,
    "checkpoint_every": 4,
    "progress": False,
}


def _episodes(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "episodes.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in rows]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    result = run_search(SearchConfig(run_dir=str(tmp_path_factory.mktemp("local") / "run"), **SEARCH))
    return _episodes(result.run_dir)


def _policies(workspace: Any) -> list[Policy]:
    policies = [Policy.uniform(workspace.analysis, bits, 8) for bits in (2, 3, 4)]
    pruned = Policy.uniform(workspace.analysis, 4, 8)
    first = next(iter(pruned.layers.values()))
    first.weight_bits[: first.weight_bits.size // 2] = 0
    return [*policies, pruned]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--backend", "processes", "--workers", "0"], "workers must be an integer >= 1, but got 0"),
        (["--ray-address", "auto"], "ray_address needs backend ray (add --backend ray)"),
    ],
)
def test_bad_backend_options_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    from ajpq.cli import main

    assert main(["search", *argv]) == 2
    assert message in capsys.readouterr().err


def test_identical_projected_policies_are_evaluated_once_per_search() -> None:
    from ajpq.budget import Budget
    from ajpq.envs import CompressionProblem

    workspace = open_workspace(WorkspaceSpec(), progress=False)
    evaluate = make_evaluator(workspace)
    seen: list[Policy] = []

    def counting(policy: Policy) -> float:
        seen.append(policy)
        return evaluate(policy)

    problem = CompressionProblem(workspace.analysis, counting, 0.9, budget=Budget(size=0.1))
    eight, two = Policy.uniform(workspace.analysis, 8, 8), Policy.uniform(workspace.analysis, 2, 8)
    # 8 bits everywhere is over 0.1 and is projected; its copy projects to the same policy
    first = problem.finish_many([eight, two, eight.copy(), two])
    assert len(seen) == 2 and problem.evaluations == 2
    assert first[0].projected and first[0].accuracy == first[2].accuracy == evaluate(first[0].policy)
    assert first[2].eval_time == 0.0 and first[3].eval_time == 0.0
    again = problem.finish(two.copy())
    assert len(seen) == 2 and again.accuracy == first[1].accuracy and again.reward == first[1].reward


def test_scores_do_not_depend_on_the_thread_count() -> None:
    workspace = open_workspace(WorkspaceSpec(), progress=False)
    evaluate = make_evaluator(workspace)
    before = torch.get_num_threads()
    try:
        scores = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            scores[threads] = [evaluate(p) for p in _policies(workspace)]
    finally:
        torch.set_num_threads(before)
    assert scores[1] == scores[2]
    assert len(set(scores[1])) > 1  # the policies really differ


def _wait_until_dead(pid: int, timeout: float = 30.0) -> None:
    """Until the killed worker is a zombie or gone (SIGKILL is asynchronous; a loaded machine takes its time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    raise AssertionError(f"worker {pid} still alive {timeout} s after SIGKILL")


def test_processes_backend_matches_local_and_survives_a_killed_worker() -> None:
    workspace = open_workspace(WorkspaceSpec(), progress=False)
    policies = _policies(workspace)
    expected = [e.accuracy for e in LocalBackend(make_evaluator(workspace)).evaluate_many(policies)]
    backend = ProcessBackend(WorkerSpec.from_workspace(workspace, ProxyOptions()), workers=2, threads=1)
    try:
        assert [e.accuracy for e in backend.evaluate_many(policies)] == expected
        victim = backend.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        _wait_until_dead(victim)
        assert [e.accuracy for e in backend.evaluate_many(policies[::-1])] == expected[::-1]
        assert backend.restarts == 1
        assert victim not in backend.worker_pids()
    finally:
        backend.close()


def test_workers_that_die_starting_end_in_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool whose workers die before they answer (here: while unpickling what they were sent) is restarted, and
    after MAX_RESTARTS the batch gives up with one message instead of hanging or leaking the pool's exception."""
    import dataclasses

    from nets import DiesInAWorker

    import ajpq.backends as backends

    monkeypatch.setattr(backends, "MAX_RESTARTS", 1)
    workspace = open_workspace(WorkspaceSpec(), progress=False)
    spec = WorkerSpec.from_workspace(workspace, ProxyOptions())
    spec = dataclasses.replace(spec, workspace=dataclasses.replace(spec.workspace, checkpoint={"x": DiesInAWorker()}))
    backend = ProcessBackend(spec, workers=2, threads=1)
    try:
        assert backend.worker_pids() == []
        with pytest.raises(RuntimeError, match="evaluation workers died 2 times in one batch; giving up"):
            backend.evaluate_many(_policies(workspace)[:2])
        assert backend.restarts == 1  # the pool it started with, then one new pool, then it gave up
    finally:
        backend.close()


def test_search_with_two_workers_and_a_killed_worker_writes_the_local_episodes(
    tmp_path: Path, local_run: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = ProcessBackend.evaluate_many

    def kill_one_worker_on_the_second_batch(self: ProcessBackend, policies: list[Policy]) -> Any:
        calls.append(len(policies))
        if len(calls) == 2:
            os.kill(self.worker_pids()[0], signal.SIGKILL)
        return original(self, policies)

    monkeypatch.setattr(ProcessBackend, "evaluate_many", kill_one_worker_on_the_second_batch)
    config = SearchConfig(run_dir=str(tmp_path / "run"), backend="processes", workers=2, **SEARCH)
    result = run_search(config)
    assert len(calls) >= 2
    rows = _episodes(result.run_dir)
    assert [r["episode"] for r in rows] == list(range(1, SEARCH["episodes"] + 1))
    assert rows == local_run


def test_resume_with_another_backend_continues_the_same_run(tmp_path: Path) -> None:
    # RL episodes only: a run's warm start and refinement are planned for the episode count it starts with
    rl_only = {**SEARCH, "warm_start": False, "refine_episodes": 0}
    whole = run_search(SearchConfig(run_dir=str(tmp_path / "whole"), **rl_only)).run_dir
    run = tmp_path / "run"
    run_search(SearchConfig(run_dir=str(run), **{**rl_only, "episodes": 4}))
    values = {**rl_only, "run_dir": str(run), "backend": "processes", "workers": 2}
    result = run_search(SearchConfig(**values), resume=run)
    assert _episodes(result.run_dir) == _episodes(whole)


ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ajpq[ray]')")


@pytest.mark.expensive
def test_search_on_a_local_ray_writes_the_local_episodes(tmp_path: Path, local_run: list[dict[str, Any]]) -> None:
    config = SearchConfig(run_dir=str(tmp_path / "run"), backend="ray", workers=2, **SEARCH)
    result = run_search(config)
    assert not ray.is_initialized()  # the backend stops the Ray it started
    assert _episodes(result.run_dir) == local_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_node(*args: str, temp_dir: str | None = None) -> subprocess.Popen:
    """A Ray node started with this interpreter (so its workers import this checkout's ajpq), in its own session."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus", "1", *args]
    if temp_dir is not None:
        command += ["--temp-dir", temp_dir]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(node: subprocess.Popen) -> None:
    if node.poll() is None:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


@pytest.mark.expensive
def test_two_node_ray_cluster_runs_actors_on_both_nodes(tmp_path: Path, local_run: list[dict[str, Any]]) -> None:
    from ajpq.backends import RayBackend

    port = _free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = tempfile.mkdtemp(prefix="ajpqray", dir="/tmp")
    nodes = [
        _ray_node(
            "--head",
            "--port",
            str(port),
            "--node-ip-address",
            "127.0.0.1",
            "--include-dashboard",
            "false",
            temp_dir=temp_dir,
        )
    ]
    try:
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run(
                [sys.executable, "-m", "ray.scripts.scripts", "status", "--address", address],
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, f"the Ray head did not come up: {probe.stderr[-400:]}"
            time.sleep(2)
        nodes.append(_ray_node("--address", address, "--node-ip-address", "127.0.0.1"))
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        while ray.cluster_resources().get("CPU", 0) < 2:
            assert time.monotonic() < deadline, "the second Ray node did not join"
            time.sleep(1)
        ray.shutdown()

        workspace = open_workspace(WorkspaceSpec(), progress=False)
        backend = RayBackend(WorkerSpec.from_workspace(workspace, ProxyOptions()), workers=2, address=address)
        try:
            assert len({node for node, _ in backend.where()}) == 2
            policies = _policies(workspace)
            expected = [e.accuracy for e in LocalBackend(make_evaluator(workspace)).evaluate_many(policies)]
            assert [e.accuracy for e in backend.evaluate_many(policies)] == expected
        finally:
            backend.close()
        config = SearchConfig(run_dir=str(tmp_path / "run"), backend="ray", workers=2, ray_address=address, **SEARCH)
        assert _episodes(run_search(config).run_dir) == local_run
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for node in reversed(nodes):
            _stop(node)
