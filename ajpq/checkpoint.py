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
from ajpq.errors import ModelError
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
        if data.get("version") != CHECKPOINT_VERSION:
            raise ModelError(
                f"{path}: checkpoint version {data.get('version')} is not readable by this build (reads "
                f"{CHECKPOINT_VERSION}); re-run `ajpq pretrain`"
            )
        return data
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "state_dict": data}
    raise ModelError(f"{path} is neither an AJPQ checkpoint nor a state dict")


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
