"""Training and evaluation loops shared by ``pretrain``, episode fine-tuning and ``finetune``."""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ajpq.data import Split
from ajpq.errors import ConfigError

EVAL_BATCH_SIZE = 1000


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None picks CUDA when present; ``cuda`` without a GPU is refused with a clear message."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device)
    if text.split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu, cuda or auto, but got '{text}'")
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available here; use --device cpu")
    return device


@contextlib.contextmanager
def cpu_threads(threads: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """torch's intra-op CPU threads set to ``threads`` for the block (nothing changes on CUDA)."""
    before = torch.get_num_threads()
    if torch.device(device).type == "cpu" and before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's, numpy's and torch's (CPU and CUDA) global generators and return a generator for data order, so
    runs repeat from a seed (the search's checkpoints save and restore all three)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.inference_mode()
def evaluate_accuracy(
    model: nn.Module,
    split: Split,
    device: torch.device | str = "cpu",
    batch_size: int = EVAL_BATCH_SIZE,
    limit: int | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (its first ``limit`` samples when given)."""
    was_training = model.training
    model.eval()
    correct = 0
    total = 0
    for x, y in split.batches(batch_size, device=device):
        if limit is not None and total >= limit:
            break
        if limit is not None and total + len(y) > limit:
            x, y = x[: limit - total], y[: limit - total]
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


@dataclass
class TrainConfig:
    """Hyperparameters of a supervised training run (SGD with momentum and a cosine schedule)."""

    epochs: int = 30
    """Passes over the training split."""
    lr: float = 0.05
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """L2 penalty."""
    batch_size: int = 128
    """Training batch size."""
    augment: bool = True
    """Use the dataset's augmentation (if it has one)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (short fine-tunes); None trains all epochs."""
    warmup: float = 0.0
    """Fraction of the steps over which the learning rate rises linearly to ``lr`` before the cosine decay."""
    distill_temperature: float = 4.0
    """Softmax temperature of the distillation loss (used only when ``train_model`` is given a teacher)."""
    distill_alpha: float = 0.7
    """Weight of the distillation term; ``1 - distill_alpha`` weighs the hard-label cross-entropy."""
    max_grad_norm: float | None = None
    """Clip the gradient's global norm to this before each step (None: no clipping)."""

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, but got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, but got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, but got {self.batch_size}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0, but got {self.max_steps}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup must be in [0, 1), but got {self.warmup}")
        if not self.distill_temperature > 0:
            raise ConfigError(f"distill_temperature must be > 0, but got {self.distill_temperature}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ConfigError(f"distill_alpha must be in [0, 1], but got {self.distill_alpha}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0 (or None), but got {self.max_grad_norm}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Knowledge distillation (Hinton et al., 2015): ``alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(q, y)``.

    ``p_T``/``q_T`` are the teacher's and student's softmax at temperature ``T`` (the KL is averaged over the batch);
    ``T^2`` keeps the soft term's gradient on the scale of the hard one. ``alpha = 0`` is plain cross-entropy.
    """
    hard = nn.functional.cross_entropy(student_logits, targets)
    if alpha == 0:
        return hard
    student = nn.functional.log_softmax(student_logits / temperature, dim=1)
    teacher = nn.functional.log_softmax(teacher_logits.detach() / temperature, dim=1)
    soft = nn.functional.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return alpha * temperature**2 * soft + (1 - alpha) * hard


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup_steps`` (from ``1/warmup_steps``), then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(total_steps - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, decay) / decay))


def train_model(
    model: nn.Module,
    train: Split,
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    val: Split | None = None,
    progress: bool = True,
    description: str = "train",
    on_epoch: Callable[[int, float, float | None], None] | None = None,
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    end_epoch: Callable[[], None] | None = None,
    teacher: nn.Module | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    extra_parameters: Sequence[nn.Parameter] = (),
) -> list[dict[str, float]]:
    """Train ``model`` in place; returns per-epoch ``{"epoch", "loss", "val_accuracy"}``.

    ``extra_parameters`` are trained with the model's own but live outside its modules (a QAT model's learned
    activation ranges: a child module of the user's model would be called by an ``nn.Sequential``'s forward).

    ``before_step``/``after_step`` let callers keep constraints (masks, quantization) around each update;
    ``end_epoch`` runs after each epoch's last step, before validation (e.g. recalibration). With a ``teacher``
    (kept in eval mode, not trained) the loss is :func:`distillation_loss` at the config's temperature and alpha;
    a ``loss(outputs, targets)`` of the caller's replaces both (a model that is not a classifier).
    """
    model.to(device).train()
    params = [p for p in (*model.parameters(), *extra_parameters) if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
    )
    steps_per_epoch = max(1, math.ceil(len(train) / config.batch_size))
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps) if config.epochs else config.max_steps
    warmup_steps = round(config.warmup * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps))
    loss_fn = nn.CrossEntropyLoss()
    if teacher is not None:
        teacher.to(device).eval()
    history: list[dict[str, float]] = []
    step = 0
    disable = not progress or os.environ.get("AJPQ_NO_PROGRESS") == "1"
    epochs = max(config.epochs, math.ceil(total_steps / steps_per_epoch))
    bar = tqdm(
        total=total_steps,
        desc=description,
        unit="step",
        disable=disable,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    for epoch in range(epochs):
        model.train()
        loss_sum, seen = 0.0, 0
        for x, y in train.batches(
            config.batch_size, shuffle=True, generator=generator, augment=config.augment, device=device
        ):
            if step >= total_steps:
                break
            if before_step is not None:
                before_step()
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            if loss is not None:
                value = loss(logits, y)
            elif teacher is None:
                value = loss_fn(logits, y)
            else:
                with torch.no_grad():
                    soft_targets = teacher(x)
                value = distillation_loss(logits, soft_targets, y, config.distill_temperature, config.distill_alpha)
            value.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            loss_sum += float(value.detach()) * len(y)
            seen += len(y)
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.4f}", refresh=False)
        if end_epoch is not None:
            end_epoch()
        val_acc = evaluate_accuracy(model, val, device) if val is not None else None
        record = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1)}
        if val_acc is not None:
            record["val_accuracy"] = val_acc
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch + 1, record["loss"], val_acc)
        if step >= total_steps:
            break
    bar.close()
    model.eval()
    return history
