"""Properties of the per-channel weight quantizer and the activation quantizer."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ajpq.quant import (
    dequantize,
    quantize_activation,
    quantize_codes,
    quantize_weight,
    quantize_weight_ste,
    weight_levels,
)

weights = arrays(
    np.float32,
    st.tuples(st.integers(1, 6), st.integers(1, 12)),
    elements=st.floats(-4, 4, width=32, allow_nan=False, allow_infinity=False),
)


def test_levels_per_width():
    assert weight_levels(torch.arange(9)).tolist() == [0, 1, 1, 3, 7, 15, 31, 63, 127]


@settings(max_examples=60, deadline=None)
@given(weights, st.data())
def test_codes_stay_in_levels_and_error_is_bounded(w, data):
    weight = torch.from_numpy(w)
    bits = torch.tensor(data.draw(st.lists(st.integers(0, 8), min_size=len(w), max_size=len(w))))
    codes, scale = quantize_codes(weight, bits)
    q = dequantize(codes, scale)
    assert torch.equal(scale, scale.half().float())  # scales are exactly fp16
    for c, b in enumerate(bits.tolist()):
        row, code_row = weight[c], codes[c].int()
        if b == 0:
            assert torch.count_nonzero(q[c]) == 0 and scale[c] == 0
        elif b == 1:
            assert set(code_row.tolist()) <= {-1, 1}
            assert torch.equal(code_row, torch.where(row >= 0, 1, -1).int())
            assert abs(float(scale[c]) - float(row.abs().mean())) <= 1e-3 * float(row.abs().mean()) + 1e-7
        else:
            level = 2 ** (b - 1) - 1
            assert int(code_row.abs().max()) <= level
            assert len(set(code_row.tolist())) <= 2 * level + 1
            assert torch.all((row - q[c]).abs() <= float(scale[c]) / 2 + 1e-6)
            assert float(scale[c]) >= float(row.abs().max()) / level  # rounded up, never clipped


@settings(max_examples=30, deadline=None)
@given(weights, st.integers(0, 8))
def test_mixed_widths_equal_per_channel_quantization(w, b):
    weight = torch.from_numpy(w)
    bits = (torch.arange(len(w)) + b) % 9
    mixed = quantize_weight(weight, bits)
    for c in range(len(w)):
        alone = quantize_weight(weight[c : c + 1], bits[c : c + 1])
        assert torch.equal(mixed[c : c + 1], alone)


def test_zero_bits_zero_weights_and_conv_shapes():
    weight = torch.randn(4, 3, 3, 3)
    q = quantize_weight(weight, torch.tensor([0, 8, 0, 2]))
    assert q.shape == weight.shape
    assert torch.count_nonzero(q[0]) == 0 and torch.count_nonzero(q[2]) == 0
    assert torch.allclose(q[1], weight[1], atol=float(weight[1].abs().max()) / 127)


def test_straight_through_gradient_except_removed_channels():
    weight = torch.randn(3, 5, requires_grad=True)
    out = quantize_weight_ste(weight, torch.tensor([4, 0, 1]))
    out.sum().backward()
    assert weight.grad[0].tolist() == [1.0] * 5 and weight.grad[1].tolist() == [0.0] * 5


def test_activation_quantizer_unsigned_signed_and_passthrough():
    x = torch.linspace(-1, 1, 101)
    assert torch.equal(quantize_activation(x, 32, 1.0, True), x)
    signed = quantize_activation(x, 3, 1.0, True)  # levels -3..3 of step 1/3
    assert torch.allclose(signed * 3, torch.round(signed * 3), atol=1e-5)
    assert len(torch.unique(signed)) == 7
    unsigned = quantize_activation(x.clamp(min=0), 2, 1.0, False)  # 0..3 of step 1/3
    assert sorted(set(torch.round(unsigned * 3).int().tolist())) == [0, 1, 2, 3]
    clipped = quantize_activation(torch.tensor([5.0]), 8, 1.0, False)
    assert float(clipped) == 1.0


def test_unstored_weights_are_zero_and_do_not_dilute_the_one_bit_scale():
    weight = torch.tensor([[1.0, -3.0, 0.5, 2.0], [0.25, -0.5, 4.0, 1.0]])
    keep = torch.tensor([[True, True, False, False], [True, True, True, True]])
    codes, scale = quantize_codes(weight, torch.tensor([1, 2]), keep)
    assert codes[0].tolist() == [1, -1, 0, 0] and float(scale[0]) == 2.0  # mean |w| of the two stored weights
    assert codes[1].tolist() == [0, 0, 1, 0] and float(scale[1]) == 4.0  # 2 bits: levels -1..1, scale max|w|
    assert torch.equal(quantize_weight(weight, torch.tensor([1, 2]), keep)[0], torch.tensor([2.0, -2.0, 0.0, 0.0]))
    grad_weight = weight.clone().requires_grad_(True)
    quantize_weight_ste(grad_weight, torch.tensor([1, 2]), keep).sum().backward()
    assert grad_weight.grad[0].tolist() == [1.0, 1.0, 0.0, 0.0]
