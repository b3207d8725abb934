"""The search: its configuration, and the run loop every method shares (:func:`run_search`).

:func:`run_search` checks the configuration, opens the workspace, checks that the budget can be met, builds the
:class:`~ajpq.envs.CompressionProblem` (budget, projection, reward, evaluation backend), creates or resumes the run
folder, and hands the method (a class registered in :mod:`ajpq.methods`, by ``--method`` name) a
:class:`~ajpq.methods.base.SearchContext`; the method evaluates candidates through it and a
:class:`~ajpq.callbacks.Recorder` records them (run folder, TensorBoard, progress bar). A new method never touches
this loop.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ajpq.agents import AGENT_KINDS
from ajpq.analysis import weights_digest
from ajpq.backends import BackendOptions, make_backend
from ajpq.budget import Budget, check_feasible, parse_ratio
from ajpq.callbacks import Recorder, RunInfo, default_callbacks
from ajpq.config import check_int
from ajpq.envs import problem_from_workspace
from ajpq.errors import ConfigError, StorageError
from ajpq.io import cache_dir
from ajpq.logs import log
from ajpq.methods import METHODS, SearchContext, method_class
from ajpq.methods.base import StopOnSignal, method_options
from ajpq.proxy import ProxyOptions, make_evaluator
from ajpq.quant import ACTIVATION_BITS_ALLOWED
from ajpq.runs import RunDir, best_by_phase, software_environment
from ajpq.sensitivity import load_or_measure
from ajpq.train import seed_everything
from ajpq.workspace import SPEC_KEYS, Workspace, WorkspaceSpec, open_workspace

DEFAULT_EPISODES = 300


@dataclass
class SearchConfig:
    """Everything that defines a search (the keys of ``--config`` YAML files and of a run's ``config.yaml``)."""

    workspace: WorkspaceSpec = field(default_factory=WorkspaceSpec)
    """The model and data (flat keys model, dataset, data_dir, weights, ... in YAML and ``config.yaml``)."""
    method: str = "ajpq"
    """Search method (a name registered in :mod:`ajpq.methods`: ajpq, random, uniform, opq, olmp, admm)."""
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
    search_weight_sparsity: bool = False
    """Let the layer agent also pick each layer's weight sparsity (smallest-magnitude weights of kept channels
    removed, stored sparse), the freedom OPQ, OLMP and ADMM have; pays off under a BOPs budget, which credits every
    removed weight with its MACs. ajpq's warm start then includes OPQ's allocation."""
    max_weight_sparsity: float = 0.95
    """Largest weight sparsity of a layer with ``search_weight_sparsity``, in [0, 1)."""
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
            if not (allow_none and getattr(self, name) is None):
                check_int(name, getattr(self, name), low)

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
        if not 0.0 <= number("max_weight_sparsity") < 1.0:
            raise ConfigError(f"max_weight_sparsity must be in [0, 1), but got {self.max_weight_sparsity}")

        for name in ("layer_agent", "channel_agent"):
            if getattr(self, name) not in AGENT_KINDS:
                raise ConfigError(f"{name} must be one of {', '.join(AGENT_KINDS)}, but got {getattr(self, name)!r}")
        if self.activation_bits not in ACTIVATION_BITS_ALLOWED:
            raise ConfigError(
                f"activation_bits must be one of {list(ACTIVATION_BITS_ALLOWED)}, but got {self.activation_bits!r}"
            )
        method_class(self.method)
        if self.checkpoint_every % self.episodes_per_update:
            raise ConfigError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of episodes_per_update "
                f"({self.episodes_per_update}), so that checkpoints fall between PPO updates"
            )
        if not isinstance(self.method_options, dict):
            raise ConfigError(
                f"method_options must be a mapping of option names to values, but got {self.method_options!r}"
            )
        self.options  # noqa: B018 (checks method_options: the method's option names and values)
        for name in ("search_activation_bits", "search_weight_sparsity", "progress", "sensitivity", "warm_start"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, but got {getattr(self, name)!r}")

    @property
    def budget(self) -> Budget:
        return Budget(self.size_budget, self.bops_budget, self.budget_mode)

    @property
    def options(self) -> Any:
        """The method's options (a :class:`~ajpq.methods.base.MethodOptions`), checked."""
        return method_options(self)

    @property
    def backend_options(self) -> BackendOptions:

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
    evaluations: int = 0
    """Episodes this call recorded (a resumed run's earlier ones not counted)."""
    best_by_phase: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Best feasible episode of each search phase over the whole run (:func:`ajpq.runs.best_by_phase`)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "episodes": self.episodes,
            "best": self.best,
            "best_policy": str(self.run_dir / "best_policy.json") if self.best else None,
            "episodes_per_s": self.episodes_per_s,
            "overhead_ratio": self.eval_time_fraction,
            "fp32_accuracy": self.fp32_accuracy,
            "best_by_phase": self.best_by_phase,
        }


def run_search(
    config: SearchConfig, *, resume: str | Path | None = None, workspace: Workspace | None = None
) -> SearchResult:
    """Run (or resume) a search and return its summary; every bad input raises an AJPQError before any search.

    ``workspace``: an already opened workspace of the configuration's model and data (``ajpq compare`` opens one for
    all its runs). The run folder is locked while the search runs (see :meth:`RunDir.lock`). A resumable method
    interrupted by SIGINT or SIGTERM finishes its episode, writes a checkpoint and raises ``KeyboardInterrupt``.
    """
    held: list[RunDir] = []
    stop = StopOnSignal()
    try:
        if method_class(config.method).resumable:
            with stop:
                return _run_search(config, resume, workspace, held, stop)
        return _run_search(config, resume, workspace, held, stop)
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
    config: SearchConfig,
    resume: str | Path | None,
    workspace: Workspace | None,
    held: list[RunDir],
    stop: StopOnSignal,
) -> SearchResult:

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
            phases = best_by_phase(run_dir.read_episodes())
            return SearchResult(
                run_dir.path, done, best, 0.0, 0.0, finished=True, fp32_accuracy=fp32, best_by_phase=phases
            )
    seed_everything(config.seed)
    if workspace is None:
        workspace = open_workspace(config.workspace, progress=config.progress)
    digest = weights_digest(workspace.model)
    if resume is not None:
        run_dir.check_resumable(digest, workspace.device)  # before any measuring, writing or truncating
    budget = config.budget
    if method_class(config.method).episodic:
        min_abits = 2 if config.search_activation_bits else config.activation_bits
        check_feasible(
            workspace.analysis,
            workspace.cost_model,
            budget,
            max_sparsity=config.max_sparsity,
            activation_bits=min_abits,
        )
    proxy = ProxyOptions(
        finetune_steps=config.episode_finetune_steps, bn_batches=config.proxy_bn_batches, seed=config.seed
    )
    evaluate = make_evaluator(workspace, proxy)
    sensitivity = None
    if config.method == "ajpq" and config.sensitivity:
        sensitivity, cached = load_or_measure(
            workspace.model,
            workspace.simulated,
            workspace.analysis,
            workspace.splits.val,
            config.activation_bits,
            cache_dir() / "sensitivity",
        )
        log(f"layer sensitivity {'read from the cache' if cached else 'measured and cached'}")
    problem = problem_from_workspace(
        workspace,
        evaluate,
        budget=budget,
        max_sparsity=config.max_sparsity,
        activation_bits=config.activation_bits,
        search_activation_bits=config.search_activation_bits,
        search_weight_sparsity=config.search_weight_sparsity,
        max_weight_sparsity=config.max_weight_sparsity,
        channel_group_size=config.channel_group_size,
        soft_penalty=config.soft_penalty,
        sensitivity=sensitivity,
    )
    fp32 = problem.fp32_accuracy
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
                "weights_digest": digest,
                "dataset": workspace.splits.name,
                "fp32_accuracy_val": fp32,
                "method": config.method,
                "environment": software_environment(workspace.device),
            }
        )
    run_dir.write_config(config.to_dict())
    info = RunInfo(
        method=config.method,
        seed=config.seed,
        dataset=config.workspace.dataset,
        budget={"size": config.size_budget, "bops": config.bops_budget},
        fp32_accuracy=fp32,
        episodes=config.episodes,
        start=0 if state is None else int(state["episode"]),
        importance=workspace.analysis.layer_importance,
    )
    recorder = Recorder(info, default_callbacks(run_dir, info, config.progress), run=str(run_dir.path))
    if state is not None and state.get("best"):
        recorder.restore_best(state["best"])
        fingerprint = run_dir.read_info().get("fingerprint")
        best_policy = run_dir.read_policy(state["best"]["episode"], config.workspace.model, fingerprint)
        run_dir.write_best(recorder.stamp(best_policy, dict(state["best"])))
    if sensitivity is not None:
        run_dir.writer.add_text("sensitivity/table", sensitivity.markdown(workspace.analysis), 0)
    problem.backend = make_backend(config.backend_options, workspace, proxy, local=lambda: evaluate)
    context = SearchContext(workspace, config, run_dir, problem, recorder, resume_state=state, stop=stop)
    # the clock of the first episode starts with the method, as the search's does: the backend's start-up (spawning
    # workers) is not an episode's
    started = recorder.last_time = time.perf_counter()
    try:
        METHODS[config.method]().run(context, config.options)
    finally:
        recorder.close()
        problem.backend.close()
    elapsed = time.perf_counter() - started
    if recorder.best is not None:
        run_dir.add_hparams(
            {k: v for k, v in config.to_dict().items() if v is not None},
            {"hparam/best_reward": recorder.best_reward, "hparam/best_accuracy": recorder.best["accuracy"]},
        )
    phases = best_by_phase(run_dir.read_episodes())
    run_dir.close()
    return SearchResult(
        run_dir=run_dir.path,
        episodes=recorder.episode,
        best=recorder.best,
        episodes_per_s=recorder.count / elapsed if elapsed > 0 else 0.0,
        eval_time_fraction=recorder.overhead_ratio,
        fp32_accuracy=fp32,
        evaluations=recorder.count,
        best_by_phase=phases,
    )
