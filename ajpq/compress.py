"""The simulated compressed model: what a policy does to a network, with exactly the numbers the artifact will hold.

BatchNorm is folded into the layer before it (as in the exported artifact), each output channel is quantized
with its own width, removed channels give exactly zero and vanish from the inputs of the layers that read them,
and every compressible layer's input is fake-quantized with a range calibrated once on training images. A layer
with ``weight_sparsity`` (policy version 2) first loses its smallest-magnitude weights (:func:`ajpq.cost.magnitude_keep`
on the BN-folded weights, the same mask the cost model prices), then is quantized; removed weights stay exactly 0.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from ajpq.analysis import ModelAnalysis, folded_weights, layer_module
from ajpq.cost import CostModel
from ajpq.policy import Policy
from ajpq.quant import dequantize, quantize_activation, quantize_codes


class ActivationQuantizer:
    """Forward pre-hook that fake-quantizes a layer's input with a fixed, calibrated range."""

    def __init__(self, max_abs: float, signed: bool, bits: int = 8, ste: bool = False) -> None:
        self.max_abs = float(max_abs)
        self.signed = bool(signed)
        self.bits = int(bits)
        self.ste = ste

    def __call__(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if self.bits >= 32:
            return inputs
        return (
            quantize_activation(inputs[0], self.bits, self.max_abs, self.signed, ste=self.ste),
            *inputs[1:],
        )


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at qualified ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def fold_batchnorm(model: nn.Module, analysis: ModelAnalysis) -> nn.Module:
    """Fold each BatchNorm into the Conv2d/Linear before it, in place; the BatchNorm becomes an Identity."""
    weights = folded_weights(model, {layer.name: layer.bn_name for layer in analysis.layers if layer.bn_name})
    for layer in analysis.layers:
        if layer.bn_name is None:
            continue
        module = layer_module(model, layer.name)
        weight, bias = weights[layer.name]
        assert bias is not None
        module.weight.data.copy_(weight.to(module.weight.dtype))
        if module.bias is None:
            module.bias = nn.Parameter(bias.to(module.weight.device, module.weight.dtype))
        else:
            module.bias.data.copy_(bias)
        set_module(model, layer.bn_name, nn.Identity())
    return model


@torch.no_grad()
def calibrate_activations(
    model: nn.Module, analysis: ModelAnalysis, inputs: torch.Tensor
) -> dict[str, tuple[float, bool]]:
    """Range ``max|x|`` and signedness of every compressible layer's input on calibration images."""
    ranges: dict[str, tuple[float, bool]] = {}
    handles = []
    for layer in analysis.layers:

        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], name: str = layer.name) -> None:
            x = args[0]
            ranges[name] = (float(x.abs().max()), bool((x < 0).any()))

        handles.append(model.get_submodule(layer.name).register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return ranges


def input_masks(analysis: ModelAnalysis, cost_model: CostModel, policy: Policy) -> dict[str, torch.Tensor]:
    """Per layer, a ``(out_channels, in_channels/groups)`` mask of the weights that read kept inputs."""
    inputs = cost_model.kept_inputs(policy)
    masks = {}
    for layer in analysis.layers:
        kept_in = torch.from_numpy(inputs[layer.name])
        per_group = kept_in.reshape(layer.groups, -1)
        channel_group = torch.arange(layer.out_channels) // (layer.out_channels // layer.groups)
        masks[layer.name] = per_group[channel_group]
    return masks


class SimulatedModel:
    """A BN-folded copy of a model whose weights are re-quantized in place for each policy.

    ``activation_ranges`` replaces the calibrated ``(max|x|, signed)`` of the named layers' inputs (the ranges
    ``ajpq finetune --learn-ranges`` learned). Building it costs one copy and one calibration pass; :meth:`apply` then
    costs one vectorized quantization per layer, so a search can evaluate thousands of policies without copying the
    network again.
    """

    def __init__(
        self,
        model: nn.Module,
        analysis: ModelAnalysis,
        calibration: torch.Tensor,
        device: torch.device | str = "cpu",
        activation_ranges: Mapping[str, tuple[float, bool]] | None = None,
    ) -> None:
        self.analysis = analysis
        self.device = torch.device(device)
        self.module = fold_batchnorm(copy.deepcopy(model), analysis).to(self.device).eval()
        self._reference: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for layer in analysis.layers:
            module = layer_module(self.module, layer.name)
            bias = None if module.bias is None else module.bias.detach().clone()
            self._reference[layer.name] = (module.weight.detach().clone(), bias)
        self.cost_model = CostModel(analysis, {name: weight for name, (weight, _) in self._reference.items()})
        self.ranges = calibrate_activations(self.module, analysis, calibration.to(self.device))
        for name, (max_abs, signed) in (activation_ranges or {}).items():  # learned by fine-tuning
            self.ranges[name] = (float(max_abs), bool(signed))
        self.quantizers: dict[str, ActivationQuantizer] = {}
        for layer in analysis.layers:
            max_abs, signed = self.ranges[layer.name]
            quantizer = ActivationQuantizer(max_abs, signed)
            self.module.get_submodule(layer.name).register_forward_pre_hook(quantizer)
            self.quantizers[layer.name] = quantizer
        self.policy: Policy | None = None
        self.scales: dict[str, torch.Tensor] = {}
        """The fp16-exact per-channel weight scales of the last applied policy (what the artifact stores)."""

    def reference_weights(self) -> dict[str, torch.Tensor]:
        """The BN-folded FP32 weight of every compressible layer, by name (do not modify them)."""
        return {name: weight for name, (weight, _) in self._reference.items()}

    @torch.no_grad()
    def apply(self, policy: Policy) -> nn.Module:
        """Load the weights ``policy`` gives into the module and return it (a complete, validated policy)."""
        masks = input_masks(self.analysis, self.cost_model, policy)
        inputs = self.cost_model.kept_inputs(policy)
        for layer in self.analysis.layers:
            module = layer_module(self.module, layer.name)
            weight, bias = self._reference[layer.name]
            layer_policy = policy.layers[layer.name]
            bits = torch.from_numpy(layer_policy.weight_bits).to(self.device)
            mask = masks[layer.name].to(self.device, weight.dtype)
            keep = mask.reshape(*mask.shape, *([1] * (weight.dim() - 2))).expand_as(weight).bool()
            if layer_policy.weight_sparsity > 0:
                stored = self.cost_model.weight_mask(
                    layer,
                    layer_policy.weight_bits,
                    inputs[layer.name],
                    layer_policy.weight_sparsity,
                )
                keep = torch.from_numpy(stored).reshape(weight.shape).to(self.device)
            codes, scale = quantize_codes(weight, bits, keep)
            module.weight.copy_(dequantize(codes, scale))
            self.scales[layer.name] = scale
            if bias is not None and module.bias is not None:  # the reference bias is the module's own
                module.bias.copy_(bias * (bits > 0).to(bias.dtype))
            self.quantizers[layer.name].bits = layer_policy.activation_bits
        self.policy = policy
        return self.module


def apply_policy(
    model: nn.Module,
    analysis: ModelAnalysis,
    policy: Policy,
    calibration: torch.Tensor,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A new module that computes what ``policy`` makes of ``model`` (see :class:`SimulatedModel`)."""
    return SimulatedModel(model, analysis, calibration, device).apply(policy)
