"""``layer_module``: the typed way to reach a compressible layer, with one clear line when the model does not fit."""

from __future__ import annotations

import pytest
import torch
from nets import ResidualDepthwiseNet

from ajpq.analysis import analyze_model, layer_module
from ajpq.errors import ModelError


def test_layer_module_returns_every_analysed_layer_itself() -> None:
    net = ResidualDepthwiseNet()
    analysis = analyze_model(net, (1, 4, 4))
    for layer in analysis.layers:
        module = layer_module(net, layer.name)
        assert module is net.get_submodule(layer.name)
        assert tuple(module.weight.shape[:1]) == (layer.out_channels,)
        assert (module.bias is not None) == (getattr(net, layer.name).bias is not None)


def test_layer_module_refuses_other_modules_and_missing_names() -> None:
    net = ResidualDepthwiseNet()
    with pytest.raises(ModelError, match=r"^'bn1' is a BatchNorm2d, not a Conv2d or Linear layer; pass the model"):
        layer_module(net, "bn1")
    with pytest.raises(ModelError, match=r"^the model has no layer 'conv9'; pass the model"):
        layer_module(net, "conv9")
    with pytest.raises(ModelError, match=r"no layer 'fc.weight'"):  # a parameter is not a layer either
        layer_module(net, "fc.weight")
    assert isinstance(layer_module(torch.nn.Sequential(torch.nn.Linear(2, 2)), "0"), torch.nn.Linear)
