"""Recording a search: one :class:`Recorder` and a chain of callbacks (run folder, TensorBoard, progress).

Every method records the same way: each evaluated candidate is an :class:`~ajpq.envs.EpisodeResult` handed to
:meth:`Recorder.record`, which gives it its episode number, builds its one ``episodes.jsonl`` record (the same keys
for every method; ``reward`` always means the problem's reward: accuracy change against FP32, minus the soft-mode
penalty), keeps the best feasible episode, and tells the callbacks. A method whose answer is not one of its
candidates (OLMP and ADMM retrain the weights after their candidates) ends with :meth:`Recorder.final`.

The callbacks follow stable-baselines3's ``common/callbacks.py``: small classes with no-op hooks, called in order by
a :class:`CallbackList`; a new output (a CSV, a web hook) is a new callback, not a change to the loop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ajpq.policy import Policy
from ajpq.runs import RunDir

if TYPE_CHECKING:
    from ajpq.envs.core import EpisodeResult

BEST_KEYS: tuple[str, ...] = ("episode", "reward", "accuracy", "size_ratio", "bops_ratio")


def latency_field(report: Any) -> dict[str, float]:
    """``{"latency_ratio": ...}`` of a cost report with a predicted latency, else nothing (the records of a search
    without a latency budget stay as they were)."""
    ratio = report.latency_ratio
    return {} if ratio is None else {"latency_ratio": round(float(ratio), 8)}


"""The keys of an episode record kept as a run's best (plus ``compression_rate``)."""


@dataclass(frozen=True)
class RunInfo:
    """What every callback may need to know about the run (fixed for its whole length)."""

    method: str
    seed: int
    dataset: str
    budget: dict[str, float | None]
    fp32_accuracy: float
    episodes: int
    """Episodes the run will have when finished (the progress bar's total)."""
    start: int = 0
    """Episodes already recorded (a resumed run)."""
    importance: dict[str, np.ndarray] | None = None
    """Channel importance per layer, to draw a policy's channels in importance order."""


class SearchCallback:
    """Base class: override the hooks you need; each is called by the :class:`Recorder` in order."""

    def on_episode(self, record: dict[str, Any], result: EpisodeResult, wall: float) -> None:
        """An evaluated episode was recorded as ``record`` (its ``episodes.jsonl`` line)."""

    def on_best(self, policy: Policy, episode: int) -> None:
        """``policy`` (stamped with metrics and meta) is the run's new best, found at ``episode``."""

    def on_final(self, policy: Policy, episode: int) -> None:
        """The method's final answer (not one of its recorded candidates) replaces the best."""

    def on_end(self) -> None:
        """The run stops (finished, failed or interrupted)."""


class CallbackList(SearchCallback):
    """Several callbacks called in order."""

    def __init__(self, callbacks: Sequence[SearchCallback]) -> None:
        self.callbacks = list(callbacks)

    def on_episode(self, record: dict[str, Any], result: EpisodeResult, wall: float) -> None:
        for callback in self.callbacks:
            callback.on_episode(record, result, wall)

    def on_best(self, policy: Policy, episode: int) -> None:
        for callback in self.callbacks:
            callback.on_best(policy, episode)

    def on_final(self, policy: Policy, episode: int) -> None:
        for callback in self.callbacks:
            callback.on_final(policy, episode)

    def on_end(self) -> None:
        for callback in self.callbacks:
            callback.on_end()


class RunFolderCallback(SearchCallback):
    """``episodes.jsonl`` + ``policies.jsonl`` (one line per episode) and ``best_policy.json``."""

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir

    def on_episode(self, record: dict[str, Any], result: EpisodeResult, wall: float) -> None:
        self.run_dir.append_episode(record, result.policy)

    def on_best(self, policy: Policy, episode: int) -> None:
        self.run_dir.write_best(policy)

    def on_final(self, policy: Policy, episode: int) -> None:
        self.run_dir.write_best(policy)


class TensorBoardCallback(SearchCallback):
    """Scalars per episode (``search/*``, ``time/*``), the best policy's bit-allocation figure and table.

    Drawing the figure takes longer than evaluating a small model (about 1.5 s with matplotlib), and early in a
    search a new best comes every few episodes: the best policy is drawn at most once per ``draw_every`` seconds,
    and always at the end of the run, so TensorBoard ends with the final best.
    """

    def __init__(self, run_dir: RunDir, info: RunInfo, draw_every: float = 60.0) -> None:
        self.run_dir = run_dir
        self.info = info
        self.best_reward: float | None = None
        self.draw_every = draw_every
        self.last_draw = -float("inf")
        self.pending: tuple[Policy, int] | None = None

    def on_episode(self, record: dict[str, Any], result: EpisodeResult, wall: float) -> None:
        scalars = {
            "search/reward": result.reward,
            "search/accuracy": result.accuracy,
            "search/size_ratio": result.report.size_ratio,
            "search/bops_ratio": result.report.bops_ratio,
            **({} if result.report.latency_ratio is None else {"search/latency_ratio": result.report.latency_ratio}),
            "time/episodes_per_s": 1.0 / max(wall, 1e-9),
            "time/overhead_ratio": wall / max(result.eval_time, 1e-9),
        }
        if self.best_reward is not None:
            scalars["search/best_reward"] = self.best_reward
        self.run_dir.add_scalars(scalars, record["episode"])

    def on_best(self, policy: Policy, episode: int) -> None:
        self.best_reward = float(policy.metrics["reward"])
        self.pending = (policy, episode)
        if time.perf_counter() - self.last_draw >= self.draw_every:
            self._draw()

    def _draw(self) -> None:
        if self.pending is not None:
            policy, episode = self.pending
            self.run_dir.add_policy_summaries(policy, episode, importance=self.info.importance)
            self.last_draw = time.perf_counter()
            self.pending = None

    def on_end(self) -> None:
        self._draw()

    def on_final(self, policy: Policy, episode: int) -> None:
        self.best_reward = float(policy.metrics["reward"])
        scalars = {
            "eval/accuracy": float(policy.metrics["accuracy"]),
            "search/size_ratio_final": float(policy.metrics["size_ratio"]),
            "search/bops_ratio_final": float(policy.metrics["bops_ratio"]),
        }
        if "latency_ratio" in policy.metrics:
            scalars["search/latency_ratio_final"] = float(policy.metrics["latency_ratio"])
        self.run_dir.add_scalars(scalars, max(episode, 1))
        self.pending = (policy, max(episode, 1))


class ProgressCallback(SearchCallback):
    """A tqdm bar on stderr (episodes, best reward); off when ``AJPQ_NO_PROGRESS`` is set."""

    def __init__(self, info: RunInfo) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=info.episodes, initial=info.start, desc="search", unit="ep", dynamic_ncols=True)

    def on_episode(self, record: dict[str, Any], result: EpisodeResult, wall: float) -> None:
        self.bar.update(1)

    def on_best(self, policy: Policy, episode: int) -> None:
        self.bar.set_postfix(best=f"{float(policy.metrics['reward']):+.4f}", refresh=False)

    def on_end(self) -> None:
        self.bar.close()


def default_callbacks(run_dir: RunDir, info: RunInfo, progress: bool) -> list[SearchCallback]:
    """The chain of every search: run folder, TensorBoard, and a progress bar when asked for."""
    callbacks: list[SearchCallback] = [RunFolderCallback(run_dir), TensorBoardCallback(run_dir, info)]
    if progress and not os.environ.get("AJPQ_NO_PROGRESS"):
        callbacks.append(ProgressCallback(info))
    return callbacks


class Recorder:
    """Numbers the episodes, builds their records, keeps the best, and drives the callbacks."""

    def __init__(self, info: RunInfo, callbacks: Sequence[SearchCallback], run: str = "") -> None:
        self.info = info
        self.run = run
        self.callback = CallbackList(callbacks)
        self.episode = info.start
        self.best: dict[str, Any] | None = None
        self.best_reward = -float("inf")
        self.last_time = time.perf_counter()
        self.count = 0
        self.wall_total = 0.0
        self.eval_total = 0.0

    @property
    def fp32_accuracy(self) -> float:
        return self.info.fp32_accuracy

    def restore_best(self, best: dict[str, Any] | None) -> None:
        """The best of a resumed run (from its checkpoint)."""
        self.best = best
        self.best_reward = -float("inf") if best is None else float(best["reward"])

    def stamp(self, policy: Policy, metrics: dict[str, Any], **meta: Any) -> Policy:
        """``policy`` with the run's metrics and meta (the same on a fresh run and after ``--resume``)."""
        stamped = policy.with_meta(
            self.info.method,
            self.info.seed,
            run=self.run,
            dataset=self.info.dataset,
            budget=dict(self.info.budget),
            **meta,
        )
        stamped.metrics = {**metrics, "fp32_accuracy": self.info.fp32_accuracy, "split": "val"}
        return stamped

    def record(
        self, result: EpisodeResult, extra: dict[str, Any] | None = None, wall: float | None = None
    ) -> dict[str, Any]:
        """Record one evaluated episode; returns its ``episodes.jsonl`` record. ``wall`` is the episode's share of
        its batch's wall time (default: the time since the last record)."""
        now = time.perf_counter()
        wall = now - self.last_time if wall is None else wall
        self.last_time = now
        self.episode += 1
        self.count += 1
        self.wall_total += wall
        self.eval_total += result.eval_time
        record = {
            "episode": self.episode,
            "reward": round(result.reward, 8),
            "accuracy": round(result.accuracy, 8),
            "size_ratio": round(result.report.size_ratio, 8),
            "bops_ratio": round(result.report.bops_ratio, 8),
            **latency_field(result.report),
            "feasible": bool(result.feasible),
            "projected": bool(result.projected),
            **(extra or {}),
            "wall_time": round(wall, 6),
            "eval_time": round(result.eval_time, 6),
        }
        self.callback.on_episode(record, result, wall)
        if result.feasible and record["reward"] > self.best_reward:  # as recorded: a resumed run compares the same
            self.best_reward = record["reward"]
            self.best = {
                **{k: record[k] for k in BEST_KEYS},
                **latency_field(result.report),
                "compression_rate": result.report.compression_rate,
            }
            self.callback.on_best(self.stamp(result.policy.copy(), dict(self.best)), self.episode)
        return record

    def final(self, policy: Policy, accuracy: float, report: Any, reward: float, **meta: Any) -> Policy:
        """The method's answer when it is not one of its recorded candidates; returns it stamped."""
        self.best_reward = reward
        self.best = {
            "episode": self.episode,
            "reward": reward,
            "accuracy": accuracy,
            "size_ratio": report.size_ratio,
            "bops_ratio": report.bops_ratio,
            **latency_field(report),
            "compression_rate": report.compression_rate,
        }
        stamped = self.stamp(policy, {**self.best, "val_accuracy": accuracy, **report.as_dict()}, **meta)
        self.callback.on_final(stamped, self.episode)
        return stamped

    def close(self) -> None:
        self.callback.on_end()

    @property
    def overhead_ratio(self) -> float:
        """Mean episode wall time / mean evaluation time."""
        count = max(self.count, 1)
        return (self.wall_total / count) / max(self.eval_total / count, 1e-9)
