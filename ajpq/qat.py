"""Quantization-aware fine-tuning with a fixed policy (the OPQ recipe).

The FP32 model keeps its BatchNorms (so they keep training), but each compressible layer's weight is a
parametrization that quantizes the weight the export stores, the BN-folded one, and unfolds it again:
``quantize_weight_ste(weight * k, bits, stored_mask) / k`` with ``k = gamma / sqrt(running_var + eps)`` of the
BatchNorm after the layer (``k = 1`` without one), in the forward pass, with a straight-through gradient. In eval mode
the BatchNorm multiplies by ``k`` again, so the module computes exactly what :class:`~ajpq.compress.SimulatedModel`
and the exported artifact compute (up to float rounding), and the accuracy fine-tuning reports is the artifact's.
(Quantizing the unfolded weight is not the same: the fp16 rounding of the scales, and subnormal scales of channels
with a small ``k``, make the codes differ.) Every layer's input is fake-quantized (STE) at the policy's activation
bits with ranges calibrated like the simulated model's (on the BN-folded FP32 weights), recalibrated after every
epoch; with ``learn_ranges`` (the default) the ranges are trained instead (LSQ step sizes, starting at the calibrated
ones) and travel with the weights to the export. A layer with ``weight_sparsity`` keeps the magnitude mask the
simulation and the cost model compute from the starting weights. Removed channels, the weights that read removed
inputs, and the bias/BatchNorm affine of removed channels are zeroed before training and after every optimizer step,
so they never come back and fold to exact zeros.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from ajpq.analysis import ModelAnalysis, layer_module
from ajpq.compress import ActivationQuantizer, SimulatedModel, calibrate_activations, fold_batchnorm, input_masks
from ajpq.cost import CostModel
from ajpq.data import Split
from ajpq.policy import Policy
from ajpq.quant import activation_levels, quantize_activation_learned, quantize_weight_ste
from ajpq.train import TrainConfig, evaluate_accuracy, train_model

OPQ_RECIPE: dict[str, Any] = {"lr": 0.005, "momentum": 0.9, "weight_decay": 1e-4}
"""OPQ's fine-tuning hyperparameters (Hu et al., AAAI 2021); SGD with a cosine schedule."""
WARMUP = 0.05
"""Fraction of fine-tuning steps with a linear learning-rate warm-up: a freshly quantized model's first gradients
are large, and a short run has no time to undo a bad first step."""


MAX_GRAD_NORM = 5.0
"""Fine-tuning clips the gradient norm: with 1-bit, 99%-sparse layers and the distillation term, unclipped SGD diverged
(LeNet-5 at 1/64 of FP32, OPQ's and ADMM's policies: the loss reached 2e7 in the second epoch, accuracy fell to 0.1)."""


def finetune_config(**overrides: Any) -> TrainConfig:
    """A :class:`~ajpq.train.TrainConfig` with the OPQ recipe (lr 0.005, momentum 0.9, weight decay 1e-4), 3 epochs,
    5% linear warm-up then cosine decay, gradient norm clipped to :data:`MAX_GRAD_NORM`; distillation at the config's
    defaults when :func:`finetune` distils.

    ``None`` values in ``overrides`` are ignored, so CLI options can be passed through as they are.
    """
    values: dict[str, Any] = {
        "epochs": 3,
        "batch_size": 128,
        "warmup": WARMUP,
        "max_grad_norm": MAX_GRAD_NORM,
        **OPQ_RECIPE,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


class _QuantizedWeight(nn.Module):
    """Parametrization: the policy's quantized weight (STE) of the kept channels, reading kept inputs only.

    With a BatchNorm after the layer, the folded weight ``weight * k`` is quantized (what the artifact stores) and
    divided by ``k`` again, since the BatchNorm multiplies by it. ``k`` uses the running statistics, as the export's
    folding does, and is a constant for the gradient (the BatchNorm's own parameters train through the BatchNorm).
    """

    bits: torch.Tensor
    mask: torch.Tensor

    def __init__(self, bits: torch.Tensor, mask: torch.Tensor, bn: _BatchNorm | None = None) -> None:
        super().__init__()
        self.register_buffer("bits", bits)
        self.register_buffer("mask", mask)
        self._bn: tuple[_BatchNorm, ...] = (bn,) if bn is not None else ()  # not registered twice as a submodule

    def fold_factor(self) -> torch.Tensor | None:
        """``gamma / sqrt(running_var + eps)`` per output channel, computed as :func:`ajpq.analysis.folded_weights`."""
        if not self._bn:
            return None
        bn = self._bn[0]
        var = bn.running_var.detach().float() if bn.running_var is not None else torch.ones_like(self.bits).float()
        gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(var)
        return gamma / torch.sqrt(var + bn.eps)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        factor = self.fold_factor()
        if factor is None:
            return quantize_weight_ste(weight, self.bits, self.mask > 0)
        shape = (-1, *([1] * (weight.dim() - 1)))
        folded = quantize_weight_ste(weight.float() * factor.reshape(shape), self.bits, self.mask > 0)
        safe = torch.where(factor == 0, torch.ones_like(factor), factor)
        return (folded / safe.reshape(shape)).to(weight.dtype)


class _LearnedRange(nn.Module):
    """A layer input's trainable quantization step (:func:`~ajpq.quant.quantize_activation_learned`)."""

    def __init__(self, max_abs: float, bits: int, signed: bool) -> None:
        super().__init__()
        self.bits, self.signed = bits, signed
        self.step = nn.Parameter(torch.tensor(max(max_abs, 1e-6) / activation_levels(bits, signed)[1]))

    def max_abs(self) -> float:
        """The range the export stores: ``|step| * highest code``."""
        return float(self.step.detach().abs().clamp(min=1e-8)) * activation_levels(self.bits, self.signed)[1]

    def hook(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (quantize_activation_learned(inputs[0], self.step, self.bits, self.signed), *inputs[1:])


class QATModel:
    """The FP32 model prepared for quantization-aware training with a fixed, complete and validated policy."""

    def __init__(
        self,
        model: nn.Module,
        analysis: ModelAnalysis,
        policy: Policy,
        calibration: torch.Tensor,
        device: torch.device | str = "cpu",
        learn_ranges: bool = False,
    ) -> None:
        self.analysis = analysis
        self.policy = policy
        self.device = torch.device(device)
        self.calibration = calibration.to(self.device)
        self._template = copy.deepcopy(model).to(self.device)
        self.module = copy.deepcopy(model).to(self.device)
        cost_model = CostModel.from_model(analysis, model)
        masks = input_masks(analysis, cost_model, policy)
        inputs = cost_model.kept_inputs(policy)
        self._keep: dict[str, torch.Tensor] = {}
        self._weight_mask: dict[str, torch.Tensor] = {}
        for layer in analysis.layers:
            module = layer_module(self.module, layer.name)
            bits = torch.from_numpy(policy.layers[layer.name].weight_bits).to(self.device)
            keep = bits > 0
            weight = module.weight
            mask = masks[layer.name].to(self.device, weight.dtype)
            mask = mask.reshape(*mask.shape, *([1] * (weight.dim() - 2))) * keep.to(weight.dtype).reshape(
                -1, *([1] * (weight.dim() - 1))
            )
            layer_policy = policy.layers[layer.name]
            if layer_policy.weight_sparsity > 0:  # the magnitude mask of the simulation and cost model stays fixed
                stored = cost_model.weight_mask(
                    layer,
                    layer_policy.weight_bits,
                    inputs[layer.name],
                    layer_policy.weight_sparsity,
                )
                mask = mask * torch.from_numpy(stored).reshape(weight.shape).to(self.device, weight.dtype)
            self._keep[layer.name] = keep
            self._weight_mask[layer.name] = mask
            bn = self.module.get_submodule(layer.bn_name) if layer.bn_name is not None else None
            assert bn is None or isinstance(bn, _BatchNorm)  # the analysis folds only BatchNorms
            parametrize.register_parametrization(module, "weight", _QuantizedWeight(bits, mask, bn))
        self.enforce()
        self.quantizers: dict[str, ActivationQuantizer] = {}
        for layer in analysis.layers:
            quantizer = ActivationQuantizer(1.0, True, policy.layers[layer.name].activation_bits, ste=True)
            self.module.get_submodule(layer.name).register_forward_pre_hook(quantizer)
            self.quantizers[layer.name] = quantizer
        self.recalibrate()
        self.learned = nn.ModuleDict()
        if learn_ranges:  # start at the calibrated ranges; the fixed quantizers step aside
            for layer in analysis.layers:
                fixed = self.quantizers[layer.name]
                if fixed.bits >= 32:
                    continue
                learned = _LearnedRange(fixed.max_abs, fixed.bits, fixed.signed).to(self.device)
                self.learned[layer.name.replace(".", "/")] = learned
                fixed.bits = 32
                self.module.get_submodule(layer.name).register_forward_pre_hook(learned.hook)

    def activation_ranges(self) -> dict[str, tuple[float, bool]]:
        """The learned ``(max|x|, signed)`` of each quantized layer's input (empty without ``learn_ranges``)."""
        ranges: dict[str, tuple[float, bool]] = {}
        for name, learned in self.learned.items():
            assert isinstance(learned, _LearnedRange)  # the only modules put there
            ranges[name.replace("/", ".")] = (learned.max_abs(), learned.signed)
        return ranges

    @torch.no_grad()
    def enforce(self) -> None:
        """Zero removed channels, weights reading removed inputs, and removed channels' bias and BatchNorm affine."""
        for layer in self.analysis.layers:
            module = layer_module(self.module, layer.name)
            keep = self._keep[layer.name]
            _original_weight(module).mul_(self._weight_mask[layer.name])
            if module.bias is not None:
                module.bias.mul_(keep.to(module.bias.dtype))
            if layer.bn_name is not None:
                bn = self.module.get_submodule(layer.bn_name)
                assert isinstance(bn, _BatchNorm)  # the analysis folds only BatchNorms
                for param in (bn.weight, bn.bias):
                    if param is not None:
                        param.mul_(keep.to(param.dtype))

    def fp32_model(self) -> nn.Module:
        """A plain copy of the current FP32 weights: no parametrization, no quantizer hooks.

        (Deep-copying a parametrized module shares its generated class, and removing the parametrization from the
        copy would break the original, so the copy is built from the untouched model and a renamed state dict.)
        """
        state = {}
        for key, value in self.module.state_dict().items():
            if ".parametrizations." in key:
                if key.endswith(".parametrizations.weight.original"):
                    state[key.replace(".parametrizations.weight.original", ".weight")] = value
                continue
            state[key] = value
        plain = copy.deepcopy(self._template)
        plain.load_state_dict(state)
        return plain

    @torch.no_grad()
    def recalibrate(self) -> None:
        """Activation ranges as :class:`~ajpq.compress.SimulatedModel` calibrates them for the current weights."""
        folded = fold_batchnorm(self.fp32_model(), self.analysis).eval()
        ranges = calibrate_activations(folded, self.analysis, self.calibration)
        for name, (max_abs, signed) in ranges.items():
            self.quantizers[name].max_abs = max_abs
            self.quantizers[name].signed = signed


def _original_weight(module: nn.Module) -> torch.Tensor:
    """The trained tensor behind a parametrized ``weight`` (``module.parametrizations.weight.original``)."""
    parametrizations = module.parametrizations
    assert isinstance(parametrizations, nn.ModuleDict)  # register_parametrization made it
    original = parametrizations["weight"].original
    assert isinstance(original, torch.Tensor)
    return original


@dataclass
class FinetuneResult:
    """The fine-tuned FP32 model and what fine-tuning did to the compressed model's accuracy."""

    model: nn.Module
    """FP32 parameters (BatchNorm unfolded); ``SimulatedModel(model, ...).apply(policy)`` is the compressed model."""
    history: list[dict[str, float]]
    accuracy_before: dict[str, float] = field(default_factory=dict)
    accuracy_after: dict[str, float] = field(default_factory=dict)
    activation_ranges: dict[str, tuple[float, bool]] = field(default_factory=dict)
    """Learned ``(max|x|, signed)`` input ranges by layer (``learn_ranges``); the export needs them with the model."""


def compressed_accuracy(
    model: nn.Module,
    analysis: ModelAnalysis,
    policy: Policy,
    calibration: torch.Tensor,
    splits: dict[str, Split],
    device: torch.device | str = "cpu",
    activation_ranges: dict[str, tuple[float, bool]] | None = None,
) -> dict[str, float]:
    """Accuracy of the simulated compressed model on each named split."""
    module = SimulatedModel(model, analysis, calibration, device, activation_ranges).apply(policy)
    return {name: evaluate_accuracy(module, split, device) for name, split in splits.items()}


def finetune(
    model: nn.Module,
    analysis: ModelAnalysis,
    policy: Policy,
    train: Split,
    calibration: torch.Tensor,
    config: TrainConfig | None = None,
    *,
    val: Split | None = None,
    report: dict[str, Split] | None = None,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, float, float | None], None] | None = None,
    distill: bool = True,
    teacher: nn.Module | None = None,
    learn_ranges: bool = True,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` with the policy's quantization in the forward pass; ``model`` itself is not changed.

    The module trained is the exported model (see the module docstring), so each epoch's ``val_accuracy`` is the
    accuracy the artifact would have with the weights of that epoch; the last one equals ``accuracy_after["val"]``.

    Args:
        model: The FP32 model (BatchNorm unfolded).
        analysis: Its analysis.
        policy: A complete, validated policy (see :func:`ajpq.policy.validate_policy`).
        train: Training split.
        calibration: The images the simulated model calibrates its activation ranges on.
        config: Training hyperparameters (default :func:`finetune_config`).
        val: Split whose accuracy is reported after each epoch (``on_epoch``).
        report: Splits on which the compressed model's accuracy is measured before and after.
        device: Where to train.
        generator: Data-order generator (see :func:`ajpq.train.seed_everything`).
        progress: Show a progress bar.
        on_epoch: Called with ``(epoch, mean loss, val accuracy)`` after each epoch.
        distill: Distil from the FP32 teacher with :func:`~ajpq.train.distillation_loss` at the config's
            temperature and alpha, instead of plain cross-entropy on the labels.
        teacher: The FP32 teacher (default ``model`` itself; ``compare`` passes the reference model, so methods
            that retrain their weights get the same teacher as the others).
        learn_ranges: Train the activation ranges with the weights (LSQ step sizes) instead of recalibrating
            them (default; README, "Learned activation ranges": they recover collapsed policies at any bit
            width and tie elsewhere); the result's ``activation_ranges`` then belong to its model.
        loss: ``loss(outputs, targets)`` replacing the distillation and cross-entropy losses (a model that is not a
            classifier); no teacher is used then.
    """
    config = config or finetune_config()
    report = report or {}
    before = compressed_accuracy(model, analysis, policy, calibration, report, device)
    qat = QATModel(model, analysis, policy, calibration, device, learn_ranges)
    soft = None
    if distill and loss is None:
        soft = copy.deepcopy(teacher if teacher is not None else model).to(device).eval()
    history = train_model(
        qat.module,
        train,
        config,
        device=device,
        generator=generator,
        val=val,
        progress=progress,
        description="finetune",
        on_epoch=on_epoch,
        after_step=qat.enforce,
        end_epoch=None if learn_ranges else qat.recalibrate,  # learned ranges ignore the calibrated ones
        teacher=soft,
        loss=loss,
        extra_parameters=list(qat.learned.parameters()),  # the ranges stay out of the user's model
    )
    result = qat.fp32_model().eval()
    ranges = qat.activation_ranges()
    after = compressed_accuracy(result, analysis, policy, calibration, report, device, ranges)
    return FinetuneResult(result, history, before, after, ranges)


__all__ = ["OPQ_RECIPE", "FinetuneResult", "QATModel", "compressed_accuracy", "finetune", "finetune_config"]
