"""The compressed-model artifact: removed channels physically gone, BatchNorm folded, weights packed at their bits.

An ``.ajpq`` file is a fixed 48-byte preamble, a JSON header and a binary payload (all integers little-endian)::

    offset  size  field
    0       8     magic b"\\x89AJPQ\\r\\n\\x1a" (detects text-mode transfers and non-artifacts)
    8       2     format version (uint16; this build writes 2 and reads 1 and 2)
    10      2     reserved (0)
    12      4     H = length of the JSON header in bytes (uint32)
    16      32    sha256 of the JSON header bytes
    48      H     JSON header (UTF-8): format, model, slim architecture, policy, activation quantizers,
                  tensor table (offset and length of every payload segment), metrics, payload length and sha256
    48+H    P     payload: per compressible layer, in execution order, three segments:
                    weights  the kept channels' integer codes, one bit stream per layer (LSB first, padded to a
                             byte at the end), laid out as the layer's header ``storage`` says: ``dense`` (channels
                             one after the other, each code in its channel's width b; the only layout of version 1),
                             or for layers with weight sparsity ``relative-index`` / ``bitmap``, the format the cost
                             model charged (see :func:`encode_sparse`)
                    scales   one fp16 per kept channel
                    bias     one fp32 per kept channel (only for layers with a bias or a folded BatchNorm)
                  then any other parameters/buffers of the slim model as raw fp32 (none for the zoo models).

A code of a ``b >= 2`` bit channel is stored as ``code + 2^(b-1) - 1`` (0 .. 2^b - 2); a 1-bit code as its sign bit
(1 = +1, 0 = -1); a removed (0-bit) channel stores nothing. The weights are ``code * scale``, which is exactly the
simulated model's weight (:mod:`ajpq.quant`), so the payload is ``CostModel.size_bits / 8`` bytes plus less than one
byte of padding per layer.

The slim network is rebuilt from the recorded model name (``build_model``): each folded BatchNorm becomes an
Identity, the recorded removed channels are cut with torch-pruning (which also cuts the coupled inputs of the layers
that read them: residual sums, depthwise convs, flatten -> linear), the unpacked weights are loaded, and every
compressible layer gets its calibrated input-activation quantizer back.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ajpq._version import __version__
from ajpq.analysis import ModelAnalysis, fingerprint_of, layer_module
from ajpq.compress import SimulatedModel, set_module
from ajpq.errors import ArtifactError, ModelError, shown
from ajpq.io import atomic_write_bytes, parse_json
from ajpq.models import build_model, is_builtin_model
from ajpq.policy import Policy, policy_from_dict
from ajpq.quant import ACTIVATION_BITS_ALLOWED, MAX_WEIGHT_BITS, activation_scale, quantize_activation, weight_levels

MAGIC = b"\x89AJPQ\r\n\x1a"
ARTIFACT_FORMAT = "ajpq-artifact"
ARTIFACT_VERSION = 2
READABLE_VERSIONS: tuple[int, ...] = (1, 2)
_PREAMBLE = struct.Struct("<8sHHI32s")
PREAMBLE_BYTES = _PREAMBLE.size  # 48


# ---------------------------------------------------------------------------------------------------------------
# Sub-byte packing
# ---------------------------------------------------------------------------------------------------------------


def _levels(widths: np.ndarray) -> np.ndarray:
    return weight_levels(torch.from_numpy(np.asarray(widths, dtype=np.int64))).numpy()


def pack_codes(codes: np.ndarray, widths: np.ndarray) -> bytes:
    """Pack integer codes (one row per channel) into one LSB-first bit stream, ``widths[c]`` bits per code of row c.

    Rows of 0-bit channels must be all zero and take no space. The stream is padded with zero bits to a whole byte.
    Rows are packed one after the other, so a later per-weight mask (sparse rows of different lengths) only changes
    which codes a row holds, not the stream layout.

    Raises:
        ArtifactError: a code does not fit its channel's width.
    """
    widths = np.asarray(widths, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.int64).reshape(len(widths), -1)
    if widths.size and (widths.min() < 0 or widths.max() > MAX_WEIGHT_BITS):
        raise ArtifactError(f"weight widths must be 0..{MAX_WEIGHT_BITS}, but got {sorted(set(widths.tolist()))}")
    levels = _levels(widths)[:, None]
    bad = (np.abs(codes) > levels) | ((widths[:, None] == 1) & (codes == 0))
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise ArtifactError(f"code out of range for a {int(widths[row])}-bit channel (row {row})")
    per_row = codes.shape[1]
    total = int((widths * per_row).sum())
    bits = np.zeros(total, dtype=np.uint8)
    unsigned = np.where(widths[:, None] == 1, (codes > 0).astype(np.int64), codes + levels)
    position = 0
    for width in range(1, MAX_WEIGHT_BITS + 1):
        rows = np.flatnonzero(widths == width)
        if rows.size == 0:
            continue
        shifts = np.arange(width, dtype=np.int64)
        stream = ((unsigned[rows][:, :, None] >> shifts) & 1).astype(np.uint8).reshape(rows.size, -1)
        starts = np.cumsum(np.concatenate([[0], widths * per_row]))[rows]
        for row_bits, start in zip(stream, starts, strict=True):
            bits[start : start + row_bits.size] = row_bits
        position += stream.size
    assert position == total
    return np.packbits(bits, bitorder="little").tobytes()


def packed_bytes(widths: np.ndarray, per_row: int) -> int:
    """Length of :func:`pack_codes`' stream."""
    return math.ceil(int(np.asarray(widths, dtype=np.int64).sum()) * per_row / 8)


def unpack_codes(data: bytes, widths: np.ndarray, per_row: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: an int64 array ``(len(widths), per_row)`` (0-bit rows are zeros)."""
    widths = np.asarray(widths, dtype=np.int64)
    expected = packed_bytes(widths, per_row)
    if len(data) != expected:
        raise ArtifactError(f"a weight stream has {len(data)} bytes, but its widths need {expected}")
    total = int(widths.sum()) * per_row
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little", count=total).astype(np.int64)
    codes = np.zeros((len(widths), per_row), dtype=np.int64)
    starts = np.cumsum(np.concatenate([[0], widths * per_row]))
    for width in range(1, MAX_WEIGHT_BITS + 1):
        rows = np.flatnonzero(widths == width)
        if rows.size == 0:
            continue
        index = starts[rows][:, None] + np.arange(per_row * width)[None, :]
        stream = bits[index].reshape(rows.size, per_row, width)
        values = (stream << np.arange(width, dtype=np.int64)).sum(axis=2)
        codes[rows] = 2 * values - 1 if width == 1 else values - int(_levels(np.array([width]))[0])
    return codes


# ---------------------------------------------------------------------------------------------------------------
# Sparse layers (format version 2): relative index with fillers, or bitmap
# ---------------------------------------------------------------------------------------------------------------


def _bit_fields(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The bits (uint8, LSB first) of each value in its width, one field after the other."""
    values = np.asarray(values, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    total = int(widths.sum())
    field = np.repeat(np.arange(values.size), widths)
    offset = np.arange(total) - np.repeat(np.cumsum(widths) - widths, widths)
    return ((values[field] >> offset) & 1).astype(np.uint8)


def _unsigned_codes(codes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """A code as stored: ``code + 2^(b-1) - 1`` for ``b >= 2``, the sign bit for ``b = 1`` (as :func:`pack_codes`)."""
    return np.where(widths == 1, (codes > 0).astype(np.int64), codes + _levels(widths))


def _signed_codes(stored: np.ndarray, widths: np.ndarray) -> np.ndarray:
    return np.where(widths == 1, 2 * stored - 1, stored - _levels(widths))


def encode_sparse(
    codes: np.ndarray, widths: np.ndarray, keep: np.ndarray, storage: str
) -> tuple[bytes, dict[str, Any]]:
    """One LSB-first bit stream of a sparse layer's kept channels, as the cost model prices it.

    ``codes`` is ``(channels, per_row)`` (the slim weight's codes, row-major, so the positions are the cost model's
    stream), ``keep`` the same-shaped stored mask. ``bitmap``: one bit per position, then every stored code at its
    channel's width. ``relative-index``: per stored weight, a 4-bit gap (zeros since the previous entry) then the
    code; a run of more than 15 zeros is bridged by filler entries (gap 15, a zero code at the width of the channel
    the filler falls in). Also returns what the header records to read the stream back: for relative indices the
    number of entries (the stream's padding could otherwise pass for entries) and the entry numbers of fillers in
    1-bit channels (a 1-bit code has no zero; every other filler decodes to the zero it stands for).

    Raises:
        ArtifactError: a code does not fit its channel's width, or ``storage`` is unknown.
    """
    from ajpq.cost import INDEX_BITS, MAX_GAP

    widths = np.asarray(widths, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.int64).reshape(len(widths), -1)
    keep = np.asarray(keep, dtype=bool).reshape(codes.shape)
    bad = keep & ((np.abs(codes) > _levels(widths)[:, None]) | ((widths[:, None] == 1) & (codes == 0)))
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise ArtifactError(f"code out of range for a {int(widths[row])}-bit channel (row {row})")
    per_row = codes.shape[1]
    stored = np.flatnonzero(keep.ravel())
    flat_codes, row_of = codes.ravel(), np.arange(codes.size) // max(per_row, 1)
    if storage == "bitmap":
        values = np.concatenate(
            [keep.ravel().astype(np.int64), _unsigned_codes(flat_codes[stored], widths[row_of[stored]])]
        )
        field_widths = np.concatenate([np.ones(codes.size, dtype=np.int64), widths[row_of[stored]]])
        return np.packbits(_bit_fields(values, field_widths), bitorder="little").tobytes(), {}
    if storage != "relative-index":
        raise ArtifactError(f"unknown sparse storage {storage!r}")
    previous = np.concatenate(([-1], stored[:-1])).astype(np.int64)[: stored.size]
    fillers = (stored - previous - 1) // (MAX_GAP + 1)
    filler_positions = np.repeat(previous, fillers) + (MAX_GAP + 1) * (
        np.arange(int(fillers.sum())) - np.repeat(np.cumsum(fillers) - fillers, fillers) + 1
    )
    positions = np.sort(np.concatenate([stored, filler_positions]))
    is_filler = np.isin(positions, filler_positions)
    gaps = np.diff(np.concatenate(([-1], positions))) - 1
    entry_widths = widths[row_of[positions]]
    entry_codes = np.where(is_filler, 0, flat_codes[positions])
    values = np.stack([gaps, _unsigned_codes(entry_codes, entry_widths)], axis=1).ravel()
    field_widths = np.stack([np.full(positions.size, INDEX_BITS), entry_widths], axis=1).ravel()
    info = {
        "entries": int(positions.size),
        "one_bit_fillers": np.flatnonzero(is_filler & (entry_widths == 1)).tolist(),
    }
    return np.packbits(_bit_fields(values, field_widths), bitorder="little").tobytes(), info


def decode_sparse(
    data: bytes, widths: np.ndarray, per_row: int, storage: str, info: dict[str, Any] | None = None
) -> np.ndarray:
    """Inverse of :func:`encode_sparse`: the ``(len(widths), per_row)`` int64 codes (unstored weights 0)."""
    from ajpq.cost import INDEX_BITS

    widths = np.asarray(widths, dtype=np.int64)
    size = len(widths) * per_row
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little").astype(np.int64)
    codes = np.zeros(size, dtype=np.int64)
    row_of = np.arange(size) // max(per_row, 1)
    truncated = ArtifactError("a sparse weight stream is shorter than its entries need; the artifact is corrupted")
    if storage == "bitmap":
        if bits.size < size:
            raise truncated
        stored = np.flatnonzero(bits[:size])
        field_widths = widths[row_of[stored]]
        end = size + int(field_widths.sum())
        if bits.size < end or bits.size - end >= 8:
            raise truncated
        starts = size + np.cumsum(field_widths) - field_widths
        values = np.zeros(stored.size, dtype=np.int64)
        for width in range(1, MAX_WEIGHT_BITS + 1):
            chosen = np.flatnonzero(field_widths == width)
            index = starts[chosen][:, None] + np.arange(width)[None, :]
            values[chosen] = (bits[index] << np.arange(width, dtype=np.int64)).sum(axis=1)
        codes[stored] = _signed_codes(values, field_widths)
        return codes.reshape(len(widths), per_row)
    if storage != "relative-index":
        raise ArtifactError(f"unknown sparse storage {storage!r}; re-export the model with this version of AJPQ")
    info = info or {}
    try:
        entries = int(info["entries"])
        fillers = {int(i) for i in info.get("one_bit_fillers", ())}
    except (KeyError, TypeError, ValueError):
        raise ArtifactError("a relative-index layer lacks its entry count; the artifact is corrupted") from None
    weights = [1 << k for k in range(max(INDEX_BITS, MAX_WEIGHT_BITS))]
    cursor, position = 0, -1
    for entry in range(entries):
        if cursor + INDEX_BITS > bits.size:
            raise truncated
        gap = int(np.dot(bits[cursor : cursor + INDEX_BITS], weights[:INDEX_BITS]))
        position += gap + 1
        if position >= size:
            raise ArtifactError("a sparse weight stream points past its layer; the artifact is corrupted")
        width = int(widths[position // per_row])
        cursor += INDEX_BITS
        if cursor + width > bits.size:
            raise truncated
        value = int(np.dot(bits[cursor : cursor + width], weights[:width]))
        cursor += width
        if entry not in fillers:
            codes[position] = value - int(_levels(np.array([width]))[0]) if width > 1 else 2 * value - 1
    if bits.size - cursor >= 8:
        raise ArtifactError("a sparse weight stream is longer than its entries; the artifact is corrupted")
    return codes.reshape(len(widths), per_row)


# ---------------------------------------------------------------------------------------------------------------
# Activation quantizers of the slim model
# ---------------------------------------------------------------------------------------------------------------


class ActivationFakeQuant:
    """Forward pre-hook: the simulated model's input-activation quantizer ``clamp(round(x / s)) * s``.

    Computed with in-place ops after the division, bit-identical to :func:`ajpq.quant.quantize_activation`.
    (``torch.fake_quantize_per_tensor_affine`` is one kernel but multiplies by ``1/s``, which rounds a few values
    per million the other way; in a deep net those flips grow into visible logit differences.) ONNX export gets
    explicit Div/Round/Clip/Mul in the float export (:mod:`ajpq.onnx_export` writes QuantizeLinear/DequantizeLinear
    for the QDQ one).
    """

    def __init__(self, bits: int, max_abs: float, signed: bool) -> None:
        self.bits = int(bits)
        self.max_abs = float(max_abs)
        self.signed = bool(signed)
        self.scale = activation_scale(self.max_abs, self.bits, self.signed) if self.bits < 32 else 1.0
        high = 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1
        self.quant_min, self.quant_max = (-high if self.signed else 0), high

    def __call__(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if self.bits >= 32:
            return inputs
        x = inputs[0]
        if torch.onnx.is_in_onnx_export() or x.requires_grad:
            quantized = quantize_activation(x, self.bits, self.max_abs, self.signed)
        else:
            quantized = torch.div(x, self.scale).round_().clamp_(self.quant_min, self.quant_max).mul_(self.scale)
        return (quantized, *inputs[1:])

    def as_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "max_abs": self.max_abs, "signed": self.signed}


# ---------------------------------------------------------------------------------------------------------------
# Slim architecture: fold structure, physical pruning
# ---------------------------------------------------------------------------------------------------------------


def _fold_structure(model: nn.Module, layers: list[dict[str, Any]]) -> None:
    """Turn each folded BatchNorm into an Identity and give its layer a bias (the values are loaded later)."""
    for entry in layers:
        if not entry.get("bn_name"):
            continue
        module = layer_module(model, entry["name"])
        if not isinstance(_submodule(model, entry["bn_name"]), nn.BatchNorm2d | nn.BatchNorm1d):
            raise ModelError(f"'{entry['bn_name']}' is not a BatchNorm of the model; the artifact does not fit it")
        set_module(model, entry["bn_name"], nn.Identity())
        if module.bias is None:
            out = module.weight.shape[0]
            module.bias = nn.Parameter(torch.zeros(out, dtype=module.weight.dtype, device=module.weight.device))


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _prune(model: nn.Module, groups: list[dict[str, Any]], input_shape: tuple[int, ...]) -> None:
    """Remove each group's channels with torch-pruning (coupled layers follow) in place."""
    todo = [g for g in groups if g["removed"]]
    if not todo:
        return
    import torch_pruning as tp

    example = torch.zeros(1, *input_shape)
    try:
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
            for group in todo:
                module = model.get_submodule(group["root"])
                fn = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
                graph.get_pruning_group(module, fn, idxs=[int(i) for i in group["removed"]]).prune()
    except Exception as exc:  # torch-pruning raises many types on graphs it cannot handle
        raise ModelError(
            f"torch-pruning could not remove the channels physically ({type(exc).__name__}: {exc})"
        ) from exc


def _architecture(analysis: ModelAnalysis, policy: Policy) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Header entries of the layers (BatchNorm to fold) and of the groups (channels to remove)."""
    layers = [{"name": layer.name, "type": layer.type, "bn_name": layer.bn_name} for layer in analysis.layers]
    groups = []
    for group in analysis.groups:
        root = group.members[0]
        removed = np.flatnonzero(policy.layers[root].weight_bits == 0)
        groups.append({"id": group.id, "members": list(group.members), "root": root, "removed": removed.tolist()})
    return layers, groups


def slim_structure(
    model: nn.Module, analysis: ModelAnalysis, policy: Policy | None, input_shape: tuple[int, ...]
) -> nn.Module:
    """A copy of ``model`` shaped as the artifact of ``policy`` loads (None: nothing removed): BatchNorm folded into
    biases, the removed channels physically gone, an activation quantizer before every layer. Its weights are not
    the compressed ones: it is for timing (:mod:`ajpq.latency`), which depends on the shapes only."""
    slim = copy.deepcopy(model).cpu().eval()
    layers, groups = _architecture(analysis, policy if policy is not None else Policy.uniform(analysis, 8, 8))
    _fold_structure(slim, layers)
    _prune(slim, groups, input_shape)
    _install_quantizers(slim, {layer.name: {"bits": 8, "max_abs": 1.0, "signed": True} for layer in analysis.layers})
    return slim.eval()


def _install_quantizers(model: nn.Module, activations: dict[str, dict[str, Any]]) -> dict[str, ActivationFakeQuant]:
    quantizers = {}
    for name, spec in activations.items():
        quantizer = ActivationFakeQuant(int(spec["bits"]), float(spec["max_abs"]), bool(spec["signed"]))
        model.get_submodule(name).register_forward_pre_hook(quantizer)
        quantizers[name] = quantizer
    return quantizers


# ---------------------------------------------------------------------------------------------------------------
# Building and writing an artifact
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CompressedArtifact:
    """An artifact in memory: header, payload, the slim model it encodes and the simulated model it reproduces."""

    header: dict[str, Any]
    payload: bytes
    slim: nn.Module
    simulated: nn.Module

    @property
    def header_bytes(self) -> bytes:
        return json.dumps(self.header, separators=(",", ":")).encode("utf-8")

    def to_bytes(self) -> bytes:
        header = self.header_bytes
        preamble = _PREAMBLE.pack(MAGIC, ARTIFACT_VERSION, 0, len(header), hashlib.sha256(header).digest())
        return preamble + header + self.payload

    def write(self, path: str | Path) -> Path:
        """Write the file atomically."""
        data = self.to_bytes()
        return atomic_write_bytes(path, data)


def _segment(payload: io.BytesIO, data: bytes) -> list[int]:
    offset = payload.tell()
    payload.write(data)
    return [offset, len(data)]


@torch.no_grad()
def build_artifact(
    model: nn.Module,
    analysis: ModelAnalysis,
    policy: Policy,
    calibration: torch.Tensor,
    *,
    model_name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    dataset: str | None = None,
    metrics: dict[str, Any] | None = None,
    activation_ranges: Mapping[str, tuple[float, bool]] | None = None,
) -> CompressedArtifact:
    """Compress ``model`` (FP32, BatchNorm unfolded) with a complete, validated ``policy`` into an artifact.

    The simulated model is ``SimulatedModel(model, analysis, calibration).apply(policy)`` on the CPU; the slim model
    is rebuilt from the artifact bytes exactly as :func:`load_compressed` does, and checked against it on the
    calibration images (``metrics["max_abs_logit_diff"]``). ``activation_ranges`` (learned by ``ajpq finetune
    --learn-ranges``) replace the calibrated input ranges of the layers they name.
    """
    model = copy.deepcopy(model).cpu().eval()
    broken = [
        name for name, value in model.state_dict().items() if value.is_floating_point() and not value.isfinite().all()
    ]
    if broken:
        raise ArtifactError(
            f"the model's {broken[0]} holds NaN or infinite values (training diverged?); export the weights from "
            "before, or fine-tune again with a lower learning rate"
        )
    calibration = calibration.cpu()
    simulator = SimulatedModel(model, analysis, calibration, "cpu", activation_ranges)
    simulated = simulator.apply(policy)
    cost = simulator.cost_model.evaluate(policy)
    layers, groups = _architecture(analysis, policy)

    slim = copy.deepcopy(simulated)
    for layer in analysis.layers:
        slim.get_submodule(layer.name)._forward_pre_hooks.clear()
    _prune(slim, groups, input_shape)

    payload = io.BytesIO()
    tensors: dict[str, Any] = {}
    scales_of = {name: scale.cpu() for name, scale in simulator.scales.items()}
    for entry, layer in zip(layers, analysis.layers, strict=True):
        module = layer_module(slim, layer.name)
        bits = policy.layers[layer.name].weight_bits
        widths = bits[bits > 0]
        weight = module.weight.detach().float()
        if weight.shape[0] != widths.size:
            raise ArtifactError(
                f"layer '{layer.name}' has {weight.shape[0]} channels after pruning, but the policy keeps "
                f"{widths.size}; the model's channel coupling is not what the analysis found"
            )
        scale = scales_of[layer.name][torch.from_numpy(bits > 0)]
        flat = weight.reshape(weight.shape[0], -1)
        codes = torch.round(flat / scale[:, None])
        if not torch.equal(codes * scale[:, None], flat):
            raise ArtifactError(f"layer '{layer.name}': the pruned weights are not codes x scales (internal error)")
        entry["shape"] = list(weight.shape)
        layer_cost = cost.layers[analysis.layers.index(layer)]
        entry["storage"] = layer_cost.storage
        if layer_cost.storage == "dense":
            stream = pack_codes(codes.to(torch.int64).numpy(), widths)
        else:
            keep = _stored_mask(simulator, policy, layer).reshape(flat.shape)
            stream, info = encode_sparse(codes.to(torch.int64).numpy(), widths, keep, layer_cost.storage)
            entry.update(info)
        entry["weights"] = _segment(payload, stream)
        entry["scales"] = _segment(payload, scale.numpy().astype("<f2").tobytes())
        if module.bias is not None:
            entry["bias"] = _segment(payload, module.bias.detach().float().numpy().astype("<f4").tobytes())
        else:
            entry["bias"] = None
    layer_keys = {f"{layer.name}.{p}" for layer in analysis.layers for p in ("weight", "bias")}
    for key, value in slim.state_dict().items():
        if key in layer_keys:
            continue
        array = value.detach().cpu().numpy()
        dtype = "<f4" if array.dtype.kind == "f" else array.dtype.newbyteorder("<").str
        tensors[key] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data": _segment(payload, array.astype(dtype).tobytes()),
        }

    activations = {
        name: {"bits": int(q.bits), "max_abs": float(q.max_abs), "signed": bool(q.signed)}
        for name, q in simulator.quantizers.items()
    }
    data = payload.getvalue()

    header: dict[str, Any] = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ajpq_version": __version__,
        "model": {
            "name": model_name,
            "input_shape": [int(s) for s in input_shape],
            "num_classes": int(num_classes),
            "fingerprint": analysis.fingerprint,
            "dataset": dataset,
        },
        "encoding": {
            "bit_order": "lsb-first",
            "codes": "offset binary code + 2^(b-1) - 1 for b >= 2; sign bit for b = 1; nothing for b = 0",
            "scales": "<f2",
            "bias": "<f4",
            "weight_layout": "per layer 'storage': dense, relative-index (4-bit gaps, fillers) or bitmap",
        },
        "layers": layers,
        "groups": groups,
        "activations": activations,
        "tensors": tensors,
        "policy": policy.to_dict(),
        "metrics": {
            **cost.as_dict(),
            "expected_payload_bytes": cost.size_bits / 8,
            **(metrics or {}),
        },
        "payload": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
    }
    rebuilt = _load_slim(header, data, model)
    artifact = CompressedArtifact(header, data, rebuilt, simulated)
    exact = check_reproduces(rebuilt, simulated, calibration, [*simulator.quantizers.values()])
    header["metrics"]["max_abs_logit_diff"] = max_logit_difference(rebuilt, simulated, calibration)
    header["metrics"]["max_abs_logit_diff_fp_activations"] = exact
    return artifact


REPRODUCE_TOLERANCE = 1e-3
"""Largest logit difference (relative to the logit range) allowed between the rebuilt slim model and the simulated
model with activation quantization off. Both compute the same weights, so only float rounding separates them (about
1e-6); with activations quantized, a rounding flip at one layer's input can move the logits by one activation step
per flip, which is why the check is made without them."""


def check_reproduces(
    slim: nn.Module, simulated: nn.Module, inputs: torch.Tensor, simulated_quantizers: list[Any]
) -> dict[str, float]:
    """Refuse (:class:`ModelError`) a rebuilt model that does not compute the simulated model.

    The two models are compared with their activation quantizers switched off, where only float rounding may separate
    them; a larger difference means the physical pruning cut other channels than the simulation removed (a channel
    mapping the analysis does not know, e.g. a reshape or permutation between layers).
    """
    quantizers = [*getattr(slim, "ajpq_quantizers", {}).values(), *simulated_quantizers]
    saved = [q.bits for q in quantizers]
    try:
        for quantizer in quantizers:
            quantizer.bits = 32
        difference = max_logit_difference(slim, simulated, inputs)
    except RuntimeError as exc:
        raise ModelError(
            f"the model rebuilt with the removed channels cut out cannot run ({str(exc).splitlines()[0]}); the "
            "model's channel coupling is not what the analysis found (a reshape or permutation of channels?)"
        ) from None
    finally:
        for quantizer, bits in zip(quantizers, saved, strict=True):
            quantizer.bits = bits
    if not difference["relative"] <= REPRODUCE_TOLERANCE:
        raise ModelError(
            f"the rebuilt slim model does not compute the simulated compressed model: its logits differ by "
            f"{difference['relative']:.1%} of their range with activation quantization off (allowed "
            f"{REPRODUCE_TOLERANCE:.0e}); the model's channel coupling is not what the analysis found (a reshape "
            "or permutation of channels between layers?), so no artifact was written"
        )
    return difference


def _stored_mask(simulator: SimulatedModel, policy: Policy, layer: Any) -> np.ndarray:
    """The stored-weight mask of a sparse layer in the slim weight's order: the cost model's stream positions."""
    cost_model = simulator.cost_model
    layer_policy = policy.layers[layer.name]
    input_kept = cost_model.kept_inputs(policy)[layer.name]
    mask = cost_model.weight_mask(layer, layer_policy.weight_bits, input_kept, layer_policy.weight_sparsity)
    candidates = np.repeat(
        cost_model.candidates(layer, layer_policy.weight_bits, input_kept).ravel(), layer.kernel_area
    )
    return mask[candidates]


def max_logit_difference(slim: nn.Module, simulated: nn.Module, inputs: torch.Tensor) -> dict[str, float]:
    """Largest absolute logit difference between two models and the logit range it is measured against."""
    a = slim(inputs.cpu())
    b = simulated(inputs.cpu())
    diff = float((a - b).abs().max())
    span = float(b.max() - b.min())
    return {"abs": diff, "logit_range": span, "relative": diff / span if span > 0 else diff}


# ---------------------------------------------------------------------------------------------------------------
# Reading and loading
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ArtifactFile:
    """A verified artifact read from disk."""

    header: dict[str, Any]
    payload: bytes
    file_bytes: int

    @property
    def payload_bytes(self) -> int:
        return len(self.payload)

    @property
    def header_bytes(self) -> int:
        return self.file_bytes - len(self.payload)

    @property
    def policy(self) -> Policy:
        return policy_from_dict(self.header["policy"], "artifact policy")


def parse_artifact(data: bytes, source: str = "artifact") -> ArtifactFile:
    """Check magic, version, lengths and both checksums; raise :class:`ArtifactError` with one clear message."""
    hint = "re-export it with `ajpq export-model`"
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        if MAGIC.startswith(data):
            raise ArtifactError(f"{source} is truncated ({len(data)} bytes, not even a preamble); {hint}")
        raise ArtifactError(
            f"{source} is not an AJPQ artifact (its first bytes are not the AJPQ magic {MAGIC!r}); "
            "write one with `ajpq export-model --out model.ajpq`"
        )
    if len(data) < PREAMBLE_BYTES:
        raise ArtifactError(
            f"{source} is truncated ({len(data)} bytes, the preamble alone has {PREAMBLE_BYTES}); {hint}"
        )
    _, version, _, header_length, header_sha = _PREAMBLE.unpack_from(data)
    if version not in READABLE_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_VERSIONS)
        newer = " newer than" if version > max(READABLE_VERSIONS) else " not"
        raise ArtifactError(
            f"{source} has artifact format version {version}, which is{newer} what this build of AJPQ reads "
            f"(version {readable}); upgrade AJPQ (pip install -U ajpq) or re-export the model with this version"
        )
    end = PREAMBLE_BYTES + header_length
    if len(data) < end:
        raise ArtifactError(
            f"{source} is truncated: {len(data)} bytes, but its header alone ends at byte {end}; {hint}"
        )
    header_data = data[PREAMBLE_BYTES:end]
    if hashlib.sha256(header_data).digest() != header_sha:
        raise ArtifactError(f"{source} is corrupted: the header's sha256 checksum does not match; {hint}")
    header = parse_json(header_data, f"{source} (header)", "AJPQ header", ArtifactError, hint)
    payload_info = header.get("payload") if isinstance(header, dict) else None
    if not (
        isinstance(payload_info, dict)
        and _is_count(payload_info.get("bytes"))
        and isinstance(payload_info.get("sha256"), str)
    ):
        raise ArtifactError(f"{source} has a malformed header (checksum fine, content not an AJPQ header); {hint}")
    payload_length, payload_sha = payload_info["bytes"], payload_info["sha256"]
    if header.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{source}: header format is {shown(header.get('format'))}, not {ARTIFACT_FORMAT!r}")
    payload = data[end:]
    if len(payload) < payload_length:
        raise ArtifactError(
            f"{source} is truncated: the payload has {len(payload)} of its {payload_length} bytes; {hint}"
        )
    if len(payload) > payload_length:
        raise ArtifactError(
            f"{source} is corrupted: {len(payload) - payload_length} unexpected bytes at its end; {hint}"
        )
    if hashlib.sha256(payload).hexdigest() != payload_sha:
        raise ArtifactError(f"{source} is corrupted: the payload's sha256 checksum does not match; {hint}")
    _check_header(header, len(payload), source)
    _check_memory(header, None, len(data), source)
    return ArtifactFile(header, payload, len(data))


def read_artifact(path: str | Path) -> ArtifactFile:
    """Read and verify an artifact file (see :func:`parse_artifact`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(
            f"artifact {path} does not exist; write one with `ajpq export-model --out {path}`"
        ) from None
    except IsADirectoryError:
        raise ArtifactError(f"artifact {path} is a folder; give the .ajpq file") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read artifact {path}: {exc.strerror}") from None
    return parse_artifact(data, str(path))


def model_record(header: dict[str, Any], source: str = "artifact") -> dict[str, Any]:
    """The header's ``model`` entry, checked: name, input shape, class count and fingerprint of the right types."""
    info = header.get("model")
    hint = "re-export it with `ajpq export-model`"
    if not isinstance(info, dict):
        raise ArtifactError(f"{source}: its header has no `model` record (name, input shape, fingerprint); {hint}")
    shape = info.get("input_shape")
    if (
        not isinstance(info.get("name"), str)
        or not isinstance(info.get("fingerprint"), str)
        or not isinstance(info.get("num_classes"), int)
        or not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(s, int) and s >= 1 for s in shape)
    ):
        raise ArtifactError(
            f"{source}: its header's `model` record is malformed (expected name, fingerprint, num_classes and a "
            f"3-value input_shape); {hint}"
        )
    return info


def base_model(header: dict[str, Any], model: nn.Module | None = None, source: str = "artifact") -> nn.Module:
    """The unpruned FP32 architecture an artifact was made from, checked against the header's fingerprint.

    From the file alone only zoo and torchvision names are built: a ``package.module:factory`` name in a received
    file would import and call code the file names. Such models are rebuilt only from ``model``, which the user
    passes (``load_compressed(path, model=...)`` or ``ajpq evaluate --artifact A --model package.module:factory``).
    """
    info = model_record(header, source)
    name = info["name"]
    shown = repr(name if len(name) <= 80 else name[:77] + "...")
    if model is None:
        if not is_builtin_model(name):
            raise ArtifactError(
                f"{source} was made from model {shown}, which is neither a zoo nor a torchvision model; code named "
                "in a file is never imported: pass the model yourself (`--model package.module:factory`, or "
                "`load_compressed(path, model=...)`)"
            )
        model = base_model_unchecked(info, source)
    else:
        model = copy.deepcopy(model)
    if fingerprint_of(model) != info["fingerprint"]:
        raise ArtifactError(
            f"{source}: model {shown} as built here has fingerprint {fingerprint_of(model)}, but the artifact was "
            f"made from fingerprint {info['fingerprint']}; the model code changed since the export, or the model "
            "given is not the one exported"
        )
    return model


def base_model_unchecked(info: dict[str, Any], source: str = "artifact") -> nn.Module:
    """The zoo or torchvision model a checked ``model`` record names (under ``torch.device("meta")``: its shapes)."""
    if not is_builtin_model(info["name"]):
        raise ArtifactError(f"{source} was made from a model that is neither a zoo nor a torchvision model")
    return build_model(info["name"], tuple(info["input_shape"]), info["num_classes"])


def _load_slim(
    header: dict[str, Any], payload: bytes, model: nn.Module | None = None, source: str = "artifact"
) -> nn.Module:
    _check_header(header, len(payload), source)
    _check_memory(header, model, PREAMBLE_BYTES + len(json.dumps(header)) + len(payload), source)
    return _rebuild(header, payload, model, source)


LOAD_MEMORY_BASE = 64 * 2**20
"""Bytes any artifact may make the loader allocate for the unpruned model and one forward pass of its example."""
LOAD_MEMORY_PER_FILE_BYTE = 1024
"""And this many more per byte of the file: a compressed model is at most a few hundred times smaller than its FP32
original (at 1 bit per weight, 32x; with channels removed, more), so a header claiming a model thousands of times
larger than its file (``num_classes: 10**12``, ``input_shape: [1, 200000, 200000]``) is refused before it is built."""
_DTYPES = frozenset({"<f4", "<f8", "<f2", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1"})
"""The dtypes of raw tensors in the payload (numbers only: never ``"O"``, whose reading would unpickle objects)."""
_STORAGES = ("dense", "relative-index", "bitmap")


def load_memory_bound(file_bytes: int) -> int:
    """The most bytes an artifact of ``file_bytes`` may make the loader allocate (see :data:`LOAD_MEMORY_BASE`)."""
    return LOAD_MEMORY_BASE + LOAD_MEMORY_PER_FILE_BYTE * file_bytes


def _malformed(source: str, what: str) -> ArtifactError:
    return ArtifactError(f"{source} has a malformed header ({what}); re-export it with `ajpq export-model`")


def _is_count(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_segment(span: Any, payload_bytes: int, where: str, source: str, length: int | None = None) -> None:
    if not (isinstance(span, list) and len(span) == 2 and all(_is_count(v) for v in span)):
        raise _malformed(source, f"{where} must be a payload segment [offset, length] of two integers >= 0")
    if span[0] + span[1] > payload_bytes:
        raise ArtifactError(f"{source}: {where} lies outside the payload; the artifact is corrupted")
    if length is not None and span[1] != length:
        raise ArtifactError(
            f"{source}: {where} has {span[1]} bytes, but its layer needs {length}; the artifact is corrupted"
        )


def _check_name(name: Any, where: str, source: str) -> None:
    """A qualified module name: dotted identifiers, none a dunder (``__class__`` would reach Python internals)."""
    if (
        not isinstance(name, str)
        or not name
        or not all((part.isidentifier() and not part.startswith("__")) or part.isdigit() for part in name.split("."))
    ):
        raise _malformed(source, f"{where} {shown(name)} is not a module name")


def _check_header(header: dict[str, Any], payload_bytes: int, source: str) -> None:
    """Check every field :func:`_rebuild` reads, and every length against the payload, before anything is built:
    a checksummed header is still a received file (the checksums only prove it was not damaged in transit)."""
    model_record(header, source)
    policy = policy_from_dict(header.get("policy"), f"{source} (policy)")
    layers, groups = header.get("layers"), header.get("groups")
    activations, tensors = header.get("activations"), header.get("tensors", {})
    if not isinstance(layers, list) or not all(isinstance(e, dict) for e in layers):
        raise _malformed(source, "`layers` must be a list of layer records")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise _malformed(source, "`groups` must be a list of group records")
    if not isinstance(activations, dict) or not isinstance(tensors, dict):
        raise _malformed(source, "`activations` and `tensors` must be objects")
    names = [entry.get("name") for entry in layers]
    for name in names:
        _check_name(name, "layer", source)
    if sorted(map(str, names)) != sorted(policy.layers) or len(set(names)) != len(names):
        raise _malformed(source, "its layers are not the layers of its policy")
    for entry in layers:
        name = entry["name"]
        where = f"layer '{name}'"
        bits = policy.layers[name].weight_bits
        widths = bits[bits > 0]
        shape = entry.get("shape")
        if not (isinstance(shape, list) and 2 <= len(shape) <= 4 and all(_is_count(s, 1) for s in shape)):
            raise _malformed(source, f"{where}: shape must be 2 to 4 integers >= 1")
        if shape[0] != widths.size:
            raise ArtifactError(
                f"{source}: {where} stores {shape[0]} channels, but its policy keeps {widths.size}; the artifact is "
                "corrupted"
            )
        if entry.get("bn_name") is not None:
            _check_name(entry["bn_name"], f"{where}: bn_name", source)
        per_row = math.prod(shape[1:])
        storage = entry.get("storage", "dense")
        if storage not in _STORAGES:
            raise _malformed(source, f"{where}: storage must be one of {list(_STORAGES)}, but got {shown(storage)}")
        if storage == "dense":
            _check_segment(
                entry.get("weights"), payload_bytes, f"{where}: weights", source, packed_bytes(widths, per_row)
            )
        else:
            _check_segment(entry.get("weights"), payload_bytes, f"{where}: weights", source)
            if entry["weights"][1] * 8 < (shape[0] * per_row if storage == "bitmap" else 0):
                raise ArtifactError(
                    f"{source}: {where}: its bitmap is shorter than its weights; the artifact is corrupted"
                )
            if storage == "relative-index":
                entries, fillers = entry.get("entries"), entry.get("one_bit_fillers", [])
                if not _is_count(entries) or entries * 5 > entry["weights"][1] * 8:
                    raise _malformed(source, f"{where}: entries must be the number of entries its stream holds")
                if not isinstance(fillers, list) or not all(_is_count(i) and i < entries for i in fillers):
                    raise _malformed(source, f"{where}: one_bit_fillers must list entry numbers")
        _check_segment(entry.get("scales"), payload_bytes, f"{where}: scales", source, 2 * widths.size)
        if entry.get("bias") is not None:
            _check_segment(entry["bias"], payload_bytes, f"{where}: bias", source, 4 * widths.size)
    known = set(policy.layers)
    for group in groups:
        members, root, removed = group.get("members"), group.get("root"), group.get("removed")
        if not isinstance(members, list) or not members or not set(map(str, members)) <= known or root not in members:
            raise _malformed(source, "a group must name its member layers and its root among them")
        pruned = np.flatnonzero(policy.layers[root].weight_bits == 0).tolist()
        if removed != pruned:
            raise ArtifactError(
                f"{source}: group of '{root}' removes channels {_short_list(removed)}, but its policy prunes "
                f"{_short_list(pruned)}; the artifact is corrupted"
            )
    for name, spec in activations.items():
        valid = (
            name in known
            and isinstance(spec, dict)
            and spec.get("bits") in ACTIVATION_BITS_ALLOWED
            and not isinstance(spec.get("bits"), bool)
            and isinstance(spec.get("max_abs"), int | float)
            and not isinstance(spec.get("max_abs"), bool)
            and math.isfinite(spec["max_abs"])
            and spec["max_abs"] > 0
            and isinstance(spec.get("signed"), bool)
        )
        if not valid:
            raise _malformed(
                source,
                f"activations[{shown(name)}] must be a layer's quantizer: bits one of {list(ACTIVATION_BITS_ALLOWED)}, "
                "a finite max_abs > 0, signed true or false",
            )
    for key, spec in tensors.items():
        _check_name(key, "tensor", source)
        dtype = spec.get("dtype") if isinstance(spec, dict) else None
        tensor_shape = spec.get("shape") if isinstance(spec, dict) else None
        if dtype not in _DTYPES or not (
            isinstance(tensor_shape, list) and len(tensor_shape) <= 8 and all(_is_count(s) for s in tensor_shape)
        ):
            raise _malformed(source, f"tensor '{key}' must have a numeric dtype ({sorted(_DTYPES)}) and a shape")
        _check_segment(
            spec.get("data"),
            payload_bytes,
            f"tensor '{key}'",
            source,
            math.prod(tensor_shape) * np.dtype(dtype).itemsize,
        )


def _short_list(values: Any, limit: int = 8) -> str:
    if not isinstance(values, list):
        return shown(values)
    text = ", ".join(shown(v) for v in values[:limit])
    return f"[{text}{', ...' if len(values) > limit else ''}]"


def _check_memory(header: dict[str, Any], model: nn.Module | None, file_bytes: int, source: str) -> None:
    """Refuse a header whose unpruned model and example forward pass would take more memory than
    :func:`load_memory_bound` allows for a file of ``file_bytes``: measured on the ``meta`` device, which allocates
    nothing."""
    info = model_record(header, source)
    input_shape = tuple(info["input_shape"])
    bound = load_memory_bound(file_bytes)
    if 4 * math.prod(input_shape) > bound or 4 * info["num_classes"] > bound:
        raise _too_large(source, 4 * max(math.prod(input_shape), info["num_classes"]), file_bytes, bound)
    if model is None and not is_builtin_model(info["name"]):
        return  # rebuilt only from a model the user passes (see base_model), checked then
    try:
        with torch.device("meta"):
            probe = copy.deepcopy(model).to("meta") if model is not None else base_model_unchecked(info, source)
    except ModelError:
        raise
    except Exception:  # a builder that cannot run on the meta device: building it for real says what is wrong
        return
    total = sum(4 * p.numel() for p in probe.parameters()) + sum(4 * b.numel() for b in probe.buffers())
    if total > bound:
        raise _too_large(source, total, file_bytes, bound)
    activations = [0]

    def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            activations[0] += 4 * output.numel()

    handles = [module.register_forward_hook(count) for module in probe.modules()]
    try:
        with torch.no_grad():
            probe(torch.zeros(1, *input_shape, device="meta"))
    except Exception:  # the shape does not fit the model: building it for real says so in one line
        return
    finally:
        for handle in handles:
            handle.remove()
    if total + activations[0] > bound:
        raise _too_large(source, total + activations[0], file_bytes, bound)


def _too_large(source: str, needed: int, file_bytes: int, bound: int) -> ArtifactError:
    return ArtifactError(
        f"{source}: its header describes a model needing {needed / 2**20:,.0f} MiB to rebuild, more than a file of "
        f"{file_bytes:,} bytes can hold ({bound / 2**20:,.0f} MiB allowed); the artifact is corrupted or crafted"
    )


def _rebuild(header: dict[str, Any], payload: bytes, model: nn.Module | None, source: str) -> nn.Module:
    input_shape = tuple(model_record(header, source)["input_shape"])
    model = base_model(header, model, source).cpu().float().eval()
    _fold_structure(model, header["layers"])
    _prune(model, header["groups"], input_shape)
    policy = policy_from_dict(header["policy"], "artifact policy")

    def segment(span: list[int] | None) -> bytes:
        if span is None:
            raise ArtifactError("a tensor segment is missing from the header; the artifact is corrupted")
        offset, length = span
        if offset < 0 or offset + length > len(payload):
            raise ArtifactError("a tensor segment lies outside the payload; the artifact is corrupted")
        return payload[offset : offset + length]

    with torch.no_grad():
        for entry in header["layers"]:
            module = layer_module(model, entry["name"])
            bits = policy.layers[entry["name"]].weight_bits
            widths = bits[bits > 0]
            shape = tuple(entry["shape"])
            if tuple(module.weight.shape) != shape:
                raise ArtifactError(
                    f"layer '{entry['name']}' rebuilt with shape {tuple(module.weight.shape)}, but the artifact "
                    f"stores {shape}; the model code or torch-pruning changed since the export"
                )
            per_row = int(np.prod(shape[1:]))
            storage = entry.get("storage", "dense")  # version 1 stores every layer dense
            if storage == "dense":
                codes = unpack_codes(segment(entry["weights"]), widths, per_row)
            else:
                codes = decode_sparse(segment(entry["weights"]), widths, per_row, storage, entry)
            scales = np.frombuffer(segment(entry["scales"]), dtype="<f2").astype(np.float32)
            weight = torch.from_numpy(codes.astype(np.float32) * scales[:, None]).reshape(shape)
            module.weight.copy_(weight)
            if entry.get("bias") is not None:
                if module.bias is None:
                    raise ArtifactError(
                        f"layer '{entry['name']}' rebuilt without a bias, but the artifact stores one; the model code "
                        "changed since the export"
                    )
                module.bias.copy_(torch.from_numpy(np.frombuffer(segment(entry["bias"]), dtype="<f4").copy()))
            elif module.bias is not None:  # it would keep its random initial values
                raise ArtifactError(
                    f"{source}: layer '{entry['name']}' has a bias the artifact does not store; the artifact is "
                    "corrupted, or the model code changed since the export"
                )
        state = model.state_dict()
        for key, spec in header.get("tensors", {}).items():
            if key not in state:
                raise ArtifactError(f"the artifact stores '{key}', which the rebuilt model does not have")
            if tuple(state[key].shape) != tuple(spec["shape"]):
                raise ArtifactError(
                    f"{source}: tensor '{key}' has shape {tuple(spec['shape'])}, but the rebuilt model's has "
                    f"{tuple(state[key].shape)}; the artifact is corrupted"
                )
            array = np.frombuffer(segment(spec["data"]), dtype=spec["dtype"]).reshape(spec["shape"])
            state[key].copy_(torch.from_numpy(array.copy()))
    # Ignored assignment below: nn.Module.__setattr__ is typed for tensors and modules; these are plain data.
    model.ajpq_quantizers = _install_quantizers(model, header["activations"])  # type: ignore[assignment]
    model.ajpq_header = header  # type: ignore[assignment]
    return model.eval()


def load_compressed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the slim compressed model of an artifact as a CPU ``nn.Module`` in eval mode.

    Args:
        path: The ``.ajpq`` file written by ``ajpq export-model``.
        model: An unpruned instance of the architecture; needed for every model that is not a zoo or torchvision
            one (a recorded ``package.module:factory`` is never imported from the file); its fingerprint must
            match the header's. It is not modified.

    Raises:
        ArtifactError: Missing, truncated, corrupted or newer-version file, or a model that no longer matches.
    """
    artifact = read_artifact(path)
    return _load_slim(artifact.header, artifact.payload, model, str(path))


__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
    "MAGIC",
    "ActivationFakeQuant",
    "ArtifactFile",
    "CompressedArtifact",
    "build_artifact",
    "decode_sparse",
    "encode_sparse",
    "load_compressed",
    "max_logit_difference",
    "pack_codes",
    "parse_artifact",
    "read_artifact",
    "slim_structure",
    "unpack_codes",
]
