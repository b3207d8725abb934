"""The Python API: compress your own model on your own data, from a script or a notebook, in a few calls.

::

    import ajpq

    result = ajpq.search(model, train, val, size_budget=1 / 16, episodes=300)   # a run folder, resumable
    tuned = ajpq.finetune(model, result.best_policy, train, val, epochs=3)       # carries what export needs
    ajpq.export(tuned, None, "model.ajpq", onnx="model.onnx")                    # really that small
    slim = ajpq.load_compressed("model.ajpq", model=MyNet())

``train`` and ``val`` are a ``torch.utils.data.Dataset`` of ``(image, target)`` pairs, a ``DataLoader`` over one
(its collate function and workers are used; AJPQ chooses its own batch sizes) or a pair of tensors ``(x, y)``.
The validation data is read into memory once when it fits (:data:`ajpq.data.IN_MEMORY_BYTES`); training data is
streamed, with the dataset's own transforms. ``evaluate``, a ``callable(model) -> float`` (higher is better),
replaces validation accuracy as the search's score (detection mAP, a regression score): the reward is then that
score minus the FP32 model's. These functions are what the CLI does, on objects instead of names: the run folder,
the episodes and the files are the same, and a CLI run with ``--model pkg.mod:factory --dataset pkg.data:make``
on the same model, weights and data gives the same episodes for the same seed.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ajpq.analysis import analyze_model
from ajpq.artifact import build_artifact, load_compressed
from ajpq.checkpoint import learned_ranges, ranges_meta
from ajpq.compress import SimulatedModel
from ajpq.config import resume_values
from ajpq.data import as_split, splits_from_data
from ajpq.errors import ConfigError, ModelError, PolicyError
from ajpq.logs import log, setup_logging
from ajpq.onnx_export import onnx_summary, write_onnx
from ajpq.policy import Policy, load_policy, validate_policy
from ajpq.qat import finetune as qat_finetune
from ajpq.qat import finetune_config
from ajpq.runner import SearchResult, run_search
from ajpq.runs import RunDir
from ajpq.search_config import CONFIG_KEYS, SearchConfig
from ajpq.train import resolve_device, seed_everything
from ajpq.workspace import IN_MEMORY, SPEC_KEYS, Workspace, WorkspaceSpec, calibration_images

Score = Callable[[nn.Module], float]
"""A user's own score of a model (higher is better)."""
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(outputs, targets)``, a scalar to minimise."""

NOT_OPTIONS = frozenset({*SPEC_KEYS, "workspace", "run_dir", "run_root", "resume"})
"""Keys that are arguments of :func:`search` itself (or describe the objects it is given), not ``**options``."""


def object_name(obj: Any, default: str) -> str:
    """``python:<module>.<qualname>`` of an object's class: how a run folder names a model or data given as an
    object (never imported from that name)."""
    kind = type(obj)
    if isinstance(obj, torch.utils.data.DataLoader):
        kind = type(obj.dataset)
    if isinstance(obj, list | tuple):
        return f"{IN_MEMORY}{default}"
    module = kind.__module__
    return f"{IN_MEMORY}{kind.__qualname__ if module in ('__main__', 'builtins') else f'{module}.{kind.__qualname__}'}"


def workspace_of(
    model: nn.Module,
    train: Any,
    val: Any,
    test: Any = None,
    *,
    device: str = "auto",
    evaluate: Score | None = None,
    importance: str = "l1",
    progress: bool = True,
) -> Workspace:
    """A workspace of a model and data given as objects (the model is copied: the caller's is never changed)."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    if evaluate is not None and not callable(evaluate):
        raise ConfigError(f"evaluate must be a callable(model) -> float, but got {type(evaluate).__name__}")
    spec = WorkspaceSpec(
        model=object_name(model, "model"), dataset=object_name(train, "tensors"), importance=importance
    )
    resolved = resolve_device(device)
    splits = splits_from_data(spec.dataset, train, val, test, progress=progress)
    module = copy.deepcopy(model).to(resolved).eval()
    analysis = analyze_model(module, splits.input_shape, model_name=spec.model, criterion=importance)
    return Workspace(spec.model, splits, module, analysis, resolved, metric=evaluate)


def _check_options(options: dict[str, Any]) -> None:
    known = sorted(set(CONFIG_KEYS) - NOT_OPTIONS)
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"ajpq.search got an unknown option {key!r}{hint} (options: {', '.join(known)})")


def search(
    model: nn.Module,
    train: Any,
    val: Any,
    *,
    size_budget: float | None = 0.1,
    bops_budget: float | None = None,
    episodes: int = 300,
    method: str = "ajpq",
    evaluate: Score | None = None,
    run_dir: str | Path | None = None,
    run_root: str | Path = "runs",
    backend: str = "local",
    workers: int | None = None,
    seed: int = 0,
    device: str = "auto",
    resume: str | Path | None = None,
    progress: bool = True,
    **options: Any,
) -> SearchResult:
    """Search a per-channel pruning and quantization policy of ``model`` within a size and/or BOPs budget.

    Args:
        model: The trained FP32 model (not changed; its weights are kept in the run folder as ``reference.pt``).
        train: Training data (calibration images, and the QAT proxy's steps when ``episode_finetune_steps``).
        val: Validation data: candidates are scored on it (never pass the test set).
        size_budget: Largest size as a ratio of FP32, in (0, 1], or None.
        bops_budget: Largest BOPs as a ratio of FP32, in (0, 1], or None.
        episodes: Evaluated candidates.
        method: ``ajpq`` (the hierarchical RL search), ``random``, ``uniform``, ``opq``, ``olmp`` or
            ``admm`` (:data:`ajpq.methods.METHODS`).
        evaluate: Your own score of a model (higher is better), replacing validation accuracy in the reward.
        run_dir: The run folder to create (default ``run_root/<model>__<data>__<seed>__<time>``).
        run_root: Parent of new run folders.
        backend: ``local``, ``processes`` (then ``evaluate`` and the datasets must be importable from a module) or
            ``ray``.
        workers: Worker processes or Ray actors.
        seed: Seed of everything random in the search.
        device: ``cpu``, ``cuda`` or ``auto``.
        resume: A run folder this call continues from its last checkpoint; the other arguments must describe the
            same run (only a higher ``episodes``, ``backend`` and ``workers`` may differ) and the model and
            validation data must be the ones it was made on.
        progress: Progress bars (``tqdm.auto``: widgets in a notebook) and messages on stderr.
        **options: Any other field of :class:`ajpq.search_config.SearchConfig` (``budget_mode``,
            ``latency_budget`` with ``latency_target`` and ``latency_batch``, ``episode_finetune_steps``,
            ``search_activation_bits``, ``layer_agent``, ``method_options``, ...).

    Returns:
        The :class:`~ajpq.runner.SearchResult`: ``best_policy``, ``best`` (its metrics), ``episodes`` (every
        episode as a dict), ``run_dir``.

    Raises:
        AJPQError: a bad argument, data that is not ``(image, target)`` pairs, a budget no policy can meet, ...
    """
    if progress:
        setup_logging()
    _check_options(options)
    importance = options.pop("importance", "l1")
    workspace = workspace_of(
        model, train, val, device=device, evaluate=evaluate, importance=importance, progress=progress
    )
    spec = WorkspaceSpec(
        model=workspace.model_name,
        dataset=workspace.splits.name,
        val_size=len(workspace.splits.val),
        device=device,
        importance=importance,
    )
    values: dict[str, Any] = {
        **spec.to_dict(),
        "method": method,
        "size_budget": size_budget,
        "bops_budget": bops_budget,
        "episodes": episodes,
        "seed": seed,
        "backend": backend,
        "workers": workers,
        "run_root": str(run_root),
        "run_dir": None if run_dir is None else str(run_dir),
        "progress": progress,
        **options,
    }
    if resume is None:
        return run_search(SearchConfig.from_dict(values), workspace=workspace)
    run = RunDir.open(resume, what="resume")
    given = {k: v for k, v in SearchConfig.from_dict(values).to_dict().items() if k not in ("weights", "run_dir")}
    stored = resume_values(run.read_config(), given, run.path)
    config = SearchConfig.from_dict({**stored, "run_dir": str(run.path), "progress": progress})
    return run_search(config, resume=run.path, workspace=workspace)


@dataclass
class Compression:
    """What :func:`finetune` attaches to the model it returns (as ``model.ajpq``): what :func:`export` needs."""

    policy: Policy
    """The policy the model was fine-tuned with."""
    activation_ranges: dict[str, tuple[float, bool]]
    """Input ranges ``(max|x|, signed)`` fine-tuning learned, by layer."""
    calibration: torch.Tensor
    """The calibration images (the first 256 training images)."""
    before: float
    """Validation score of the compressed model before fine-tuning (accuracy, or ``evaluate``'s score)."""
    after: float
    """The same after fine-tuning: what the exported model scores."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per epoch: epoch, loss (and val_accuracy when the score is accuracy)."""


def _policy_of(policy: Any, workspace: Workspace) -> Policy:
    if isinstance(policy, SearchResult):
        found = policy.best_policy
        if found is None:
            raise PolicyError(f"the search in {policy.run_dir} found no feasible policy to fine-tune")
        policy = found
    if isinstance(policy, str | Path):
        return load_policy(policy, workspace.analysis)
    if isinstance(policy, Policy):
        return validate_policy(policy, workspace.analysis)
    raise PolicyError(f"policy must be a Policy, a policy file or a SearchResult, but got {type(policy).__name__}")


def finetune(
    model: nn.Module,
    policy: Policy | str | Path | SearchResult,
    train: Any,
    val: Any,
    *,
    epochs: int = 3,
    lr: float | None = None,
    batch_size: int | None = None,
    max_steps: int | None = None,
    loss: Loss | None = None,
    evaluate: Score | None = None,
    distill: bool = True,
    learn_ranges: bool = True,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> nn.Module:
    """Quantization-aware fine-tuning of ``model`` with ``policy`` fixed (``ajpq finetune``'s recipe: SGD, lr
    0.005, cosine schedule, distilled from the FP32 model, learned activation ranges).

    Args:
        model: The FP32 model the policy was searched on (not changed).
        policy: A :class:`~ajpq.policy.Policy`, a policy file, or a :class:`~ajpq.runner.SearchResult` (its best).
        train: Training data, as for :func:`search`.
        val: Validation data (the score before and after).
        epochs: Passes over ``train``.
        lr: Peak learning rate (default 0.005).
        batch_size: Training batch size (default 128).
        max_steps: Stop after this many optimizer steps.
        loss: ``loss(outputs, targets)`` for a model that is not a classifier (then no distillation).
        evaluate: Your own score (higher is better), reported in ``model.ajpq.before`` / ``after``.
        distill: Distil from the FP32 model (classifiers; ignored with ``loss``).
        learn_ranges: Train the activation ranges with the weights (exported with them).
        seed: Seed of the data order.
        device: ``cpu``, ``cuda`` or ``auto``.
        progress: A progress bar and messages on stderr.

    Returns:
        The fine-tuned FP32 model (BatchNorm unfolded) with a :class:`Compression` as ``.ajpq``; pass it to
        :func:`export`.
    """
    if progress:
        setup_logging()
    workspace = workspace_of(model, train, val, device=device, evaluate=evaluate, progress=progress)
    chosen = _policy_of(policy, workspace)
    calibration = workspace.calibration_images()
    config = finetune_config(epochs=epochs, lr=lr, batch_size=batch_size, max_steps=max_steps)
    before = workspace.val_score(workspace.simulated.apply(chosen))
    result = qat_finetune(
        workspace.model,
        workspace.analysis,
        chosen,
        workspace.splits.train,
        calibration,
        config,
        val=workspace.splits.val if evaluate is None and loss is None else None,
        device=workspace.device,
        generator=seed_everything(seed),
        progress=progress,
        distill=distill,
        learn_ranges=learn_ranges,
        loss=loss,
    )
    ranges = result.activation_ranges
    tuned = result.model
    compressed = SimulatedModel(tuned, workspace.analysis, calibration, workspace.device, ranges).apply(chosen)
    after = workspace.val_score(compressed)
    log(f"fine-tuned {workspace.model_name}: val score {before:.4f} before, {after:.4f} after ({epochs} epochs)")
    # a plain attribute (nn.Module keeps non-tensor values in __dict__); copy.deepcopy and export keep it
    object.__setattr__(
        tuned, "ajpq", Compression(chosen, dict(ranges), calibration.cpu(), before, after, result.history)
    )
    return tuned


def export(
    model: nn.Module,
    policy: Policy | str | Path | None,
    path: str | Path,
    *,
    onnx: str | Path | None = None,
    onnx_float: str | Path | None = None,
    calibration: Any = None,
) -> dict[str, Any]:
    """Write the really compressed model: a ``.ajpq`` artifact (and optionally ONNX) of ``model`` with ``policy``.

    Args:
        model: A model returned by :func:`finetune` (its policy, learned ranges and calibration images come with
            it), or an FP32 model with a ``policy`` and ``calibration`` data.
        policy: The policy (None: the one ``model`` was fine-tuned with).
        path: The artifact to write (atomically; checked against the simulated model before it is written).
        onnx: Also write this QDQ ONNX file (integer weights, Q/DQ activations; checked with onnxruntime).
        onnx_float: Also write this float ONNX file (for runtimes without Q/DQ support).
        calibration: Training data whose first 256 images calibrate the activation ranges (not needed for a model
            from :func:`finetune`).

    Returns:
        What ``ajpq export-model --json`` prints: out, file_bytes, payload_bytes, header_bytes, size_bits,
        compression_rate, max_abs_logit_diff (and onnx, onnx_bytes, onnx_max_abs_logit_diff, onnx_weight_types;
        onnx_float, onnx_float_bytes, onnx_float_max_abs_diff).
    """
    info = getattr(model, "ajpq", None)
    if not isinstance(info, Compression):
        info = None
    if calibration is not None:
        images = calibration_images(as_split(calibration, "calibration"))
    elif info is not None:
        images = info.calibration
    else:
        raise ConfigError(
            "export needs calibration data for a model not returned by ajpq.finetune: pass calibration=train"
        )
    shape = tuple(int(s) for s in images.shape[1:])
    name = object_name(model, "model")
    analysis = analyze_model(copy.deepcopy(model).eval(), shape, model_name=name)
    if policy is None:
        if info is None:
            raise PolicyError("no policy given and the model was not returned by ajpq.finetune; pass the policy")
        chosen = validate_policy(info.policy, analysis)
    elif isinstance(policy, str | Path):
        chosen = load_policy(policy, analysis)
    else:
        chosen = validate_policy(policy, analysis)
    ranges: dict[str, tuple[float, bool]] = {}
    if info is not None:  # the ranges learned for the bits the policy still has
        learned = {"activation_ranges": ranges_meta(info.activation_ranges, info.policy)}
        ranges, _ = learned_ranges(learned, chosen, "the fine-tuned model")
    with torch.no_grad():
        outputs = model.eval()(images[:1].to(next(model.parameters()).device))
    artifact = build_artifact(
        model,
        analysis,
        chosen,
        images,
        model_name=name,
        input_shape=shape,
        num_classes=int(outputs.reshape(1, -1).shape[1]),
        activation_ranges=ranges,
    )
    onnx_report = write_onnx(artifact, images, onnx, onnx_float) if onnx or onnx_float else {}
    out = artifact.write(path)
    payload = len(artifact.payload)
    header_bytes = len(artifact.to_bytes()) - payload
    metrics = artifact.header["metrics"]
    report: dict[str, Any] = {
        "out": str(out),
        "file_bytes": header_bytes + payload,
        "payload_bytes": payload,
        "header_bytes": header_bytes,
        "size_bits": metrics["size_bits"],
        "compression_rate": metrics["compression_rate"],
        "max_abs_logit_diff": metrics["max_abs_logit_diff"],
    }
    report.update(onnx_report)
    log(f"wrote {out}: {report['file_bytes']:,} bytes, {metrics['compression_rate']:.1f}x smaller than FP32")
    for line in onnx_summary(report, report["file_bytes"]):
        log(line)
    return report


__all__ = ["Compression", "Loss", "Score", "export", "finetune", "load_compressed", "search", "workspace_of"]
