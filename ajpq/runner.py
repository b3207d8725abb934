"""The run loop every method shares (:func:`run_search`); the configuration is :mod:`ajpq.search_config`'s.

:func:`run_search` checks the configuration, opens the workspace, checks that the budget can be met, builds the
:class:`~ajpq.envs.CompressionProblem` (budget, projection, reward, evaluation backend), creates or resumes the run
folder, and hands the method (a class registered in :mod:`ajpq.methods`, by ``--method`` name) a
:class:`~ajpq.methods.base.SearchContext`; the method evaluates candidates through it and a
:class:`~ajpq.callbacks.Recorder` records them (run folder, TensorBoard, progress bar). A new method never touches
this loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ajpq.analysis import weights_digest
from ajpq.backends import make_backend
from ajpq.budget import check_feasible
from ajpq.callbacks import Recorder, RunInfo, default_callbacks
from ajpq.checkpoint import checkpoint_meta, save_checkpoint
from ajpq.data import split_digest
from ajpq.envs import problem_from_workspace
from ajpq.errors import ConfigError, StorageError
from ajpq.io import cache_dir
from ajpq.latency import LatencyTable, load_or_measure_table, warn_if_other_machine
from ajpq.logs import log
from ajpq.methods import METHODS, SearchContext, method_class
from ajpq.methods.base import StopOnSignal
from ajpq.policy import Policy, load_policy
from ajpq.proxy import ProxyOptions, make_evaluator
from ajpq.runs import RunDir, best_by_phase, software_environment
from ajpq.search_config import SearchConfig
from ajpq.sensitivity import load_or_measure
from ajpq.train import seed_everything
from ajpq.workspace import IN_MEMORY, Workspace, open_workspace


@dataclass
class SearchResult:
    """Summary of a finished search: its run folder, its best episode, and the run's policies and episodes."""

    run_dir: Path
    episode_count: int
    """Episodes the run has recorded (a resumed run's earlier ones included)."""
    best: dict[str, Any] | None
    """The best feasible episode's metrics (reward, accuracy, size_ratio, ...), or None."""
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

    @property
    def best_policy(self) -> Policy | None:
        """The best feasible policy (``best_policy.json``, with its metrics), or None when no episode fitted."""
        path = self.run_dir / "best_policy.json"
        return load_policy(path) if self.best is not None and path.is_file() else None

    @property
    def episodes(self) -> list[dict[str, Any]]:
        """Every recorded episode as a dict (the lines of ``episodes.jsonl``: episode, phase, reward, accuracy,
        size_ratio, bops_ratio, feasible, ...)."""
        return RunDir(self.run_dir).read_episodes()

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "episodes": self.episode_count,
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


def _keep_reference(config: SearchConfig, workspace: Workspace, run_dir: RunDir) -> SearchConfig:
    """A model given as an object has no file its weights come from: keep them in the run folder
    (``reference.pt``, an AJPQ checkpoint), so that ``config.yaml`` names the weights that were searched."""
    path = run_dir.path / "reference.pt"
    save_checkpoint(path, workspace.model, checkpoint_meta(config.workspace.model, workspace.splits))
    return replace(config, workspace=replace(config.workspace, weights=str(path)))


def _latency_table(config: SearchConfig, workspace: Workspace, run_dir: RunDir | None) -> LatencyTable | None:
    """The latency table a latency budget needs (None without one): a resumed run's own (so its predictions do not
    change mid-search; a warning when this machine differs), else the cached or a new measurement."""
    if config.latency_budget is None:
        return None
    given = None
    if run_dir is not None and run_dir.latency_table_path.is_file():
        given = run_dir.latency_table_path
    elif config.latency_table is not None:
        given = Path(config.latency_table)
    if given is not None:
        table = LatencyTable.load(given, workspace.analysis)
        warn_if_other_machine(table, str(given))
        if (table.target, table.batch) != (config.latency_target, config.latency_batch):
            raise ConfigError(
                f"{given} was measured on {table.target} at batch {table.batch}, but the search asks for "
                f"{config.latency_target} at batch {config.latency_batch}; pass --latency-target {table.target} "
                f"--latency-batch {table.batch}, or leave the table out to measure one here"
            )
        return table
    table, cached = load_or_measure_table(
        workspace.model,
        workspace.analysis,
        workspace.splits.input_shape,
        target=config.latency_target,
        batch=config.latency_batch,
        model_name=config.workspace.model,
        cache=cache_dir() / "latency",
        progress=config.progress,
    )
    log(
        f"latency table ({table.target}, batch {table.batch}) "
        f"{'read from the cache' if cached else 'measured and cached'}: "
        f"FP32 {table.reference_ms:.3g} ms, unpruned compressed model {table.full_slim_ms:.3g} ms"
    )
    return table


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
        run_dir.check_records()  # a damaged episodes.jsonl or policies.jsonl is refused before any work
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
    stop.stage = "the opening of the model and data"
    if workspace is None:
        workspace = open_workspace(config.workspace, progress=config.progress)
    seed_everything(config.seed)  # again: however the workspace was opened (data read, a reference trained), the
    # search starts from the same random state, so a CLI run and a Python run on the same objects agree
    digest = weights_digest(workspace.model)
    val_digest = split_digest(workspace.splits.val)
    if resume is not None:
        run_dir.check_resumable(digest, workspace.device, val_digest)  # before any measuring, writing or truncating
    budget = config.budget
    stop.stage = "the latency table measurement"
    workspace.latency_table = _latency_table(config, workspace, run_dir if resume is not None else None)
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
    if getattr(method_class(config.method), "uses_sensitivity", False) and config.sensitivity:
        stop.stage = "the layer sensitivity measurement"
        sensitivity, cached = load_or_measure(
            workspace.model,
            workspace.simulated,
            workspace.analysis,
            workspace.splits.val,
            config.activation_bits,
            cache_dir() / "sensitivity",
            progress=config.progress,
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
    stop.stage = "the preparation of the search"
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
                "val_digest": val_digest,
                "fp32_accuracy_val": fp32,
                "method": config.method,
                "environment": software_environment(workspace.device),
            }
        )
        if config.workspace.model.startswith(IN_MEMORY) and config.workspace.weights is None:
            config = _keep_reference(config, workspace, run_dir)
    run_dir.write_config(config.to_dict())
    if workspace.latency_table is not None:
        workspace.latency_table.save(run_dir.latency_table_path)
    info = RunInfo(
        method=config.method,
        seed=config.seed,
        dataset=config.workspace.dataset,
        budget={
            "size": config.size_budget,
            "bops": config.bops_budget,
            **({} if config.latency_budget is None else {"latency": config.latency_budget}),
        },
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
    stop.stage = None
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
        episode_count=recorder.episode,
        best=recorder.best,
        episodes_per_s=recorder.count / elapsed if elapsed > 0 else 0.0,
        eval_time_fraction=recorder.overhead_ratio,
        fp32_accuracy=fp32,
        evaluations=recorder.count,
        best_by_phase=phases,
    )
