"""What a bit width means: per-output-channel symmetric weight quantization and per-layer activation quantization.

Weights (per output channel ``c`` with ``b`` bits):

* ``2 <= b <= 8``: integer codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``, scale ``max|w_c| / (2^(b-1)-1)``;
* ``b = 1``: codes ``+-1`` (sign, with ``sign(0) = +1``), scale ``mean|w_c|``;
* ``b = 0``: the channel is removed: codes and scale are 0.

Scales are stored as fp16 in the artifact, so the simulation rounds them to fp16 too (upwards, so that
``max|w_c| / scale`` never exceeds the largest level and the error bound ``scale / 2`` holds). Every function is
vectorized over channels: a layer with a different width per channel is one tensor expression.
"""

from __future__ import annotations

import math

import torch

MAX_WEIGHT_BITS = 8
ACTIVATION_BITS_ALLOWED: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 32)
"""Input-activation widths a policy may ask for; 32 means unquantized."""
_FP16_TINY = 2.0**-24


def weight_levels(bits: torch.Tensor) -> torch.Tensor:
    """Largest integer code per channel: ``2^(b-1)-1`` for ``b >= 2``, 1 for ``b = 1``, 0 for ``b = 0``."""
    bits = bits.to(torch.int64)
    levels = torch.bitwise_left_shift(torch.ones_like(bits), (bits - 1).clamp(min=0)) - 1
    return torch.where(bits == 1, torch.ones_like(levels), torch.where(bits <= 0, torch.zeros_like(levels), levels))


def _fp16_ceil(values: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value >= ``values`` (as float32), clamped to fp16's positive range."""
    values = values.float().clamp(min=_FP16_TINY, max=65504.0)
    half = values.to(torch.float16)
    low = half.float() < values
    bumped = torch.nextafter(half, torch.full_like(half, float("inf")))
    return torch.where(low, bumped, half).float()


def quantize_codes(
    weight: torch.Tensor, bits: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (same shape as ``weight``, int8) and fp16-exact float32 scales (one per output channel).

    ``keep`` (broadcastable to ``weight``) marks the weights that are stored: those reading kept inputs and, with
    weight sparsity, those the magnitude mask keeps. The others get code 0 and do not count in a 1-bit channel's
    mean ``|w|`` (they do not exist in the exported artifact).
    """
    bits = bits.to(device=weight.device, dtype=torch.int64)
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    if keep is None:
        stored = None
        count = torch.full((flat.shape[0],), float(flat.shape[1]), device=flat.device)
    else:
        stored = keep.to(flat.device).bool().expand_as(weight).reshape(flat.shape)
        flat = flat * stored
        count = stored.sum(dim=1).clamp(min=1).float()
    levels = weight_levels(bits)
    abs_flat = flat.abs()
    absmax = abs_flat.amax(dim=1)
    mean_abs = abs_flat.sum(dim=1) / count
    raw_scale = torch.where(bits == 1, mean_abs, absmax / levels.clamp(min=1).float())
    scale = _fp16_ceil(raw_scale)
    level_col = levels.unsqueeze(1).float()
    codes = torch.clamp(torch.round(flat / scale.unsqueeze(1)), -level_col, level_col)
    signs = torch.where(flat >= 0, 1.0, -1.0)
    if stored is not None:
        signs = signs * stored
    codes = torch.where((bits == 1).unsqueeze(1), signs, codes)
    codes = torch.where((bits <= 0).unsqueeze(1), torch.zeros_like(codes), codes)
    scale = torch.where(bits <= 0, torch.zeros_like(scale), scale)
    return codes.to(torch.int8).reshape(weight.shape), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float weights from integer codes and per-channel scales."""
    return codes.float() * scale.reshape(-1, *([1] * (codes.dim() - 1)))


def quantize_weight(weight: torch.Tensor, bits: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``weight`` with ``bits[c]`` bits for output channel ``c`` (0 gives zeros).

    ``keep`` as in :func:`quantize_codes`: unstored weights come out exactly 0.
    """
    codes, scale = quantize_codes(weight, bits, keep)
    return dequantize(codes, scale).to(weight.dtype)


def quantize_weight_ste(weight: torch.Tensor, bits: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Quantized weight in the forward pass, identity gradient (straight-through estimator) in the backward pass.

    Removed channels (0 bits) and unstored weights (``keep``) get zero weight and zero gradient, so they never come
    back during fine-tuning.
    """
    quantized = quantize_weight(weight.detach(), bits, keep)
    mask = (bits.to(weight.device) > 0).to(weight.dtype).reshape(-1, *([1] * (weight.dim() - 1)))
    if keep is not None:
        mask = mask * keep.to(weight.device, weight.dtype)
    return quantized + (weight - weight.detach()) * mask


def activation_scale(max_abs: float, bits: int, signed: bool) -> float:
    """Step size of an activation quantizer with range ``max_abs``: unsigned uses all ``2^a`` levels."""
    return max(float(max_abs), 1e-12) / activation_levels(bits, signed)[1]


def quantize_activation(x: torch.Tensor, bits: int, max_abs: float, signed: bool, *, ste: bool = False) -> torch.Tensor:
    """Uniform fake quantization of an activation tensor with a calibrated range (``bits >= 32``: unchanged).

    With ``ste`` the gradient passes straight through (for quantization-aware fine-tuning).
    """
    if bits >= 32:
        return x
    scale = activation_scale(max_abs, bits, signed)
    low, high = activation_levels(bits, signed)
    quantized = torch.clamp(torch.round(x / scale), low, high) * scale
    return x + (quantized - x).detach() if ste and x.requires_grad else quantized


def activation_levels(bits: int, signed: bool) -> tuple[int, int]:
    """Lowest and highest code of a ``bits``-wide activation: signed ``+-(2^(a-1)-1)``, unsigned ``0..2^a-1``."""
    high = (2 ** (bits - 1) - 1) if signed else (2**bits - 1)
    return (-high if signed else 0), high


def quantize_activation_learned(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Fake quantization with a trainable step size (LSQ, Esser et al., ICLR 2020), straight-through for ``x``.

    The step's gradient is LSQ's (``round(x/s) - x/s`` inside the range, the clipped code outside), scaled by
    ``1/sqrt(features * high)`` so that the step learns at the pace of the weights. ``max_abs = step * high`` is the
    range :func:`quantize_activation` then reproduces.
    """
    low, high = activation_levels(bits, signed)
    grad_scale = 1.0 / math.sqrt(x[0].numel() * high)
    step = step.abs().clamp(min=1e-8)
    step = (step - step * grad_scale).detach() + step * grad_scale
    scaled = torch.clamp(x / step, low, high)
    return (scaled + (scaled.round() - scaled).detach()) * step
