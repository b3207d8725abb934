"""The exact cost model: model size in bits and bit operations (BOPs) of a policy, and of the FP32 reference.

For a layer ``l`` with kept output channels ``c``:

* ``fan_in(c)``: weights of ``c`` that read kept input channels (groups and kernel size included);
* ``size_bits = sum_c fan_in(c) * bits(c) + 16 (fp16 scale) + 32 (fp32 bias, if bias or folded BatchNorm)``;
* ``bops = sum_c fan_in(c) * HW(l) * bits(c) * a(l)``, with ``a(l)`` the layer's input-activation bits;
* references: ``size_bits_fp32 = sum over all channels of fan_in * 32 + 32 (bias/BN)``, ``bops_fp32 = MACs*32*32``;
* parameters outside the compressible layers count 32 bits in both numerator and denominator.

A layer with ``weight_sparsity s > 0`` (policy version 2) stores only the weights its magnitude mask keeps (see
:func:`magnitude_mask`), in the cheaper of two sparse formats, counted exactly from the mask positions:

* relative index (Deep Compression): the kept channels' kept-input positions form one stream in row-major order
  (channel, input, kernel row, kernel column); every stored weight costs ``bits(c) + 4`` (a 4-bit gap to the
  previous entry, 0..15 zeros), and a run of ``z`` zeros before a stored weight needs ``z // 16`` filler entries
  (a stored zero of the channel it falls in, ``bits + 4`` each);
* bitmap: one bit per position of the stream plus ``bits(c)`` per stored weight.

Scales and biases are charged as for dense layers, and BOPs count stored weights only. The mask depends on the
weights, so a cost model that is to price sparse layers is built with them (``CostModel(analysis, weights)`` or
:meth:`CostModel.from_model`); the :class:`~ajpq.compress.SimulatedModel` does so.

The same :class:`CostModel` is used by ``evaluate``, the search environments, the budget projection, the methods
and the exporter (whose payload is ``size_bits / 8`` bytes), so every number a user sees agrees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ajpq.analysis import NETWORK_INPUT, LayerInfo, ModelAnalysis, folded_weights
from ajpq.errors import PolicyError
from ajpq.policy import Policy

if TYPE_CHECKING:
    from ajpq.latency import LatencyTable

SCALE_BITS = 16
BIAS_BITS = 32
FP32_BITS = 32
INDEX_BITS = 4
"""Bits of a relative index in the sparse format (gaps of 0..15 zeros; longer gaps need fillers)."""
MAX_GAP = 2**INDEX_BITS - 1
BITMAP_BITS = 1
"""Bits per position of the bitmap format."""


def removed_count(sparsity: float, candidates: int) -> int:
    """How many of ``candidates`` weights a ``weight_sparsity`` removes (rounded; at least one weight stays)."""
    if candidates <= 0 or sparsity <= 0:
        return 0
    return min(int(np.floor(sparsity * candidates + 0.5)), candidates - 1)


def magnitude_keep(magnitude: np.ndarray, candidates: np.ndarray, sparsity: float) -> np.ndarray:
    """Flat bool mask: ``candidates`` minus the ``removed_count`` of them with the smallest ``magnitude``.

    Ties are broken by position (a stable sort), so the simulation, the cost model, the methods and the exporter
    always agree on the mask. Both arguments are flat arrays of the same length.
    """
    keep = candidates.astype(bool, copy=True)
    positions = np.flatnonzero(keep)
    removed = removed_count(sparsity, positions.size)
    if removed:
        order = np.argsort(magnitude[positions], kind="stable")
        keep[positions[order[:removed]]] = False
    return keep


def magnitude_mask(weight: torch.Tensor, candidates: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask (``weight``'s shape and device) of the weights a layer keeps under ``weight_sparsity``.

    ``candidates`` (broadcastable to ``weight``) marks the kept channels' weights on kept inputs; the
    ``removed_count`` candidates of smallest ``|weight|`` are dropped (see :func:`magnitude_keep`).
    """
    candidates = candidates.to(weight.device).bool().expand_as(weight)
    if sparsity <= 0:
        return candidates.clone()
    keep = magnitude_keep(
        weight.detach().abs().float().cpu().numpy().ravel(), candidates.cpu().numpy().ravel(), sparsity
    )
    return torch.from_numpy(keep).reshape(weight.shape).to(weight.device)


def sparse_storage_bits(stream: np.ndarray, stream_bits: np.ndarray) -> tuple[int, int]:
    """Bits of a sparse weight stream in the cheaper format, and which one (0 = relative index, 1 = bitmap).

    ``stream`` holds, position by position, whether a weight is stored; ``stream_bits`` the code width there.
    Returns ``(bits including the codes of stored weights, format)``.
    """
    stored = np.flatnonzero(stream)
    value_bits = int(stream_bits[stored].sum())
    previous = np.concatenate(([-1], stored[:-1])).astype(np.int64)[: stored.size]
    fillers = (stored - previous - 1) // (MAX_GAP + 1)
    filler_positions = np.repeat(previous, fillers) + (MAX_GAP + 1) * (
        np.arange(int(fillers.sum())) - np.repeat(np.cumsum(fillers) - fillers, fillers) + 1
    )
    filler_bits = int(stream_bits[filler_positions].sum())
    relative = value_bits + filler_bits + INDEX_BITS * (stored.size + filler_positions.size)
    bitmap = value_bits + BITMAP_BITS * stream.size
    return (relative, 0) if relative <= bitmap else (bitmap, 1)


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
    storage: str = "dense"
    """How the weights are stored: ``dense``, ``relative-index`` or ``bitmap`` (layers with weight sparsity)."""
    index_bits: int = 0
    """Bits spent on sparse indices (relative indices and fillers' codes, or the bitmap)."""

    @classmethod
    def from_counts(
        cls,
        layer: LayerInfo,
        bits: np.ndarray,
        activation_bits: int,
        weights: int,
        value_bits: int,
        storage_bits: int | None = None,
        storage: str = "dense",
    ) -> LayerCost:
        """The cost of ``layer`` under channel ``bits`` storing ``weights`` weights whose codes take ``value_bits``.

        ``storage_bits`` is what the weights take with their sparse index (the codes alone when dense); every kept
        channel adds :func:`channel_extra_bits`, and BOPs count the stored codes only.
        """
        storage_bits = value_bits if storage_bits is None else storage_bits
        kept = int((bits > 0).sum())
        return cls(
            name=layer.name,
            kept_channels=kept,
            out_channels=layer.out_channels,
            weights=weights,
            mean_bits=value_bits / weights if weights else 0.0,
            activation_bits=activation_bits,
            size_bits=storage_bits + kept * channel_extra_bits(layer),
            bops=int(value_bits * layer.out_hw * activation_bits),
            storage=storage,
            index_bits=storage_bits - value_bits,
        )


def channel_extra_bits(layer: LayerInfo) -> int:
    """Bits a kept output channel costs besides its weights: the fp16 scale, and the fp32 bias or folded BN."""
    return SCALE_BITS + (BIAS_BITS if layer.has_bias else 0)


@dataclass(frozen=True)
class CostReport:
    """Size and BOPs of a policy next to the FP32 reference."""

    size_bits: int
    bops: int
    reference_size_bits: int
    reference_bops: int
    layers: tuple[LayerCost, ...] = ()
    latency_ms: float | None = None
    """Predicted latency (:mod:`ajpq.latency`); None when the cost model has no latency table."""
    reference_latency_ms: float | None = None
    """The FP32 model's measured latency on the table's target."""

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

    @property
    def latency_ratio(self) -> float | None:
        """Predicted latency as a ratio of FP32's measured one (None without a latency table)."""
        if self.latency_ms is None or not self.reference_latency_ms:
            return None
        return self.latency_ms / self.reference_latency_ms

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
        if self.latency_ms is not None:
            result["latency_ms"] = self.latency_ms
            result["latency_ratio"] = self.latency_ratio
            result["reference_latency_ms"] = self.reference_latency_ms
        if per_layer:
            result["layers"] = [asdict(layer) for layer in self.layers]
        return result


class CostModel:
    """Computes :class:`CostReport` s for one analysed model; cheap enough to call at every search step.

    ``weights`` (each layer's BN-folded weight, by layer name) is needed only to price layers with weight sparsity,
    whose stored positions depend on the weights' magnitudes.
    """

    def __init__(
        self,
        analysis: ModelAnalysis,
        weights: Mapping[str, torch.Tensor] | None = None,
        latency: LatencyTable | None = None,
    ) -> None:
        self.analysis = analysis
        self.latency = latency
        """Per-layer latency table (:mod:`ajpq.latency`): with one, reports predict latency (a latency budget needs
        it); channel pruning is what changes it, so it is priced from kept inputs and outputs alone."""
        self._magnitudes = (
            None
            if weights is None
            else {name: w.detach().abs().float().cpu().numpy().ravel() for name, w in weights.items()}
        )
        self._sparse_cache: dict[tuple, tuple[np.ndarray, np.ndarray, int, int, str]] = {}
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

    @property
    def prices_sparsity(self) -> bool:
        """Whether this cost model has the weights, which pricing weight sparsity needs."""
        return self._magnitudes is not None

    @classmethod
    def from_model(cls, analysis: ModelAnalysis, model: nn.Module) -> CostModel:
        """A cost model that can price weight sparsity, with ``model``'s BN-folded weights."""
        folded = folded_weights(model, {layer.name: layer.bn_name for layer in analysis.layers if layer.bn_name})
        return cls(analysis, {layer.name: folded[layer.name][0] for layer in analysis.layers})

    def group_kept(self, policy: Policy) -> list[np.ndarray]:
        """Kept mask of every coupled group (:meth:`Policy.group_kept`), by group id."""
        return [policy.group_kept(self.analysis, group.id) for group in self.analysis.groups]

    def input_kept(self, layer: LayerInfo, group_kept: list[np.ndarray]) -> np.ndarray:
        """Which input channels of ``layer`` survive the policy's pruning of the layers before it."""
        mask = np.ones(layer.in_channels, dtype=bool)
        for gid, positions, roots in self._inputs[layer.name]:
            mask[positions] = group_kept[gid][roots]
        return mask

    def kept_inputs(self, policy: Policy) -> dict[str, np.ndarray]:
        """:meth:`input_kept` of every layer under ``policy``, by layer name."""
        group_kept = self.group_kept(policy)
        return {layer.name: self.input_kept(layer, group_kept) for layer in self.analysis.layers}

    def fan_in(self, layer: LayerInfo, input_kept: np.ndarray) -> np.ndarray:
        """Weights of each output channel that read kept inputs."""
        per_group = input_kept.reshape(layer.groups, -1).sum(axis=1)
        channel_group = np.arange(layer.out_channels) // (layer.out_channels // layer.groups)
        return per_group[channel_group].astype(np.int64) * layer.kernel_area

    def layer_cost(self, layer: LayerInfo, bits: np.ndarray, activation_bits: int, fan_in: np.ndarray) -> LayerCost:
        stored = fan_in * (bits > 0)
        return LayerCost.from_counts(layer, bits, activation_bits, int(stored.sum()), int((stored * bits).sum()))

    def candidates(self, layer: LayerInfo, bits: np.ndarray, input_kept: np.ndarray) -> np.ndarray:
        """``(out, in/groups)`` bool: weights of kept channels that read kept inputs (before weight sparsity)."""
        per_group = input_kept.reshape(layer.groups, -1)
        channel_group = np.arange(layer.out_channels) // (layer.out_channels // layer.groups)
        return per_group[channel_group] & (bits > 0)[:, None]

    def weight_mask(self, layer: LayerInfo, bits: np.ndarray, input_kept: np.ndarray, sparsity: float) -> np.ndarray:
        """Flat bool mask of the weights a layer stores under a policy (row-major over its weight tensor)."""
        return self._sparse(layer, bits, input_kept, sparsity)[0]

    def _sparse(
        self, layer: LayerInfo, bits: np.ndarray, input_kept: np.ndarray, sparsity: float
    ) -> tuple[np.ndarray, np.ndarray, int, int, str]:
        """Mask, stored weights per channel, storage bits, value bits and format of a sparse layer (cached)."""
        key = (layer.name, float(sparsity), bits.tobytes(), input_kept.tobytes())
        cached = self._sparse_cache.get(key)
        if cached is not None:
            return cached
        if self._magnitudes is None:
            raise PolicyError(
                f"layer '{layer.name}' has weight_sparsity {sparsity:g}, whose stored weights depend on the weights' "
                "magnitudes, but this cost model was built without weights; build it with "
                "CostModel.from_model(analysis, model) (or use the simulated model's cost model)"
            )
        magnitude = self._magnitudes[layer.name]
        candidates = np.repeat(self.candidates(layer, bits, input_kept).ravel(), layer.kernel_area)
        keep = magnitude_keep(magnitude, candidates, sparsity)
        positions = np.flatnonzero(candidates)
        stream_bits = bits[positions // (magnitude.size // layer.out_channels)]
        storage_bits, fmt = sparse_storage_bits(keep[positions], stream_bits)
        stored_per_channel = keep.reshape(layer.out_channels, -1).sum(axis=1).astype(np.int64)
        value_bits = int((stored_per_channel * bits).sum())
        cached = (keep, stored_per_channel, storage_bits, value_bits, ("relative-index", "bitmap")[fmt])
        if len(self._sparse_cache) > 1024:
            self._sparse_cache.clear()
        self._sparse_cache[key] = cached
        return cached

    def stored_weights(self, layer: LayerInfo, bits: np.ndarray, input_kept: np.ndarray, sparsity: float) -> np.ndarray:
        """Weights each output channel stores under a policy: its fan-in when kept, minus what weight sparsity
        removes (0 for a pruned channel)."""
        if sparsity > 0:
            return self._sparse(layer, bits, input_kept, sparsity)[1]
        return self.fan_in(layer, input_kept) * (bits > 0)

    def sparse_layer_cost(
        self, layer: LayerInfo, bits: np.ndarray, activation_bits: int, input_kept: np.ndarray, sparsity: float
    ) -> LayerCost:
        """Cost of a layer with weight sparsity, counted exactly from its magnitude mask (see the module doc)."""
        _, stored_per_channel, storage_bits, value_bits, fmt = self._sparse(layer, bits, input_kept, sparsity)
        weights = int(stored_per_channel.sum())
        return LayerCost.from_counts(layer, bits, activation_bits, weights, value_bits, storage_bits, fmt)

    def layer_latency(self, layer: LayerInfo, input_kept: np.ndarray, bits: np.ndarray) -> float:
        """Predicted milliseconds of ``layer`` with these kept inputs and channel bits (0 without a table)."""
        if self.latency is None:
            return 0.0
        return self.latency.layer_ms(layer, int(input_kept.sum()), int((bits > 0).sum()))

    def evaluate(self, policy: Policy) -> CostReport:
        """Size and BOPs of a complete policy (see :func:`ajpq.policy.validate_policy`), and its predicted latency
        when the cost model has a latency table."""
        inputs = self.kept_inputs(policy)
        latency = None
        if self.latency is not None:
            latency = sum(
                self.layer_latency(layer, inputs[layer.name], policy.layers[layer.name].weight_bits)
                for layer in self.analysis.layers
            )
        layers = []
        for layer in self.analysis.layers:
            layer_policy = policy.layers[layer.name]
            input_kept = inputs[layer.name]
            if layer_policy.weight_sparsity > 0:
                layers.append(
                    self.sparse_layer_cost(
                        layer,
                        layer_policy.weight_bits,
                        layer_policy.activation_bits,
                        input_kept,
                        layer_policy.weight_sparsity,
                    )
                )
                continue
            fan_in = self.fan_in(layer, input_kept)
            layers.append(self.layer_cost(layer, layer_policy.weight_bits, layer_policy.activation_bits, fan_in))
        return CostReport(
            size_bits=self.other_bits + sum(cost.size_bits for cost in layers),
            bops=sum(cost.bops for cost in layers),
            reference_size_bits=self.reference_size_bits,
            reference_bops=self.reference_bops,
            layers=tuple(layers),
            latency_ms=latency,
            reference_latency_ms=None if self.latency is None else self.latency.reference_ms,
        )
