"""The search: configuration, the run loop shared by every method, and AJPQ's hierarchical RL method.

Extension point: a search *method* is a callable ``method(context: SearchContext) -> None`` registered in
:data:`METHODS` under its ``--method`` name (e.g. ``METHODS["random"] = run_random``). The context gives it the
workspace, the validated :class:`SearchConfig`, the :class:`~ajpq.runs.RunDir`, the
:class:`~ajpq.envs.CompressionProblem` (budget, projection, reward) and a :class:`Recorder`. A method evaluates
policies with :func:`evaluate_and_record` (a batch through the search's evaluation backend, ``--backend``, with a
per-search cache of identical projected policies, recorded in order; or ``context.problem.finish_many`` and
``context.recorder.record(result)`` once per evaluated episode); the recorder writes
``episodes.jsonl``/``policies.jsonl``, keeps ``best_policy.json``, logs TensorBoard and drives the progress bar.
Methods that support ``--resume`` save their state with ``context.recorder.checkpoint``.
:func:`run_search` does everything else (workspace, budget check, run folder, resume, summary), so a new method
never touches the loop.
"""

from __future__ import annotations

import copy
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ajpq.budget import Budget, check_feasible, parse_ratio
from ajpq.errors import ConfigError, StorageError
from ajpq.logs import log
from ajpq.methods import SEARCH_METHODS
from ajpq.runs import RunDir
from ajpq.workspace import SPEC_KEYS, Workspace, WorkspaceSpec, open_workspace

DEFAULT_EPISODES = 300


@dataclass
class SearchConfig:
    """Everything that defines a search (the keys of ``--config`` YAML files and of a run's ``config.yaml``)."""

    workspace: WorkspaceSpec = field(default_factory=WorkspaceSpec)
    """The model and data (flat keys model, dataset, data_dir, weights, ... in YAML and ``config.yaml``)."""
    method: str = "ajpq"
    """Search method: ajpq (hierarchical RL) or another method registered in ``METHODS``."""
    size_budget: float | None = 0.1
    """Largest size as a ratio of FP32, in (0, 1] (None: no size budget)."""
    bops_budget: float | None = None
    """Largest BOPs as a ratio of FP32, in (0, 1] (None: no BOPs budget)."""
    budget_mode: str = "hard"
    """hard: project each policy onto the budget; soft: subtract a penalty from the reward."""
    soft_penalty: float = 1.0
    """Soft mode: reward -= soft_penalty * sum_k max(0, ratio_k / budget_k - 1)."""
    episodes: int = DEFAULT_EPISODES
    """Evaluated episodes (warm-up included)."""
    warmup_episodes: int = 20
    """First episodes with uniformly random actions (exploration; equal to ``episodes`` = random search)."""
    seed: int = 0
    """Seed of the agents, exploration and everything random in the search."""
    layer_agent: str = "ppo"
    """Layer controller: ppo or ddpg."""
    channel_agent: str = "ppo"
    """Channel controller: ppo or ddpg."""
    max_sparsity: float = 0.8
    """Largest fraction of a layer's channels the layer agent may remove, in [0, 1)."""
    activation_bits: int = 8
    """Activation bits of every layer (when not searched)."""
    search_activation_bits: bool = False
    """Let the layer agent pick each layer's activation bits (2..8) as a second action dimension."""
    channel_group_size: int | None = None
    """Channels per channel step (default: enough to keep each layer at <= 16 steps)."""
    episodes_per_update: int = 4
    """PPO: episodes collected per update."""
    episode_finetune_steps: int = 0
    """Steps of quantization-aware fine-tuning (as ``ajpq finetune``) before each episode's evaluation (0: none)."""
    proxy_bn_batches: int = 0
    """Training batches on which each candidate's BatchNorm statistics are re-estimated before scoring (0: none)."""
    sensitivity: bool = True
    """ajpq: measure each layer step's sensitivity once (cached) and give it to both controllers."""
    warm_start: bool = True
    """ajpq: evaluate the sensitivity allocation and uniform policies first, and teach them to the agents (they
    replace the random warm-up episodes)."""
    refine_episodes: int | None = None
    """ajpq: episodes of local search around the best policy at the end (default: a fifth of ``episodes``)."""
    checkpoint_every: int = 20
    """Save a resumable checkpoint every this many episodes (a multiple of ``episodes_per_update``)."""
    run_root: str = "runs"
    """Parent folder of new run folders."""
    run_dir: str | None = None
    """Exact run folder to create (default: run_root/<model>__<dataset>__<seed>__<time>)."""
    progress: bool = True
    """Show a progress bar on stderr."""
    backend: str = "local"
    """Where candidates are evaluated: local, processes or ray (the results are the same with every backend)."""
    workers: int | None = None
    """Worker processes or Ray actors (default: processes, the CPU cores; ray, the cluster's CPUs)."""
    ray_address: str | None = None
    """The Ray cluster to join ("auto" or HOST:PORT; default: start a local Ray)."""
    method_options: dict[str, Any] = field(default_factory=dict)
    """Options of the other methods (see each module's ``DEFAULTS`` in :mod:`ajpq.methods`), e.g. {"rounds": 3}."""

    def __post_init__(self) -> None:
        def integer(name: str, low: int, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, but got {value!r}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} must be a number, but got {value!r}")
            return float(value)

        if not isinstance(self.workspace, WorkspaceSpec):
            raise ConfigError(f"workspace must be a WorkspaceSpec, but got {self.workspace!r}")
        for name in ("method", "budget_mode", "run_root"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, but got {getattr(self, name)!r}")
        if self.run_dir is not None and not isinstance(self.run_dir, str):
            raise ConfigError(f"run_dir must be a path (a string) or null, but got {self.run_dir!r}")
        integer("episodes", 1)
        integer("warmup_episodes", 0)
        integer("seed", 0)
        integer("channel_group_size", 1, allow_none=True)
        integer("episodes_per_update", 1)
        integer("episode_finetune_steps", 0)
        integer("proxy_bn_batches", 0)
        integer("checkpoint_every", 1)
        integer("refine_episodes", 0, allow_none=True)
        self.size_budget = parse_ratio("size_budget", self.size_budget)
        self.bops_budget = parse_ratio("bops_budget", self.bops_budget)
        Budget(self.size_budget, self.bops_budget, self.budget_mode)
        self.backend_options  # noqa: B018 (checks backend, workers and ray_address)
        if number("soft_penalty") < 0:
            raise ConfigError(f"soft_penalty must be >= 0, but got {self.soft_penalty}")
        if not 0.0 <= number("max_sparsity") < 1.0:
            raise ConfigError(f"max_sparsity must be in [0, 1), but got {self.max_sparsity}")
        from ajpq.agents import AGENT_KINDS
        from ajpq.quant import ACTIVATION_BITS_ALLOWED

        for name in ("layer_agent", "channel_agent"):
            if getattr(self, name) not in AGENT_KINDS:
                raise ConfigError(f"{name} must be one of {', '.join(AGENT_KINDS)}, but got {getattr(self, name)!r}")
        if self.activation_bits not in ACTIVATION_BITS_ALLOWED:
            raise ConfigError(
                f"activation_bits must be one of {list(ACTIVATION_BITS_ALLOWED)}, but got {self.activation_bits!r}"
            )
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, but got {self.method!r}")
        if self.checkpoint_every % self.episodes_per_update:
            raise ConfigError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of episodes_per_update "
                f"({self.episodes_per_update}), so that checkpoints fall between PPO updates"
            )
        if not isinstance(self.method_options, dict):
            raise ConfigError(
                f"method_options must be a mapping of option names to values, but got {self.method_options!r}"
            )
        if self.method != "ajpq" and self.method_options:
            from ajpq.methods import method_module

            unknown = sorted(set(self.method_options) - set(method_module(self.method).DEFAULTS))
            if unknown:
                known = ", ".join(sorted(method_module(self.method).DEFAULTS))
                raise ConfigError(
                    f"method_options {unknown} are not options of method {self.method!r} (it has: {known})"
                )
        for name in ("search_activation_bits", "progress", "sensitivity", "warm_start"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, but got {getattr(self, name)!r}")

    @property
    def budget(self) -> Budget:
        return Budget(self.size_budget, self.bops_budget, self.budget_mode)

    @property
    def backend_options(self) -> Any:
        from ajpq.backends import BackendOptions

        return BackendOptions(self.backend, self.workers, self.ray_address)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchConfig:
        """The configuration of flat keys (a YAML ``default:`` block, a run's ``config.yaml``)."""
        rest = {key: value for key, value in values.items() if key not in SPEC_KEYS}
        return cls(workspace=WorkspaceSpec.from_dict(values), **rest)

    def to_dict(self) -> dict[str, Any]:
        """The flat form: the workspace's keys first, then the search's (what ``config.yaml`` holds)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "workspace"}
        return {**self.workspace.to_dict(), **copy.deepcopy(values)}


CONFIG_KEYS: tuple[str, ...] = SPEC_KEYS + tuple(f.name for f in fields(SearchConfig) if f.name != "workspace")
"""The flat keys of a search configuration."""


@dataclass
class SearchResult:
    """Summary of a finished search."""

    run_dir: Path
    episodes: int
    best: dict[str, Any] | None
    episodes_per_s: float
    eval_time_fraction: float
    """Mean episode wall time / mean evaluation time (the overhead ratio)."""
    finished: bool = False
    """``--resume`` of a run that had already done its episodes: nothing was run or written."""
    fp32_accuracy: float | None = None
    """Validation accuracy of the FP32 model (the reward is the accuracy change against it)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "episodes": self.episodes,
            "best": self.best,
            "best_policy": str(self.run_dir / "best_policy.json") if self.best else None,
            "episodes_per_s": self.episodes_per_s,
            "overhead_ratio": self.eval_time_fraction,
            "fp32_accuracy": self.fp32_accuracy,
        }


class Recorder:
    """Records evaluated episodes for any method: run-folder files, best policy, TensorBoard, progress bar."""

    def __init__(self, run_dir: RunDir, config: SearchConfig, fp32_accuracy: float, start: int = 0) -> None:
        self.run_dir = run_dir
        self.fp32_accuracy = fp32_accuracy
        self.config = config
        self.episode = start
        self.best: dict[str, Any] | None = None
        self.best_reward = -float("inf")
        self.start_time = time.perf_counter()
        self.last_time = self.start_time
        self.wall_total = 0.0
        self.eval_total = 0.0
        self.count = 0
        self.bar: Any = None
        self.importance: dict[str, np.ndarray] | None = None
        """Channel importance per layer, to draw the best policy's channels in importance order."""
        if config.progress and not os.environ.get("AJPQ_NO_PROGRESS"):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=config.episodes, initial=start, desc="search", unit="ep", dynamic_ncols=True)

    def restore_best(self, best: dict[str, Any] | None) -> None:
        self.best = best
        self.best_reward = -float("inf") if best is None else float(best["reward"])

    def with_meta(self, policy: Any) -> Any:
        """The meta of a run's best policy (the same on a fresh run and after ``--resume``)."""
        return policy.with_meta(
            self.config.method,
            self.config.seed,
            run=str(self.run_dir.path),
            dataset=self.config.workspace.dataset,
            budget={"size": self.config.size_budget, "bops": self.config.bops_budget},
        )

    def record(self, result: Any, extra: dict[str, Any] | None = None, wall: float | None = None) -> dict[str, Any]:
        """Write one evaluated episode (an :class:`~ajpq.envs.EpisodeResult`); returns its record. ``wall`` is the
        episode's share of its batch's wall time (default: the time since the last record)."""
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
            "feasible": bool(result.feasible),
            "projected": bool(result.projected),
            **(extra or {}),
            "wall_time": round(wall, 6),
            "eval_time": round(result.eval_time, 6),
        }
        self.run_dir.append_episode(record, result.policy)
        scalars = {
            "search/reward": result.reward,
            "search/accuracy": result.accuracy,
            "search/size_ratio": result.report.size_ratio,
            "search/bops_ratio": result.report.bops_ratio,
            "time/episodes_per_s": 1.0 / max(wall, 1e-9),
            "time/overhead_ratio": wall / max(result.eval_time, 1e-9),
        }
        if result.feasible and result.reward > self.best_reward:
            self.best_reward = result.reward
            self.best = {k: record[k] for k in ("episode", "reward", "accuracy", "size_ratio", "bops_ratio")}
            self.best["compression_rate"] = result.report.compression_rate
            policy = result.policy.copy()
            policy.metrics = {**self.best, "fp32_accuracy": self.fp32_accuracy, "split": "val"}
            policy = self.with_meta(policy)
            self.run_dir.write_best(policy)
            self.run_dir.add_policy_summaries(policy, self.episode, importance=self.importance)
        if self.best is not None:
            scalars["search/best_reward"] = self.best_reward
        self.run_dir.add_scalars(scalars, self.episode)
        if self.bar is not None:
            self.bar.update(1)
            if self.best is not None:
                self.bar.set_postfix(best=f"{self.best_reward:+.4f}", refresh=False)
        return record

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class SearchContext:
    """What a method receives (see the module docstring)."""

    workspace: Workspace
    config: SearchConfig
    run_dir: RunDir
    problem: Any
    recorder: Recorder
    resume_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    stop: StopOnSignal = field(default_factory=lambda: StopOnSignal())

    def checkpoint_due(self) -> bool:
        """After an episode: the periodic checkpoint, the last episode, or a stop asked for by SIGINT/SIGTERM."""
        episode = self.recorder.episode
        return episode % self.config.checkpoint_every == 0 or episode == self.config.episodes or self.stop.requested

    def checkpoint(self, save: Callable[[Path], dict[str, Any]]) -> None:
        """Save a resumable checkpoint: ``save(folder)`` writes the method's files and returns its state dict."""
        episode = self.recorder.episode
        slot = self.run_dir.checkpoint_slot(episode)
        state = save(slot)
        self.run_dir.save_state(
            {
                "episode": episode,
                "slot": slot.name,
                "best": self.recorder.best,
                "method": self.config.method,
                "rng": _rng_state(),
                "method_state": state,
            }
        )
        self.run_dir.prune_checkpoints(slot)
        if self.stop.requested:
            log(f"checkpoint written after episode {episode}; continue with `ajpq search --resume {self.run_dir.path}`")
            raise KeyboardInterrupt


class StopOnSignal:
    """SIGINT/SIGTERM during a search: finish the episode, checkpoint, stop (a second signal stops at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("interrupted: finishing this episode, then writing a checkpoint (interrupt again to stop at once)")


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": repr(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import ast

    random.setstate(_tuplify(ast.literal_eval(state["python"])))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list | tuple) else value


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- AJPQ: hierarchical RL -------------------------------------------------------------------------------------
def refine_count(config: SearchConfig) -> int:
    """Episodes of local search at the end of an ajpq search."""
    count = config.episodes // 5 if config.refine_episodes is None else config.refine_episodes
    return min(count, config.episodes)


def _best_result(context: SearchContext) -> Any:
    """The best recorded episode as an :class:`~ajpq.envs.EpisodeResult` (rebuilt from the run folder)."""
    from ajpq.envs import EpisodeResult

    best = context.recorder.best
    if best is None:
        return None
    info = context.run_dir.read_info()
    policy = context.run_dir.read_policy(best["episode"], context.config.workspace.model, info.get("fingerprint"))
    report = context.problem.cost_model.evaluate(policy)
    return EpisodeResult(float(best["reward"]), float(best["accuracy"]), report, True, False, policy, 0.0)


def run_ajpq(context: SearchContext) -> None:
    """The hierarchical RL search: a layer agent and a channel agent act in every episode and learn from it.

    Three phases share the episode count: the warm start (the sensitivity allocation and uniform policies,
    demonstrated to the agents), the RL episodes, and a local search around the best policy (:mod:`ajpq.refine`).
    """
    from ajpq.agents import make_controller
    from ajpq.allocation import warm_start_policies
    from ajpq.envs import ChannelCompressEnv, LayerCompressEnv
    from ajpq.refine import refine

    config, recorder, problem = context.config, context.recorder, context.problem
    rng = np.random.default_rng(config.seed)
    channel_discrete = config.channel_agent == "ppo"
    layer_env = LayerCompressEnv(problem, channel_discrete=channel_discrete)
    channel_env = ChannelCompressEnv(problem, discrete=channel_discrete)
    agent_options = {"ppo": {"episodes_per_update": config.episodes_per_update}, "ddpg": {}}
    layer_agent = make_controller(
        config.layer_agent, "layer_agent", layer_env, config.seed, rng, **agent_options[config.layer_agent]
    )
    channel_agent = make_controller(
        config.channel_agent, "channel_agent", channel_env, config.seed + 1, rng, **agent_options[config.channel_agent]
    )
    state = context.resume_state
    if state is not None:
        slot = context.run_dir.checkpoint_dir / state["slot"]
        layer_agent.load(slot)
        channel_agent.load(slot)
        method_state = state.get("method_state", {})
        layer_agent.set_state(method_state.get("layer_agent", {}))
        channel_agent.set_state(method_state.get("channel_agent", {}))
        rng.bit_generator.state = method_state["rng"]
        _set_rng_state(state["rng"])
    elif config.warm_start:
        policies = warm_start_policies(
            problem.analysis,
            problem.cost_model,
            problem.sensitivity,
            problem.budget,
            max_sparsity=config.max_sparsity,
            activation_bits=config.activation_bits,
            search_activation_bits=config.search_activation_bits,
        )[: max(1, config.episodes // 2)]
        demos, demonstrated = [], []
        for target in policies:
            demos.append(layer_env.episode.demonstrate(target, channel_discrete))
            demonstrated.append(layer_env.episode.policy.copy())
        results = evaluate_and_record(
            context, demonstrated, [{"warmup": False, "phase": "warm_start"}] * len(demonstrated)
        )
        for (layer_steps, channel_steps), result in zip(demos, results, strict=True):
            layer_agent.remember(layer_steps, result.reward)
            channel_agent.remember(channel_steps, result.reward)
        best = int(np.argmax([result.reward for result in results]))
        layer_demo, channel_demo = demos[best]
        layer_agent.imitate(layer_demo)
        channel_agent.imitate(channel_demo)

    def save(folder: Path) -> dict[str, Any]:
        layer_agent.save(folder)
        channel_agent.save(folder)
        return {
            "layer_agent": layer_agent.state(),
            "channel_agent": channel_agent.state(),
            "rng": rng.bit_generator.state,
        }

    agents = {"layer_agent": layer_agent, "channel_agent": channel_agent}
    warmup_episodes = 0 if config.warm_start else config.warmup_episodes

    def learn(slot: int, result: Any, extra: dict[str, Any]) -> None:
        for name, agent in agents.items():
            stats = agent.end_episode(float(result.reward), bool(extra["warmup"]), slot)
            context.run_dir.add_scalars({f"{name}/{k}": v for k, v in stats.items()}, recorder.episode + 1)

    def rl_episodes(until: int) -> None:
        while recorder.episode < until:
            start = recorder.episode
            next_checkpoint = (start // config.checkpoint_every + 1) * config.checkpoint_every
            size = min(config.episodes_per_update, until - start, next_checkpoint - start)
            warmup = [start + i < warmup_episodes for i in range(size)]
            policies = rollout_batch(problem, layer_agent, channel_agent, warmup, channel_discrete)
            extras = [{"warmup": w, "phase": "rl"} for w in warmup]
            evaluate_and_record(context, policies, extras, before_record=learn)
            if context.checkpoint_due():
                context.checkpoint(save)

    rl_episodes(config.episodes - refine_count(config))
    start = _best_result(context)
    if recorder.episode < config.episodes and start is not None:
        refine_rng = np.random.default_rng([config.seed, recorder.episode])

        def evaluate(policies: Any) -> list[Any]:
            if context.stop.requested:  # no checkpoint inside the refinement: a resume redoes it from the last one
                raise KeyboardInterrupt
            extras = [{"warmup": False, "phase": "refine"}] * len(policies)
            return evaluate_and_record(context, list(policies), extras)

        refine(problem, start, evaluate, config.episodes - recorder.episode, refine_rng)
        if recorder.episode == config.episodes:
            context.checkpoint(save)
    rl_episodes(config.episodes)  # whatever the refinement left (it stops early when no new neighbour is left)


def rollout_batch(
    problem: Any, layer_agent: Any, channel_agent: Any, warmup: list[bool], channel_discrete: bool
) -> list[Any]:
    """Roll out ``len(warmup)`` episodes side by side, with one vectorized call of each agent per step for the whole
    batch (an episode's observations depend on its partial policy and the budget only, never on an evaluation).

    Episode ``i`` is the agents' slot ``i``; its warm-up flag makes it act at random. Returns the complete, not yet
    projected policies in episode order; hand each episode's reward to the agents with ``end_episode(.., slot=i)``.
    """
    from ajpq.envs import Episode, bits_of

    episodes = [Episode(problem) for _ in warmup]
    slots = list(range(len(episodes)))
    for _ in problem.units:
        actions = layer_agent.act_batch(np.stack([e.layer_obs() for e in episodes]), warmup, slots)
        for episode, action in zip(episodes, actions, strict=True):
            episode.begin_unit(np.asarray(action, dtype=np.float64).reshape(-1))
        while active := [i for i in slots if not episodes[i].unit_done]:
            obs = np.stack([episodes[i].channel_obs() for i in active])
            bits = channel_agent.act_batch(obs, [warmup[i] for i in active], active)
            for i, action in zip(active, bits, strict=True):
                episodes[i].assign(bits_of(action, channel_discrete))
    return [e.policy for e in episodes]


def evaluate_and_record(
    context: SearchContext,
    policies: list[Any],
    extras: list[dict[str, Any]] | None = None,
    before_record: Callable[[int, Any, dict[str, Any]], None] | None = None,
) -> list[Any]:
    """Project the policies, evaluate them together through the search's backend (identical projected policies once
    per search), and record them in order; returns their :class:`~ajpq.envs.EpisodeResult`.

    ``before_record(i, result, extra)`` runs before policy ``i`` is recorded (agents learn there; it may add keys to
    ``extra``, the extra fields of its episodes.jsonl line).
    """
    results = context.problem.finish_many(policies)
    wall = (time.perf_counter() - context.recorder.last_time) / max(1, len(results))
    for i, result in enumerate(results):
        extra = dict(extras[i]) if extras else {}
        if before_record is not None:
            before_record(i, result, extra)
        context.recorder.record(result, extra, wall=wall)
    return list(results)


METHODS: dict[str, Callable[[SearchContext], None]] = {"ajpq": run_ajpq, **SEARCH_METHODS}
"""Search methods by ``--method`` name; add one with ``METHODS["name"] = fn`` (see the module docstring)."""


RESUMABLE_METHODS: set[str] = {"ajpq"}
"""Methods that save checkpoints (``context.checkpoint``): on SIGINT/SIGTERM they checkpoint, then stop."""


def run_search(config: SearchConfig, *, resume: str | Path | None = None) -> SearchResult:
    """Run (or resume) a search and return its summary; every bad input raises an AJPQError before any search.

    The run folder is locked while the search runs (see :meth:`RunDir.lock`). A resumable method interrupted by
    SIGINT or SIGTERM finishes its episode, writes a checkpoint and raises ``KeyboardInterrupt``.
    """
    held: list[RunDir] = []
    stop = StopOnSignal()
    try:
        if config.method in RESUMABLE_METHODS:
            with stop:
                return _run_search(config, resume, held, stop)
        return _run_search(config, resume, held, stop)
    except OSError as exc:  # a full disk, a read-only folder: one line, and the last checkpoint stays whole
        if not held:
            raise StorageError(
                f"cannot write {exc.filename or config.run_dir or config.run_root}: {exc.strerror}"
            ) from None
        raise StorageError(
            f"cannot write {exc.filename or held[0].path} ({exc.strerror}); the run folder keeps its last "
            f"checkpoint: free some space, then `ajpq search --resume {held[0].path}`"
        ) from None
    finally:
        for run_dir in held:
            run_dir.close()


def _run_search(
    config: SearchConfig, resume: str | Path | None, held: list[RunDir], stop: StopOnSignal
) -> SearchResult:
    from ajpq.backends import make_backend
    from ajpq.envs import CompressionProblem
    from ajpq.proxy import ProxyOptions, make_evaluator
    from ajpq.train import evaluate_accuracy

    state = None
    if resume is not None:
        run_dir = RunDir.open(resume)
        held.append(run_dir)
        run_dir.lock()  # before anything is read or truncated: a second process on the same folder is refused
        state = run_dir.load_state()
        done = 0 if state is None else int(state["episode"])
        if done >= config.episodes:
            log(
                f"run {run_dir.path} already finished its {done} episodes; nothing changed (a higher --episodes "
                "continues it)"
            )
            fp32 = run_dir.read_info().get("fp32_accuracy_val")
            best = state.get("best") if state else None
            return SearchResult(run_dir.path, done, best, 0.0, 0.0, finished=True, fp32_accuracy=fp32)
    seed_all(config.seed)
    workspace = open_workspace(config.workspace, progress=config.progress)
    budget = config.budget
    min_abits = 2 if config.search_activation_bits else config.activation_bits
    check_feasible(
        workspace.analysis, workspace.cost_model, budget, max_sparsity=config.max_sparsity, activation_bits=min_abits
    )
    val = workspace.splits.val
    fp32 = evaluate_accuracy(workspace.model, val, workspace.device)
    proxy = ProxyOptions(
        finetune_steps=config.episode_finetune_steps, bn_batches=config.proxy_bn_batches, seed=config.seed
    )
    evaluate = make_evaluator(workspace, proxy)
    sensitivity = None
    if config.method == "ajpq" and config.sensitivity:
        from ajpq.io import cache_dir
        from ajpq.sensitivity import load_or_measure

        sensitivity, cached = load_or_measure(
            workspace.model,
            workspace.simulated,
            workspace.analysis,
            val,
            config.activation_bits,
            cache_dir() / "sensitivity",
        )
        log(f"layer sensitivity {'read from the cache' if cached else 'measured and cached'}")
    problem = CompressionProblem(
        workspace.analysis,
        evaluate,
        fp32,
        budget=budget,
        max_sparsity=config.max_sparsity,
        activation_bits=config.activation_bits,
        search_activation_bits=config.search_activation_bits,
        channel_group_size=config.channel_group_size,
        soft_penalty=config.soft_penalty,
        sensitivity=sensitivity,
    )
    if resume is not None:
        run_dir.truncate(done)
        if state is None:
            run_dir.best_policy_path.unlink(missing_ok=True)
        log(f"resuming {run_dir.path} after episode {done} (its last checkpoint)")
    else:
        run_dir = RunDir.create(
            config.run_root, config.workspace.model, workspace.splits.name, config.seed, path=config.run_dir
        )
        held.append(run_dir)
        run_dir.write_info(
            {
                "model": config.workspace.model,
                "fingerprint": workspace.analysis.fingerprint,
                "dataset": workspace.splits.name,
                "fp32_accuracy_val": fp32,
                "method": config.method,
            }
        )
    run_dir.write_config(config.to_dict())
    start = 0 if state is None else int(state["episode"])
    recorder = Recorder(run_dir, config, fp32, start=start)
    recorder.importance = workspace.analysis.layer_importance
    if state is not None and state.get("best"):
        recorder.restore_best(state["best"])
        info = run_dir.read_info()
        best_policy = run_dir.read_policy(state["best"]["episode"], config.workspace.model, info.get("fingerprint"))
        best_policy.metrics = {**state["best"], "fp32_accuracy": fp32, "split": "val"}
        run_dir.write_best(recorder.with_meta(best_policy))
    if sensitivity is not None:
        run_dir.writer.add_text("sensitivity/table", sensitivity.markdown(workspace.analysis), 0)
    problem.backend = make_backend(config.backend_options, workspace, proxy, local=lambda: evaluate)
    context = SearchContext(workspace, config, run_dir, problem, recorder, resume_state=state, stop=stop)
    started = time.perf_counter()
    try:
        METHODS[config.method](context)
    finally:
        recorder.close()
        problem.backend.close()
    elapsed = time.perf_counter() - started
    if recorder.best is not None:
        run_dir.add_hparams(
            {k: v for k, v in config.to_dict().items() if v is not None},
            {"hparam/best_reward": recorder.best_reward, "hparam/best_accuracy": recorder.best["accuracy"]},
        )
    run_dir.close()
    count = max(recorder.count, 1)
    return SearchResult(
        run_dir=run_dir.path,
        episodes=recorder.episode,
        best=recorder.best,
        episodes_per_s=recorder.count / elapsed if elapsed > 0 else 0.0,
        eval_time_fraction=(recorder.wall_total / count) / max(recorder.eval_total / count, 1e-9),
        fp32_accuracy=fp32,
    )
