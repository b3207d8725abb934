"""Evaluation backends: where a search scores its candidate policies (in-process, worker processes, Ray actors).

Every backend has one method that matters, ``evaluate_many(policies) -> list[Evaluation]``, with results in input
order, so a search records the same episodes whatever the backend and the worker count. A worker never reads the
driver's files or cache: it receives a :class:`WorkerSpec` (the model, its analysis, the tensors of the splits the
scorer reads, the device and the frozen :class:`~ajpq.proxy.ProxyOptions`) and rebuilds the same scorer with
:func:`ajpq.proxy.make_evaluator`, the one place a candidate's score is defined.

A worker that dies (killed, out of memory) is replaced and the policies it held are evaluated again; a score is a
pure function of the policy, so this changes nothing in the results.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, Protocol

import torch

from ajpq.config import check_int
from ajpq.errors import ConfigError
from ajpq.logs import log
from ajpq.policy import Policy
from ajpq.proxy import Evaluator, ProxyOptions, make_evaluator
from ajpq.workspace import CALIBRATION_SIZE, Workspace

BACKENDS: tuple[str, ...] = ("local", "processes", "ray")
MAX_RESTARTS = 8
"""Worker replacements one ``evaluate_many`` call tolerates before it gives up (a policy that kills every worker)."""


@dataclass(frozen=True)
class Evaluation:
    """A policy's score and the seconds its evaluation took where it ran."""

    accuracy: float
    eval_time: float


class Backend(Protocol):
    """Scores complete, projected policies; results in input order."""

    name: str
    workers: int

    def evaluate_many(self, policies: Sequence[Policy]) -> list[Evaluation]: ...

    def close(self) -> None: ...


WORKERS_PER_CORE = 4
"""The most worker processes per CPU core a search starts on this machine (``--workers`` above is refused)."""


def max_local_workers() -> int:
    return WORKERS_PER_CORE * (os.cpu_count() or 1)


@dataclass(frozen=True)
class BackendOptions:
    """How a search evaluates its policies (never what the results are)."""

    backend: str = "local"
    """local (in-process), processes (worker processes on this machine) or ray (Ray actors, one machine or many)."""
    workers: int | None = None
    """Worker processes or Ray actors (default: processes, the CPU cores; ray, the cluster's CPUs)."""
    ray_address: str | None = None
    """Ray cluster to join ("auto" or HOST:PORT); None starts a local Ray with ``workers`` CPUs."""
    threads: int | None = None
    """Torch threads per worker (default: the cores divided among the workers, at least 1)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, but got {self.backend!r}")
        for name in ("workers", "threads"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        local = self.backend == "processes" or (self.backend == "ray" and self.ray_address is None)
        if local and self.workers is not None and self.workers > max_local_workers():
            cores = os.cpu_count() or 1
            raise ConfigError(
                f"workers must be at most {max_local_workers()} on this machine ({WORKERS_PER_CORE} per CPU core, "
                f"and it has {cores}), but got {self.workers}: each worker is a process with its own copy of the "
                "model, and more than that only compete for the cores; join a Ray cluster (--ray-address) for more"
            )
        if self.ray_address is not None and self.backend != "ray":
            raise ConfigError(f"ray_address needs backend ray (add --backend ray), but backend is {self.backend!r}")


def _timed(evaluate: Evaluator, policy: Policy) -> Evaluation:
    start = time.perf_counter()
    accuracy = float(evaluate(policy))
    return Evaluation(accuracy, time.perf_counter() - start)


# ---- what a worker receives ------------------------------------------------------------------------------------
@dataclass
class WorkerSpec:
    """Everything a worker needs to rebuild the driver's scorer, with no file or cache of the driver's."""

    workspace: Workspace
    options: ProxyOptions
    device: str = "cpu"
    """The driver's device; a worker without CUDA falls back to the CPU."""

    @classmethod
    def from_workspace(cls, workspace: Workspace, options: ProxyOptions) -> WorkerSpec:
        """A copy that pickles: training augmentation closures dropped (the scorer never augments), the test split
        left out (a search never reads it), the simulated model left to be rebuilt from the shipped tensors, and of
        the training split only the calibration images when the proxy reads no training data."""
        from ajpq.data import TensorSplit

        def slim(split: Any) -> Any:
            return replace(split, augment_fn=None, indices=None) if isinstance(split, TensorSplit) else split

        train = slim(workspace.splits.train)
        if isinstance(train, TensorSplit) and _only_calibration(options):
            train = train.subset(min(len(train), CALIBRATION_SIZE))
        splits = replace(workspace.splits, train=train, val=slim(workspace.splits.val))
        splits = replace(splits, test=splits.val)
        model = copy.deepcopy(workspace.model).to("cpu")
        shipped = Workspace(
            workspace.model_name,
            splits,
            model,
            workspace.analysis,
            torch.device("cpu"),
            metric=workspace.metric,
            _calibration=workspace.calibration_images().cpu(),
        )
        return cls(shipped, options, str(workspace.device))

    def build(self) -> Evaluator:
        """The scorer, rebuilt where this spec arrived."""
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            device = torch.device("cpu")
        ws = self.workspace
        ws.model.to(device).eval()
        return make_evaluator(replace(ws, device=device), self.options)


def check_shippable(spec: WorkerSpec) -> None:
    """Refuse, in one line, a user's ``evaluate`` function or dataset that spawned worker processes cannot import:
    a lambda, a local function, or code defined in a notebook or an interactive session (Ray pickles those by
    value; ``processes`` imports them by name)."""
    import pickle

    ws = spec.workspace
    items = [("evaluate", ws.metric)]
    items += [(f"the {name} data", getattr(getattr(ws.splits, name), "dataset", None)) for name in ("train", "val")]
    main = sys.modules.get("__main__")
    interactive = main is None or not getattr(main, "__file__", None)
    for what, item in items:
        if item is None:
            continue
        kind = item if callable(item) and not hasattr(item, "__len__") else type(item)
        module = getattr(kind, "__module__", "")
        local = "<locals>" in getattr(kind, "__qualname__", "") or "<lambda>" in getattr(kind, "__qualname__", "")
        try:
            pickle.dumps(item)
            unpicklable = False
        except Exception:
            unpicklable = True
        if local or unpicklable or (module == "__main__" and interactive):
            raise ConfigError(
                f"{what} ({getattr(kind, '__qualname__', kind)}) cannot be sent to worker processes: they import it "
                "by name, and it is a lambda, a local function or code defined interactively; define it in a module "
                "(a .py file), or use backend 'local' or 'ray'"
            )


def _only_calibration(options: ProxyOptions) -> bool:
    """Whether the scorer reads no training image beyond the calibration batch: plain validation accuracy, i.e.
    every proxy option (the seed aside) at its default; any other option ships the whole training split."""
    return all(
        getattr(options, f.name) == f.default for f in fields(options) if f.name != "seed" and f.default is not MISSING
    ) and all(f.default is not MISSING for f in fields(options))


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


# ---- local -----------------------------------------------------------------------------------------------------
class LocalBackend:
    """In-process evaluation (today's behaviour)."""

    name = "local"
    workers = 1

    def __init__(self, evaluate: Evaluator) -> None:
        self.evaluate = evaluate

    def evaluate_many(self, policies: Sequence[Policy]) -> list[Evaluation]:
        return [_timed(self.evaluate, p) for p in policies]

    def close(self) -> None:
        pass


# ---- worker processes ------------------------------------------------------------------------------------------
_WORKER_EVALUATE: Evaluator | None = None
_WORKER_ERROR: BaseException | None = None
_WORKER_BARRIER: Any = None
STARTUP_TIMEOUT_S = 600.0
"""How long the workers of a pool may take, together, to start and build their scorers."""


def _init_process(spec: WorkerSpec, threads: int, barrier: Any) -> None:
    global _WORKER_EVALUATE, _WORKER_ERROR, _WORKER_BARRIER
    _WORKER_BARRIER = barrier
    torch.set_num_threads(threads)
    try:
        _WORKER_EVALUATE = spec.build()
    except Exception as exc:  # reported with the first evaluation: a failing initializer would look like a crash
        _WORKER_ERROR = exc


def _evaluate_in_process(policy: Policy) -> Evaluation:
    if _WORKER_ERROR is not None:
        raise _WORKER_ERROR
    assert _WORKER_EVALUATE is not None, "worker not initialized"
    return _timed(_WORKER_EVALUATE, policy)


def _worker_pid(_index: int = 0) -> int:
    """This worker's pid, answered once all the pool's workers hold such a task: each answers exactly once."""
    _WORKER_BARRIER.wait(timeout=STARTUP_TIMEOUT_S)
    return os.getpid()


class ProcessBackend:
    """``workers`` processes on this machine (spawned, so no state leaks from the driver), each with its own copy of
    the model and the validation tensors, ``threads`` torch threads each."""

    name = "processes"

    def __init__(self, spec: WorkerSpec, workers: int, threads: int | None = None) -> None:
        check_shippable(spec)
        self.spec = spec
        self.workers = workers
        self.threads = threads or default_threads(workers)
        self.restarts = 0
        self._pool: Any = None
        self._pids: list[int] = []
        self._start()

    def _start(self) -> None:
        """A new pool whose workers have all started and built their scorers (not inside the first batch)."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        context = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=context,
            initializer=_init_process,
            initargs=(self.spec, self.threads, context.Barrier(self.workers)),
        )
        try:
            self._pids = sorted(self._pool.map(_worker_pid, range(self.workers)))
        except BrokenProcessPool:  # a worker died starting: the next batch's submit says so and restarts or gives up
            self._pids = []

    def worker_pids(self) -> list[int]:
        """Process ids of the current pool's workers."""
        return list(self._pids)

    def evaluate_many(self, policies: Sequence[Policy]) -> list[Evaluation]:
        from concurrent.futures.process import BrokenProcessPool

        results: dict[int, Evaluation] = {}
        restarts = 0
        # a worker that died between two batches breaks the pool at once (the pool watches each worker's exit), so
        # the submit or the results below raise BrokenProcessPool and the pool is replaced
        while len(results) < len(policies):
            todo = [i for i in range(len(policies)) if i not in results]
            futures = {}
            broken = False
            try:
                for i in todo:
                    futures[i] = self._pool.submit(_evaluate_in_process, policies[i])
            except BrokenProcessPool:  # a worker died between two batches
                broken = True
            for i, future in futures.items():
                try:
                    results[i] = future.result()
                except BrokenProcessPool:
                    broken = True
            if broken:
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise RuntimeError(f"evaluation workers died {restarts} times in one batch; giving up")
                self._restart(
                    f"an evaluation worker died; starting new workers and re-evaluating {len(policies) - len(results)}"
                )
        return [results[i] for i in range(len(policies))]

    def _restart(self, message: str) -> None:
        """Replace the whole pool (a pool with a dead worker is broken) and count it."""
        self.restarts += 1
        log(message)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._start()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# ---- Ray -------------------------------------------------------------------------------------------------------
def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("backend ray needs Ray: pip install 'ajpq[ray]'") from None
    return ray


class _RayEvaluator:
    """A Ray actor holding one rebuilt scorer."""

    def __init__(self, spec: WorkerSpec, threads: int) -> None:
        torch.set_num_threads(threads)
        self.evaluate = spec.build()

    def run(self, policy: Policy) -> Evaluation:
        return _timed(self.evaluate, policy)

    def where(self) -> tuple[str, int]:
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()


class RayBackend:
    """A pool of Ray actors; the spec is put once into Ray's object store and every actor builds its scorer from it.

    With ``address`` None a local Ray is started with ``workers`` CPUs (and stopped by :meth:`close`); otherwise the
    driver joins the cluster at ``address`` ("auto" or HOST:PORT). A GPU that Ray sees is shared by the actors
    (fractional ``num_gpus``) when the search runs on CUDA.
    """

    name = "ray"

    def __init__(
        self, spec: WorkerSpec, workers: int | None, address: str | None = None, threads: int | None = None
    ) -> None:
        ray = _ray()
        self.started = False
        self._handlers: dict[int, Any] = {}
        if not ray.is_initialized():
            # ray.init installs its own SIGINT/SIGTERM handlers in this process; close() puts the previous ones back
            self._handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is None:
                ray.init(num_cpus=workers or os.cpu_count() or 1, **kwargs)
            else:
                try:
                    ray.init(address=address, **kwargs)
                except (ConnectionError, ValueError) as exc:
                    self._restore_handlers()
                    raise ConfigError(
                        f"cannot join the Ray cluster at {address!r} ({exc}); start one with `ray start --head` "
                        "and pass its address, or leave --ray-address out for a local Ray"
                    ) from None
            self.started = True
            self._restore_handlers(keep=True)  # the search's own (StopOnSignal: checkpoint, then stop) stay in force
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or max(1, cpus)
        self.threads = threads or 1
        gpus = float(ray.cluster_resources().get("GPU", 0))
        self.num_gpus = min(1.0, gpus / self.workers) if gpus and spec.device.startswith("cuda") else 0.0
        self._actor_class = ray.remote(num_cpus=1, num_gpus=self.num_gpus, max_restarts=0)(_RayEvaluator)
        self._spec_ref = ray.put(spec)
        self.actors = [self._new_actor() for _ in range(self.workers)]
        self.restarts = 0
        self.where()  # wait until every actor has built its scorer

    def _new_actor(self) -> Any:
        return self._actor_class.remote(self._spec_ref, self.threads)

    def where(self) -> list[tuple[str, int]]:
        """(Ray node id, process id) of each actor."""
        ray = _ray()
        return list(ray.get([a.where.remote() for a in self.actors]))

    def evaluate_many(self, policies: Sequence[Policy]) -> list[Evaluation]:
        ray = _ray()
        from ray.exceptions import RayActorError

        results: dict[int, Evaluation] = {}
        pending = deque(range(len(policies)))
        idle = deque(range(len(self.actors)))
        running: dict[Any, tuple[int, int]] = {}
        restarts = 0
        while pending or running:
            while idle and pending:
                slot, index = idle.popleft(), pending.popleft()
                running[self.actors[slot].run.remote(policies[index])] = (index, slot)
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                index, slot = running.pop(ref)
                try:
                    results[index] = ray.get(ref)
                except RayActorError as exc:
                    restarts += 1
                    self.restarts += 1
                    if restarts > MAX_RESTARTS:
                        raise RuntimeError(f"Ray actors died {restarts} times in one batch; giving up") from exc
                    log("a Ray evaluation actor died; starting a new one and re-evaluating its policy")
                    self.actors[slot] = self._new_actor()
                    pending.appendleft(index)
                idle.append(slot)
        return [results[i] for i in range(len(policies))]

    def close(self) -> None:
        ray = _ray()
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.started:
            ray.shutdown()
            self._restore_handlers()

    def _restore_handlers(self, keep: bool = False) -> None:
        """Put back the signal handlers ray.init replaced (else a later SIGTERM ends an unrelated call in Ray's
        ``SystemExit: 15``); only from the main thread, where handlers can be set. ``keep``: again at shutdown."""
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
        if not keep:
            self._handlers = {}


def make_backend(
    options: BackendOptions, workspace: Workspace, proxy: ProxyOptions, local: Callable[[], Evaluator] | None = None
) -> Backend:
    """The backend ``options`` asks for, scoring with ``make_evaluator(workspace, proxy)`` wherever it runs."""
    if options.backend == "local":
        return LocalBackend(local() if local is not None else make_evaluator(workspace, proxy))
    spec = WorkerSpec.from_workspace(workspace, proxy)
    if options.backend == "processes":
        workers = options.workers or os.cpu_count() or 1
        return ProcessBackend(spec, workers, options.threads)
    return RayBackend(spec, options.workers, options.ray_address, options.threads)
