"""The method framework: what a compression method is, how it is registered, and what it receives.

A method is a class with a ``name``, an ``Options`` dataclass (its settings, each checked in ``__post_init__``, the
way torchao's configs are) and ``run(context, options)``; :func:`register_method` adds it to :data:`METHODS` under
its ``--method`` name::

    @register_method
    class Uniform:
        name = "uniform"
        Options = UniformOptions
        resumable = False
        episodic = False

        def run(self, context: SearchContext, options: UniformOptions) -> None: ...

Every method runs inside :func:`ajpq.runner.run_search`, which opens the workspace, checks the budget, builds the
:class:`~ajpq.envs.CompressionProblem`, makes the run folder and hands the method a :class:`SearchContext`. The method
evaluates candidates with :meth:`SearchContext.evaluate` (or records its own with ``context.recorder.record``), and a
method whose answer is not one of its candidates ends with :meth:`SearchContext.finish`. A resumable method saves its
state with :meth:`SearchContext.checkpoint`.
"""

from __future__ import annotations

import ast
import dataclasses
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from ajpq.budget import describe_ratios
from ajpq.callbacks import Recorder
from ajpq.errors import ArtifactError, BudgetError, ConfigError
from ajpq.logs import log
from ajpq.policy import Policy, validate_policy
from ajpq.runs import RunDir
from ajpq.search_config import SearchConfig
from ajpq.workspace import Workspace

if TYPE_CHECKING:
    from ajpq.compress import SimulatedModel
    from ajpq.envs.core import CompressionProblem, EpisodeResult


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options (a frozen dataclass; subclasses check their fields in ``__post_init__``)."""

    SHARED: ClassVar[tuple[str, ...]] = ("episodes", "max_sparsity", "activation_bits")
    """Fields that, when a method has them and its ``method_options`` do not set them, come from the search's own
    configuration (``ajpq search --episodes 50 --method random``)."""

    @classmethod
    def from_mapping(cls, method: str, values: Mapping[str, Any]) -> MethodOptions:
        """Options from a ``method_options`` mapping; an unknown key is refused with the list of known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for method '{method}'; it takes {sorted(known)} (see the README's "
                "'Methods and compare' section)"
            )
        return cls(**{k: v for k, v in values.items() if v is not None})


@runtime_checkable
class Method(Protocol):
    """A compression method (see the module docstring)."""

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]]
    resumable: ClassVar[bool]
    """Whether it saves checkpoints (``--resume``; on SIGINT/SIGTERM it checkpoints, then stops)."""
    episodic: ClassVar[bool]
    """Whether its candidates are episodes of the problem's own space (channel pruning within ``max_sparsity``):
    the search then refuses a budget the smallest such policy cannot meet before it starts."""
    uses_sensitivity: ClassVar[bool]
    """Whether the search measures the layer sensitivity for it (``ajpq`` and ``local``: the warm start's allocation
    and the agents' observations need it); methods without the attribute do not."""

    def run(self, context: SearchContext, options: Any) -> None: ...


METHODS: dict[str, type[Method]] = {}
"""Registered methods by ``--method`` name (filled by :func:`register_method`)."""

M = TypeVar("M", bound=type)


def register_method(cls: M) -> M:
    """Class decorator: register a :class:`Method` under its ``name``."""
    name, options = getattr(cls, "name", None), getattr(cls, "Options", None)
    if not isinstance(name, str) or not (isinstance(options, type) and issubclass(options, MethodOptions)):
        raise TypeError(f"{cls!r} is not a method: it needs a str `name` and an `Options` MethodOptions subclass")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"method {name!r} is already registered by {METHODS[name]!r}")
    METHODS[name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, but got {name!r}")
    return METHODS[name]


def method_options(config: SearchConfig) -> MethodOptions:
    """The options of ``config.method``: its ``method_options``, the shared fields filled from the configuration."""
    options_type = method_class(config.method).Options
    names = {f.name for f in dataclasses.fields(options_type)}
    values = dict(config.method_options)
    for key in MethodOptions.SHARED:
        if key in names:
            values.setdefault(key, getattr(config, key))
    return options_type.from_mapping(config.method, values)


class StopOnSignal:
    """SIGINT/SIGTERM during a search: finish the episode, checkpoint, stop (a second signal stops at once).

    Before the first episode (``stage`` names what the search is doing: opening the workspace, measuring the layer
    sensitivity) there is nothing to checkpoint, so the first signal stops at once, saying what it stopped.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stage: str | None = None
        """What the search does before its first episode (None once the method runs)."""
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
        if self.stage is not None:
            log(f"interrupted: stopping {self.stage} (no episode has started, so there is nothing to checkpoint)")
            raise KeyboardInterrupt
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("interrupted: finishing this episode, then writing a checkpoint (interrupt again to stop at once)")


@dataclass
class SearchContext:
    """What a method receives (see the module docstring)."""

    workspace: Workspace
    config: SearchConfig
    run_dir: RunDir
    problem: CompressionProblem
    recorder: Recorder
    resume_state: dict[str, Any] | None = None
    stop: StopOnSignal = field(default_factory=StopOnSignal)
    replay: int = 0
    """Episodes already recorded that the method is computing again after a resume (a deterministic phase re-run
    from its start, served by the problem's cache): :meth:`evaluate` returns them without recording them twice."""
    history: list[tuple[Policy, float]] = field(default_factory=list)
    """Every recorded episode's (projected) policy and reward, in episode order: what a score predictor learns
    from."""
    seen: dict[bytes, int] = field(default_factory=dict)
    """Keys (:func:`~ajpq.envs.core.policy_key`) of every policy recorded so far, each with the first episode that
    recorded it: a local search proposes none of them again, so no evaluation goes to a policy already known."""

    def evaluate(
        self,
        policies: list[Policy],
        extras: list[dict[str, Any]] | None = None,
        before_record: Callable[[int, EpisodeResult, dict[str, Any]], None] | None = None,
    ) -> list[EpisodeResult]:
        """Project the policies, evaluate them together through the search's backend (identical projected policies
        once per search), and record them in order; returns their results.

        ``before_record(i, result, extra)`` runs before policy ``i`` is recorded (agents learn there; it may add keys
        to ``extra``, the extra fields of its ``episodes.jsonl`` line).
        """
        from ajpq.envs.core import policy_key

        results = self.problem.finish_many(policies)
        replayed = min(self.replay, len(results))
        self.replay -= replayed
        wall = (time.perf_counter() - self.recorder.last_time) / max(1, len(results) - replayed)
        for i, result in enumerate(results[replayed:], start=replayed):
            extra = dict(extras[i]) if extras else {}
            if before_record is not None:
                before_record(i, result, extra)
            self.recorder.record(result, extra, wall=wall)
            self.seen.setdefault(policy_key(result.policy), self.recorder.episode)
            self.history.append((result.policy, round(float(result.reward), 8)))  # as recorded, and as resumed
        return list(results)

    def evaluate_checkpointed(
        self,
        policies: list[Policy],
        extras: list[dict[str, Any]],
        save: Callable[[Path], dict[str, Any]],
    ) -> list[EpisodeResult]:
        """:meth:`evaluate` in pieces that end at the checkpoint boundaries, with a checkpoint at each one that is
        due: however large a batch a phase evaluates, a kill loses at most ``checkpoint_every`` episodes."""
        results: list[EpisodeResult] = []
        every = self.config.checkpoint_every
        while len(results) < len(policies):
            start, episode = len(results), self.recorder.episode
            replaying = self.replay > 0
            size = self.replay if replaying else (episode // every + 1) * every - episode
            end = min(len(policies), start + size)
            results += self.evaluate(policies[start:end], extras[start:end])
            if not replaying and self.checkpoint_due():
                self.checkpoint(save)
        return results

    def prime(self, upto: int) -> None:
        """After a resume: the problem's cache and :attr:`seen` from the first ``upto`` recorded episodes, so the
        resumed search evaluates and proposes what an uninterrupted one would."""
        from ajpq.envs.core import policy_key

        info = self.run_dir.read_info()
        policies = self.run_dir.read_policies(self.config.workspace.model, info.get("fingerprint"))
        for record in self.run_dir.read_episodes()[:upto]:
            policy = policies.get(int(record["episode"]))
            if policy is not None:
                key = policy_key(policy)
                self.problem.remember(key, float(record["accuracy"]))
                self.seen.setdefault(key, int(record["episode"]))
                self.history.append((policy, float(record["reward"])))

    def record(self, policy: Policy, accuracy: float, simulated: SimulatedModel, **extra: Any) -> None:
        """Record a candidate a method evaluated itself (on weights of its own: OLMP, ADMM), with the problem's
        reward; ``extra`` (numbers and strings) joins its ``episodes.jsonl`` line."""
        result = self.problem.score(policy, simulated.cost_model.evaluate(policy), False, accuracy, 0.0)
        fields = {k: v for k, v in extra.items() if isinstance(v, int | float | str | bool)}
        sparsity = {n: layer.weight_sparsity for n, layer in policy.layers.items() if layer.weight_sparsity > 0}
        self.recorder.record(result, {**fields, **({"weight_sparsity": sparsity} if sparsity else {})})

    def finish(
        self,
        policy: Policy,
        simulated: SimulatedModel,
        *,
        val_accuracy: float | None = None,
        weights_path: Path | None = None,
        **meta: Any,
    ) -> Policy:
        """A method's answer: validated, checked against the budget, evaluated (unless ``val_accuracy`` is given),
        stamped and written as ``best_policy.json``. ``weights_path``: the retrained weights it applies to."""

        method = self.config.method
        policy = validate_policy(policy, self.workspace.analysis, f"{method} policy")
        report = simulated.cost_model.evaluate(policy)
        budget = self.problem.budget
        if not budget.fits(report):
            raise BudgetError(
                f"method '{method}' could not meet the budget ({budget.describe()}): its policy has "
                f"{describe_ratios(report)}; raise the budget or the method's max_sparsity"
                + (
                    " (a latency budget is met by removing channels; weight sparsity does not lower dense latency)"
                    if budget.latency is not None
                    else ""
                )
            )
        if val_accuracy is None:
            val_accuracy = self.workspace.val_score(simulated.apply(policy))
        if weights_path is not None:
            meta["weights"] = str(weights_path)
        reward = self.problem.score(policy, report, False, val_accuracy, 0.0).reward
        stamped = self.recorder.final(policy, val_accuracy, report, reward, evaluations=self.recorder.count, **meta)
        log(
            f"{method}: {describe_ratios(report)} ({report.compression_rate:.1f}x smaller), val accuracy "
            f"{val_accuracy:.4f}, {self.recorder.count} evaluations"
        )
        return stamped

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
                "rng": rng_state(),
                "method_state": state,
            }
        )
        self.run_dir.prune_checkpoints(slot)
        if self.stop.requested:
            log(f"checkpoint written after episode {episode}; continue with `ajpq search --resume {self.run_dir.path}`")
            raise KeyboardInterrupt


def rng_state() -> dict[str, Any]:
    """Python's, numpy's and torch's global random states, as JSON (a checkpoint's ``rng``)."""
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy form (get_state(legacy=False) would be a dict)
    return {
        "python": repr(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (parsed as literals: a checkpoint never runs code); random states that
    Python, numpy or torch refuse are one :class:`ArtifactError`."""
    try:
        if len(state["python"]) > 100_000:  # Mersenne Twister's state is 625 numbers: about 7 KB of text
            raise ValueError("too long")
        random.setstate(_tuplify(ast.literal_eval(state["python"])))
        np_state = state["numpy"]
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    except (
        KeyError,
        TypeError,
        ValueError,
        IndexError,
        OverflowError,
        SyntaxError,
        MemoryError,
        RecursionError,
        RuntimeError,
    ) as exc:
        raise ArtifactError(
            f"the checkpoint's random states are not Python's, numpy's and torch's ({type(exc).__name__}); start a "
            "new run"
        ) from None


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list | tuple) else value
