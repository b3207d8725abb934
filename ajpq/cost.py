"""The exact cost model: model size in bits and bit operations (BOPs) of a policy, and of the FP32 reference.

For a layer ``l`` with kept output channels ``c``:

* ``fan_in(c)``: weights of ``c`` that read kept input channels (groups and kernel size included);
* ``size_bits = sum_c fan_in(c) * bits(c) + 16 (fp16 scale) + 32 (fp32 bias, if bias or folded BatchNorm)``;
* ``bops = sum_c fan_in(c) * HW(l) * bits(c) * a(l)``, with ``a(l)`` the layer's input-activation bits;
* references: ``size_bits_fp32 = sum over all channels of fan_in * 32 + 32 (bias/BN)``, ``bops_fp32 = MACs*32*32``;
* parameters outside the compressible layers count 32 bits in both numerator and denominator.

The same :class:`CostModel` is used by ``evaluate``, the search environments, the budget projection, the methods
and the exporter (whose payload is ``size_bits / 8`` bytes), so every number a user sees agrees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ajpq.analysis import NETWORK_INPUT, LayerInfo, ModelAnalysis
from ajpq.policy import Policy

SCALE_BITS = 16
BIAS_BITS = 32
FP32_BITS = 32


@dataclass(frozen=True)
class LayerCost:
    """Cost of one layer under a policy."""

    name: str
    kept_channels: int
    out_channels: int
    weights: int
    """Stored weights (sum of the kept channels' fan-in)."""
    mean_bits: float
    """Weight bits averaged over the stored weights."""
    activation_bits: int
    size_bits: int
    bops: int


@dataclass(frozen=True)
class CostReport:
    """Size and BOPs of a policy next to the FP32 reference."""

    size_bits: int
    bops: int
    reference_size_bits: int
    reference_bops: int
    layers: tuple[LayerCost, ...] = ()

    @property
    def size_ratio(self) -> float:
        return self.size_bits / self.reference_size_bits

    @property
    def compression_rate(self) -> float:
        return self.reference_size_bits / self.size_bits

    @property
    def bops_ratio(self) -> float:
        return self.bops / self.reference_bops

    @property
    def bops_compression_rate(self) -> float:
        return self.reference_bops / self.bops

    def as_dict(self, per_layer: bool = False) -> dict[str, object]:
        result: dict[str, object] = {
            "size_bits": self.size_bits,
            "size_ratio": self.size_ratio,
            "compression_rate": self.compression_rate,
            "bops": self.bops,
            "bops_ratio": self.bops_ratio,
            "reference_size_bits": self.reference_size_bits,
            "reference_bops": self.reference_bops,
        }
        if per_layer:
            result["layers"] = [asdict(layer) for layer in self.layers]
        return result


class CostModel:
    """Computes :class:`CostReport` s for one analysed model; cheap enough to call at every search step."""

    def __init__(self, analysis: ModelAnalysis) -> None:
        self.analysis = analysis
        self._inputs: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for layer in analysis.layers:
            groups = analysis.in_group[layer.name]
            roots = analysis.in_root[layer.name]
            self._inputs[layer.name] = [
                (int(gid), np.flatnonzero(groups == gid), roots[groups == gid])
                for gid in np.unique(groups)
                if gid != NETWORK_INPUT
            ]
        self.other_bits = analysis.other_params * FP32_BITS
        self.reference_size_bits = self.other_bits + sum(
            layer.out_channels * (layer.fan_in * FP32_BITS + (BIAS_BITS if layer.has_bias else 0))
            for layer in analysis.layers
        )
        self.reference_bops = sum(layer.macs for layer in analysis.layers) * FP32_BITS * FP32_BITS

    def group_kept(self, policy: Policy) -> list[np.ndarray]:
        """Kept mask of every coupled group, read from its first member layer."""
        kept = []
        for group in self.analysis.groups:
            member = group.members[0]
            mask = np.empty(group.size, dtype=bool)
            mask[self.analysis.out_root[member]] = policy.layers[member].weight_bits > 0
            kept.append(mask)
        return kept

    def input_kept(self, layer: LayerInfo, group_kept: list[np.ndarray]) -> np.ndarray:
        """Which input channels of ``layer`` survive the policy's pruning of the layers before it."""
        mask = np.ones(layer.in_channels, dtype=bool)
        for gid, positions, roots in self._inputs[layer.name]:
            mask[positions] = group_kept[gid][roots]
        return mask

    def fan_in(self, layer: LayerInfo, input_kept: np.ndarray) -> np.ndarray:
        """Weights of each output channel that read kept inputs."""
        per_group = input_kept.reshape(layer.groups, -1).sum(axis=1)
        channel_group = np.arange(layer.out_channels) // (layer.out_channels // layer.groups)
        return per_group[channel_group].astype(np.int64) * layer.kernel_area

    def layer_cost(self, layer: LayerInfo, bits: np.ndarray, activation_bits: int, fan_in: np.ndarray) -> LayerCost:
        kept = bits > 0
        stored = fan_in * kept
        weight_bits = int((stored * bits).sum())
        per_channel_extra = SCALE_BITS + (BIAS_BITS if layer.has_bias else 0)
        size = weight_bits + int(kept.sum()) * per_channel_extra
        bops = weight_bits * layer.out_hw * activation_bits
        weights = int(stored.sum())
        return LayerCost(
            name=layer.name,
            kept_channels=int(kept.sum()),
            out_channels=layer.out_channels,
            weights=weights,
            mean_bits=weight_bits / weights if weights else 0.0,
            activation_bits=activation_bits,
            size_bits=size,
            bops=int(bops),
        )

    def evaluate(self, policy: Policy) -> CostReport:
        """Size and BOPs of a complete policy (see :func:`ajpq.policy.validate_policy`)."""
        group_kept = self.group_kept(policy)
        layers = []
        for layer in self.analysis.layers:
            layer_policy = policy.layers[layer.name]
            fan_in = self.fan_in(layer, self.input_kept(layer, group_kept))
            layers.append(self.layer_cost(layer, layer_policy.weight_bits, layer_policy.activation_bits, fan_in))
        return CostReport(
            size_bits=self.other_bits + sum(cost.size_bits for cost in layers),
            bops=sum(cost.bops for cost in layers),
            reference_size_bits=self.reference_size_bits,
            reference_bops=self.reference_bops,
            layers=tuple(layers),
        )
