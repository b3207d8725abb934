"""A model, its data and its analysis, loaded once: what every command works on.

:class:`WorkspaceSpec` names the model and data (the settings ``ajpq search``, ``ajpq compare`` and the model/data
options of every command share); :func:`open_workspace` loads them into a :class:`Workspace`. The checkpoint format
lives in :mod:`ajpq.checkpoint`, the FP32 reference and its cache in :mod:`ajpq.reference`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ajpq.analysis import CRITERIA, ModelAnalysis, analyze_model
from ajpq.checkpoint import learned_ranges, load_checkpoint, load_weights
from ajpq.compress import SimulatedModel
from ajpq.config import check_int
from ajpq.cost import CostModel, CostReport
from ajpq.data import DataSplits, Split, load_dataset
from ajpq.errors import ConfigError
from ajpq.latency import LatencyTable
from ajpq.logs import log
from ajpq.models import DEFAULT_DATASET, DEFAULT_MODEL, build_model
from ajpq.policy import Policy, policy_from_dict, validate_policy
from ajpq.reference import cached_reference
from ajpq.train import evaluate_accuracy, resolve_device

CALIBRATION_SIZE = 256
"""Training images the activation ranges are calibrated on."""
IN_MEMORY = "python:"
"""How a run names a model or data given as Python objects (``ajpq.search(model, train, val)``):
``python:<module>.<class>``; such a run is resumed from Python, with the same objects."""


@dataclass(frozen=True)
class WorkspaceSpec:
    """The model and the data a command works on (flat keys in YAML configs and in a run's ``config.yaml``)."""

    model: str = DEFAULT_MODEL
    """Model to compress (zoo name, torchvision name or ``pkg.mod:factory``)."""
    dataset: str = DEFAULT_DATASET
    """Dataset (digits, mnist, fashion-mnist, cifar10, cifar100, imagefolder), or your own package.module:factory
    returning (train, test) or (train, val, test) torch Datasets of (image, target) pairs."""
    data_dir: str | None = None
    """Folder with the dataset files (idx .gz, CIFAR batches, or an ImageNet-style train/ val/ tree); default
    $AJPQ_DATA_DIR or ~/.cache/ajpq/data."""
    weights: str | None = None
    """FP32 checkpoint (default: the cached reference, pretrained on first use)."""
    split_seed: int = 0
    """Seed of the train/validation split."""
    val_size: int | None = None
    """Validation images taken from the training data (the reward's data); default per dataset."""
    device: str = "auto"
    """cpu, cuda or auto (cuda when present)."""
    importance: str = "l1"
    """Channel-importance criterion: norm of each output channel's weights."""
    image_size: int | None = None
    """imagefolder: side of the square input (default 224; grey or colour follows the model's first convolution)."""

    def __post_init__(self) -> None:
        for name in ("model", "dataset", "device", "importance"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, but got {getattr(self, name)!r}")
        for name in ("data_dir", "weights"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a path (a string) or null, but got {getattr(self, name)!r}")
        check_int("split_seed", self.split_seed, 0)
        if self.val_size is not None:
            check_int("val_size", self.val_size, 1)
        if self.image_size is not None:
            check_int("image_size", self.image_size, 1)
        if self.importance not in CRITERIA:
            raise ConfigError(f"importance must be one of {', '.join(CRITERIA)}, but got {self.importance!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WorkspaceSpec:
        """The spec of the flat keys in ``values`` (other keys are left to the caller)."""
        return cls(**{key: values[key] for key in SPEC_KEYS if key in values})

    def to_dict(self) -> dict[str, Any]:
        """The flat form (the keys of a YAML config)."""
        return asdict(self)


SPEC_KEYS: tuple[str, ...] = tuple(f.name for f in fields(WorkspaceSpec))
"""The flat keys of a :class:`WorkspaceSpec` in configs."""


@dataclass
class Workspace:
    """Everything a command needs about one model on one dataset."""

    model_name: str
    splits: DataSplits
    model: nn.Module
    analysis: ModelAnalysis
    device: torch.device
    checkpoint: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    """The ``--weights`` file the model's weights came from (None: the cached reference, or a model in memory)."""
    metric: Callable[[nn.Module], float] | None = field(default=None, repr=False)
    """A user's own score of a model (higher is better) replacing validation accuracy in the search's reward."""
    _calibration: torch.Tensor | None = field(default=None, repr=False)
    _simulated: SimulatedModel | None = field(default=None, repr=False)

    _cost_model: CostModel | None = field(default=None, repr=False)
    _latency_table: LatencyTable | None = field(default=None, repr=False)

    @property
    def latency_table(self) -> LatencyTable | None:
        """The search's latency table (set by a search with a latency budget): the workspace's cost models predict
        latency with it."""
        return self._latency_table

    @latency_table.setter
    def latency_table(self, table: LatencyTable | None) -> None:
        self._latency_table = table
        for model in (self._cost_model, None if self._simulated is None else self._simulated.cost_model):
            if model is not None:
                model.latency = table

    @property
    def cost_model(self) -> CostModel:
        """The cost model with this model's weights (needed to price policies with weight sparsity), predicting
        latency with :attr:`latency_table`."""
        if self._simulated is not None:
            return self._simulated.cost_model
        if self._cost_model is None:
            self._cost_model = CostModel.from_model(self.analysis, self.model)
            self._cost_model.latency = self._latency_table
        return self._cost_model

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ConfigError(f"split must be train, val or test, but got '{name}'")
        return getattr(self.splits, name)

    @property
    def simulated(self) -> SimulatedModel:
        """The BN-folded, calibrated model that policies are applied to (built on first use)."""
        if self._simulated is None:
            self._simulated = SimulatedModel(self.model, self.analysis, self.calibration_images(), self.device)
            self._simulated.cost_model.latency = self._latency_table
        return self._simulated

    def calibration_images(self) -> torch.Tensor:
        """The images every simulated or exported model calibrates its activation ranges on: the first
        ``CALIBRATION_SIZE`` training images, unshuffled, so that calibration is the same in every command (read
        once, under a fixed seed: a user's dataset may apply random transforms)."""
        if self._calibration is None:
            self._calibration = calibration_images(self.splits.train)
        return self._calibration

    def val_score(self, module: nn.Module, limit: int | None = None) -> float:
        """What a search scores a model by: the user's ``metric``, or accuracy on the validation split (its first
        ``limit`` images when given)."""
        if self.metric is None:
            return evaluate_accuracy(module, self.splits.val, self.device, limit=limit)
        was_training = module.training
        module.eval()
        try:
            with torch.inference_mode():
                value = self.metric(module)
        finally:
            module.train(was_training)
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"evaluate must return a number (higher is better), but returned {value!r}") from None
        if not math.isfinite(score):
            raise ConfigError(f"evaluate returned {score}; it must return a finite number (higher is better)")
        return score

    def cost(self, policy: Policy) -> CostReport:
        return self.cost_model.evaluate(policy)

    @property
    def weights_source(self) -> str:
        """How messages name the weights: the ``--weights`` file, or the cached reference."""
        return self.weights or "the cached reference"

    def embedded_policy(self) -> Policy | None:
        """The policy a ``finetune`` checkpoint was fine-tuned with (validated for this model), or None."""
        embedded = self.checkpoint.get("policy")
        if embedded is None:
            return None
        return validate_policy(policy_from_dict(embedded, f"{self.weights_source} (embedded policy)"), self.analysis)

    def activation_ranges(self, policy: Policy) -> dict[str, tuple[float, bool]]:
        """The activation ranges fine-tuning learned for ``policy``'s activation bits (the checkpoint's
        ``activation_ranges``), saying which layers they cover; layers learned for other bits are calibrated."""
        ranges, other_bits = learned_ranges(self.checkpoint, policy, self.weights_source)
        if ranges:
            log(f"using the activation ranges {self.weights_source} learned for {len(ranges)} layers")
        if other_bits:
            log(
                f"note: {self.weights_source} learned the ranges of {', '.join(other_bits)} for other activation "
                "bits; calibrating those"
            )
        return ranges

    def compressed(self, policy: Policy) -> nn.Module:
        """The simulated compressed model of ``policy`` on these weights: what ``export-model`` writes, with the
        activation ranges fine-tuning learned when the weights are a ``finetune`` checkpoint's."""
        ranges = self.activation_ranges(policy)
        if not ranges:
            return self.simulated.apply(policy)
        return SimulatedModel(self.model, self.analysis, self.calibration_images(), self.device, ranges).apply(policy)

    def accuracy(self, policy: Policy | None = None, split: str = "val") -> float:
        """Accuracy of the FP32 model (no policy) or of the compressed model (:meth:`compressed`)."""
        module = self.model.to(self.device) if policy is None else self.compressed(policy)
        return evaluate_accuracy(module, self.split(split), self.device)


def calibration_images(train: Split) -> torch.Tensor:
    """The first :data:`CALIBRATION_SIZE` images of a training split, unshuffled, read under a fixed seed (a user's
    dataset may apply random transforms), so that every command calibrates on the same images."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return next(train.batches(CALIBRATION_SIZE))[0]


def _image_channels(spec: WorkspaceSpec) -> int:
    """imagefolder: 1 (grey) when the user's model's first convolution reads one channel, else 3 (zoo and
    torchvision models adapt to the data)."""
    if spec.dataset.strip().lower() != "imagefolder" or ":" not in spec.model:
        return 3
    size = spec.image_size or 224
    probe = build_model(spec.model, (3, size, size), 2)
    first = next((m for m in probe.modules() if isinstance(m, nn.Conv2d)), None)
    return 1 if first is not None and first.in_channels == 1 else 3


def open_workspace(spec: WorkspaceSpec, *, need_weights: bool = True, progress: bool = True) -> Workspace:
    """Load data, build the model, load (or train and cache) its FP32 weights, and analyse it.

    Gradients are enabled inside, whatever the caller's mode: training a reference and tracing the channel
    dependencies need autograd, and users open workspaces from inference code (``torch.no_grad()``).
    """
    with torch.enable_grad():
        return _open_workspace(spec, need_weights, progress)


def _open_workspace(spec: WorkspaceSpec, need_weights: bool, progress: bool) -> Workspace:
    resolved = resolve_device(spec.device)
    splits = load_dataset(
        spec.dataset,
        data_dir=spec.data_dir,
        split_seed=spec.split_seed,
        val_size=spec.val_size,
        image_size=spec.image_size,
        channels=_image_channels(spec),
        progress=progress,
    )
    model = build_model(spec.model, splits.input_shape, splits.num_classes)
    checkpoint: dict[str, Any] = {}
    if spec.weights is not None:
        checkpoint = load_checkpoint(spec.weights)
        load_weights(model, checkpoint, spec.model, str(spec.weights))
        if checkpoint.get("dataset") not in (None, splits.name):
            log(f"note: {spec.weights} was trained on '{checkpoint['dataset']}', evaluating on '{splits.name}'")
    elif need_weights:
        model, checkpoint = cached_reference(model, spec.model, splits, resolved, progress=progress)
    model.to(resolved).eval()
    analysis = analyze_model(model, splits.input_shape, model_name=spec.model, criterion=spec.importance)
    return Workspace(spec.model, splits, model, analysis, resolved, checkpoint, spec.weights)
