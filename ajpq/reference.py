"""The FP32 reference: how a model is pretrained, and the cache of references trained on first use.

``ajpq pretrain`` trains a reference into a file of the user's; a command given no ``--weights`` trains the same
reference once and caches it under :func:`~ajpq.io.cache_dir`, keyed by model, dataset and split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ajpq.checkpoint import checkpoint_meta, load_checkpoint, load_weights, save_checkpoint
from ajpq.data import DataSplits
from ajpq.io import cache_dir
from ajpq.logs import log
from ajpq.models import build_model
from ajpq.train import TrainConfig, evaluate_accuracy, seed_everything, train_model

DEFAULT_PRETRAIN: dict[str, TrainConfig] = {
    "digits_cnn": TrainConfig(epochs=40, lr=0.05, batch_size=64),
    "lenet5": TrainConfig(epochs=15, lr=0.02),
    "lenet300": TrainConfig(epochs=15, lr=0.05),
}
"""Default reference training per model; others use ``TrainConfig()``."""


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
    meta = checkpoint_meta(
        model_name,
        splits,
        seed=seed,
        epochs=config.epochs,
        accuracy={
            "val": evaluate_accuracy(model, splits.val, device),
            "test": evaluate_accuracy(model, splits.test, device),
        },
    )
    return model, meta


def cached_reference(
    model: nn.Module, model_name: str, splits: DataSplits, device: torch.device, *, progress: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """The cached FP32 reference loaded into ``model``, or a new one pretrained and cached on first use."""
    cached = reference_cache_path(model_name, splits)
    if cached.is_file():
        checkpoint = load_checkpoint(cached)
        load_weights(model, checkpoint, model_name, str(cached))
        log(f"no --weights given: using the cached FP32 reference {cached}")
        return model, checkpoint
    config = default_pretrain_config(model_name)
    log(
        f"no --weights given: pretraining the FP32 reference of {model_name} on {splits.name} "
        f"({config.epochs} epochs), cached at {cached}; `ajpq pretrain` gives you control over this"
    )
    model, checkpoint = pretrain(model_name, splits, config, device=device, progress=progress)
    save_checkpoint(cached, model, checkpoint)
    return model, checkpoint
