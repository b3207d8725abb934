"""A model, its data and its analysis, loaded once: what every command works on.

Also the FP32 reference checkpoints: ``pretrain`` writes them, every command that needs weights reads them, and a
command given no weights trains the reference itself once and caches it.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ajpq.analysis import ModelAnalysis, analyze_model
from ajpq.compress import SimulatedModel
from ajpq.cost import CostModel, CostReport
from ajpq.data import DataSplits, Split, load_dataset
from ajpq.errors import ConfigError, ModelError
from ajpq.io import atomic_write_bytes
from ajpq.models import build_model
from ajpq.policy import Policy
from ajpq.train import TrainConfig, evaluate_accuracy, resolve_device, seed_everything, train_model

CHECKPOINT_FORMAT = "ajpq-checkpoint"
CHECKPOINT_VERSION = 1
CALIBRATION_SIZE = 256
DEFAULT_PRETRAIN: dict[str, TrainConfig] = {
    "digits_cnn": TrainConfig(epochs=40, lr=0.05, batch_size=64),
    "lenet5": TrainConfig(epochs=15, lr=0.02),
    "lenet300": TrainConfig(epochs=15, lr=0.05),
}
"""Default reference training per model; others use ``TrainConfig()``."""


def log(message: str) -> None:
    """Messages for the user go to stderr, so stdout stays clean for ``--json``."""
    print(f"ajpq: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where auto-pretrained references are cached (``$AJPQ_CACHE_DIR``, default ``~/.cache/ajpq``)."""
    return Path(os.environ.get("AJPQ_CACHE_DIR", Path.home() / ".cache" / "ajpq"))


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


@dataclass
class Workspace:
    """Everything a command needs about one model on one dataset."""

    model_name: str
    splits: DataSplits
    model: nn.Module
    analysis: ModelAnalysis
    device: torch.device
    checkpoint: dict[str, Any] = field(default_factory=dict)
    _simulated: SimulatedModel | None = field(default=None, repr=False)

    _cost_model: CostModel | None = field(default=None, repr=False)

    @property
    def cost_model(self) -> CostModel:
        """The cost model with this model's weights (needed to price policies with weight sparsity)."""
        if self._simulated is not None:
            return self._simulated.cost_model
        if self._cost_model is None:
            self._cost_model = CostModel.from_model(self.analysis, self.model)
        return self._cost_model

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ConfigError(f"split must be train, val or test, but got '{name}'")
        return getattr(self.splits, name)

    @property
    def simulated(self) -> SimulatedModel:
        """The BN-folded, calibrated model that policies are applied to (built on first use)."""
        if self._simulated is None:
            calibration = next(self.splits.train.batches(CALIBRATION_SIZE))[0]
            self._simulated = SimulatedModel(self.model, self.analysis, calibration, self.device)
        return self._simulated

    def cost(self, policy: Policy) -> CostReport:
        return self.cost_model.evaluate(policy)

    def accuracy(self, policy: Policy | None = None, split: str = "val") -> float:
        """Accuracy of the FP32 model (no policy) or of the simulated compressed model."""
        module = self.model.to(self.device) if policy is None else self.simulated.apply(policy)
        return evaluate_accuracy(module, self.split(split), self.device)


def reference_cache_path(model_name: str, splits: DataSplits) -> Path:
    """Where the auto-pretrained FP32 reference of a model on these splits is cached.

    The key holds the split seed and the validation size: a reference trained on other training images would have
    seen validation images.
    """
    key = f"{model_name.replace(':', '_')}__{splits.name}__split{splits.split_seed}__val{len(splits.val)}"
    return cache_dir() / "pretrained" / f"{key}.pt"


def default_pretrain_config(model_name: str) -> TrainConfig:
    return DEFAULT_PRETRAIN.get(model_name, TrainConfig())


def pretrain(
    model_name: str,
    splits: DataSplits,
    config: TrainConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the FP32 reference and return it with the checkpoint metadata (accuracies on val and test)."""
    generator = seed_everything(seed)
    model = build_model(model_name, splits.input_shape, splits.num_classes)
    train_model(
        model,
        splits.train,
        config,
        device=device,
        generator=generator,
        progress=progress,
        description=f"pretrain {model_name}",
    )
    meta = {
        "model": model_name,
        "dataset": splits.name,
        "split_seed": splits.split_seed,
        "input_shape": list(splits.input_shape),
        "num_classes": splits.num_classes,
        "seed": seed,
        "epochs": config.epochs,
        "accuracy": {
            "val": evaluate_accuracy(model, splits.val, device),
            "test": evaluate_accuracy(model, splits.test, device),
        },
    }
    return model, meta


def open_workspace(
    model_name: str,
    dataset: str,
    *,
    data_dir: str | Path | None = None,
    weights: str | Path | None = None,
    device: str | torch.device | None = "auto",
    split_seed: int = 0,
    val_size: int | None = None,
    criterion: str = "l1",
    need_weights: bool = True,
    progress: bool = True,
) -> Workspace:
    """Load data, build the model, load (or train and cache) its FP32 weights, and analyse it."""
    resolved = resolve_device(device)
    splits = load_dataset(dataset, data_dir=data_dir, split_seed=split_seed, val_size=val_size)
    model = build_model(model_name, splits.input_shape, splits.num_classes)
    checkpoint: dict[str, Any] = {}
    if weights is not None:
        checkpoint = load_checkpoint(weights)
        load_weights(model, checkpoint, model_name, str(weights))
        if checkpoint.get("dataset") not in (None, splits.name):
            log(f"note: {weights} was trained on '{checkpoint['dataset']}', evaluating on '{splits.name}'")
    elif need_weights:
        cached = reference_cache_path(model_name, splits)
        if cached.is_file():
            checkpoint = load_checkpoint(cached)
            load_weights(model, checkpoint, model_name, str(cached))
            log(f"no --weights given: using the cached FP32 reference {cached}")
        else:
            config = default_pretrain_config(model_name)
            log(
                f"no --weights given: pretraining the FP32 reference of {model_name} on {splits.name} "
                f"({config.epochs} epochs), cached at {cached}; `ajpq pretrain` gives you control over this"
            )
            model, checkpoint = pretrain(model_name, splits, config, device=resolved, progress=progress)
            save_checkpoint(cached, model, checkpoint)
    model.to(resolved).eval()
    analysis = analyze_model(model, splits.input_shape, model_name=model_name, criterion=criterion)
    return Workspace(model_name, splits, model, analysis, resolved, checkpoint)
