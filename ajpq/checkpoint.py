"""The FP32 checkpoint format: what ``ajpq pretrain``, ``ajpq finetune`` and the retraining methods write, and what
``--weights`` reads.

A checkpoint is a ``torch.save``d dict: ``format``/``version``, the metadata of :func:`checkpoint_meta` (model,
dataset, split seed, validation size, input shape, classes, plus what each writer adds) and the ``state_dict``. A
plain state dict is read too.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ajpq.data import DataSplits
from ajpq.errors import ModelError, shown
from ajpq.io import atomic_write_bytes
from ajpq.policy import Policy

CHECKPOINT_FORMAT = "ajpq-checkpoint"
CHECKPOINT_VERSION = 1


def checkpoint_meta(model_name: str, splits: DataSplits, **extra: Any) -> dict[str, Any]:
    """The metadata every checkpoint records: the model and the data it was trained on, then ``extra``.

    ``--weights`` reads the model, dataset, split seed and validation size back (see ``ajpq evaluate``), so a
    checkpoint is never evaluated on validation images it was trained on.
    """
    return {
        "model": model_name,
        "dataset": splits.name,
        "split_seed": splits.split_seed,
        "val_size": len(splits.val),
        "input_shape": list(splits.input_shape),
        "num_classes": splits.num_classes,
        **extra,
    }


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Atomically write a reference checkpoint: the state dict plus what it was trained on and how well."""
    buffer = io.BytesIO()
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            **meta,
            "state_dict": model.state_dict(),
        },
        buffer,
    )
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``ajpq pretrain`` (or a plain state dict) with clear errors."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"weights file {path} is a folder; give the checkpoint file in it (e.g. {path / 'ckpt.pt'})")
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist; train one with `ajpq pretrain --out {path}`")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"cannot read weights file {path} ({type(exc).__name__}); it may be truncated or not a PyTorch checkpoint"
        ) from None
    if isinstance(data, dict) and data.get("format") == CHECKPOINT_FORMAT:
        version = data.get("version")
        if isinstance(version, bool) or version != CHECKPOINT_VERSION:
            raise ModelError(
                f"{path}: checkpoint version {shown(version)} is not readable by this build (reads "
                f"{CHECKPOINT_VERSION}); re-run `ajpq pretrain`"
            )
        _check_checkpoint(data, path)
        return data
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "state_dict": data}
    raise ModelError(f"{path} is neither an AJPQ checkpoint nor a state dict")


def _is_count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


_META_CHECKS: dict[str, tuple[Any, str]] = {
    "model": (lambda v: isinstance(v, str) and 0 < len(v) <= 1000, "a model name"),
    "dataset": (lambda v: isinstance(v, str) and 0 < len(v) <= 1000, "a dataset name"),
    "split_seed": (lambda v: _is_count(v, 0) and v < 2**63, "an integer >= 0"),
    "val_size": (lambda v: _is_count(v, 1) and v < 2**63, "an integer >= 1"),
    "num_classes": (lambda v: _is_count(v, 1) and v < 2**31, "an integer >= 1"),
    "input_shape": (
        lambda v: isinstance(v, list) and len(v) == 3 and all(_is_count(s, 1) and s < 2**31 for s in v),
        "three integers >= 1",
    ),
    "policy": (lambda v: isinstance(v, dict), "a policy object"),
}
"""What each recorded setting of a checkpoint must be (commands adopt them: see ``ajpq.cli.common.ADOPTED``)."""


def _check_checkpoint(data: dict[str, Any], path: Path) -> None:
    """Refuse, in one line, a checkpoint whose state dict or recorded settings are not of the types its readers
    use (a received file: ``torch.load(weights_only=True)`` only proves that it runs no code)."""
    hint = "re-run `ajpq pretrain` or `ajpq finetune`"
    state = data.get("state_dict")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelError(
            f"{path}: its state_dict must map parameter names to tensors, but is {type(state).__name__}; {hint}"
        )
    for key, (check, expected) in _META_CHECKS.items():
        if data.get(key) is not None and not check(data[key]):
            raise ModelError(f"{path}: its recorded {key} must be {expected}, but is {shown(data[key])}; {hint}")
    entries = data.get("activation_ranges")
    if entries is None:
        return
    if not isinstance(entries, dict):
        raise ModelError(f"{path}: activation_ranges must map layer names to ranges; {hint}")
    for name, entry in entries.items():
        if not (
            isinstance(name, str)
            and isinstance(entry, dict)
            and _is_count(entry.get("bits"), 1)
            and isinstance(entry.get("max_abs"), int | float)
            and not isinstance(entry["max_abs"], bool)
            and math.isfinite(entry["max_abs"])
            and entry["max_abs"] > 0
            and isinstance(entry.get("signed"), bool)
        ):
            raise ModelError(
                f"{path}: activation_ranges[{shown(name)}] is not a learned range (bits, a finite max_abs > 0, "
                f"signed); re-run `ajpq finetune`"
            )


def load_weights(model: nn.Module, checkpoint: dict[str, Any], model_name: str, source: str) -> None:
    """Load a checkpoint's weights, refusing one trained for another model with a message that says so."""
    trained_for = checkpoint.get("model")
    if trained_for is not None and trained_for != model_name:
        raise ModelError(
            f"{source} holds weights of model '{trained_for}', not '{model_name}'; pass --model {trained_for} "
            "or other weights"
        )
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[:3]
        raise ModelError(
            f"{source} does not fit model '{model_name}' on this dataset's input/classes: {' '.join(first)}"
        ) from None


def ranges_meta(ranges: dict[str, tuple[float, bool]], policy: Policy) -> dict[str, dict[str, Any]]:
    """The ``activation_ranges`` entry ``ajpq finetune --learn-ranges`` records: per layer, the activation bits the
    range was learned for (the fine-tuning ``policy``'s), ``max_abs`` and ``signed``."""
    return {
        name: {"bits": int(policy.layers[name].activation_bits), "max_abs": float(max_abs), "signed": bool(signed)}
        for name, (max_abs, signed) in ranges.items()
    }


def learned_ranges(
    checkpoint: dict[str, Any], policy: Policy, source: str
) -> tuple[dict[str, tuple[float, bool]], list[str]]:
    """The checkpoint's learned activation ranges that apply to ``policy``'s activation bits, and the layers whose
    range was learned for other bits (those are calibrated again, not reused)."""
    entries = checkpoint.get("activation_ranges")
    if entries is None:
        return {}, []
    if not isinstance(entries, dict):
        raise ModelError(f"{source}: activation_ranges must map layer names to ranges; re-run `ajpq finetune`")
    ranges: dict[str, tuple[float, bool]] = {}
    other_bits: list[str] = []
    for name, entry in entries.items():
        valid = (
            isinstance(entry, dict)
            and isinstance(entry.get("bits"), int)
            and isinstance(entry.get("max_abs"), int | float)
            and math.isfinite(entry["max_abs"])
            and entry["max_abs"] > 0
            and isinstance(entry.get("signed"), bool)
        )
        if not valid or name not in policy.layers:
            raise ModelError(
                f"{source}: activation_ranges[{name!r}] is not a range of this model's layers (bits, max_abs > 0, "
                "signed); re-run `ajpq finetune`"
            )
        if entry["bits"] == policy.layers[name].activation_bits:
            ranges[name] = (float(entry["max_abs"]), entry["signed"])
        else:
            other_bits.append(name)
    return ranges, other_bits
