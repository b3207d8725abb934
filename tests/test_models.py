"""The model zoo, torchvision models and user factories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ajpq.errors import ModelError
from ajpq.models import DEFAULT_MODEL, ZOO, build_model, model_names_help

SHAPES = {
    "digits_cnn": (1, 8, 8),
    "lenet5": (1, 28, 28),
    "lenet300": (1, 28, 28),
    "resnet20": (3, 32, 32),
    "resnet56": (3, 32, 32),
}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ZOO)
def test_zoo_forward_shape(name: str) -> None:
    model = build_model(name, SHAPES[name], 10).eval()
    with torch.no_grad():
        assert model(torch.randn(3, *SHAPES[name])).shape == (3, 10)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_deterministic(name: str) -> None:
    torch.manual_seed(7)
    a = build_model(name, SHAPES[name], 10).state_dict()
    torch.manual_seed(7)
    b = build_model(name, SHAPES[name], 10).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lenet5_param_count() -> None:
    assert _n_params(build_model("lenet5", (1, 28, 28), 10)) == 431_080


def test_resnet20_param_count_and_names() -> None:
    model = build_model("resnet20", (3, 32, 32), 10)
    assert 260_000 <= _n_params(model) <= 280_000
    names = dict(model.named_modules())
    assert isinstance(names["layer1.0.conv1"], nn.Conv2d) and isinstance(names["layer1.0.bn1"], nn.BatchNorm2d)
    assert isinstance(names["layer2.0.shortcut.0"], nn.Conv2d)
    assert isinstance(names["layer2.0.shortcut.1"], nn.BatchNorm2d)
    assert isinstance(names["fc"], nn.Linear)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 19 + 2


def test_zoo_names_and_other_shapes() -> None:
    cnn = dict(build_model(DEFAULT_MODEL, (1, 8, 8), 10).named_modules())
    for key in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "fc1", "fc2"):
        assert key in cnn
    assert build_model("resnet20", (1, 28, 28), 5)(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    assert build_model("lenet5", (3, 32, 32), 100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ModelError, match="at least 16x16"):
        build_model("lenet5", (1, 8, 8), 10)


def test_torchvision_model_with_grayscale_input() -> None:
    model = build_model("resnet18", (1, 28, 28), 10).eval()
    assert model.conv1.in_channels == 1  # type: ignore[union-attr]
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_factory_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_factory_pkg.py").write_text(
        "from torch import nn\n"
        "def make(num_classes, in_channels=3):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes))\n"
        "def make_shape(input_shape, num_classes):\n"
        "    c, h, w = input_shape\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))\n"
        "def not_a_model(num_classes):\n"
        "    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("my_factory_pkg:make", (1, 8, 8), 4)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    model = build_model("my_factory_pkg:make_shape", (2, 4, 4), 3)
    assert model(torch.randn(5, 2, 4, 4)).shape == (5, 3)
    with pytest.raises(ModelError, match=r"must return a torch\.nn\.Module"):
        build_model("my_factory_pkg:not_a_model", (1, 8, 8), 4)
    with pytest.raises(ModelError, match="no callable 'missing'"):
        build_model("my_factory_pkg:missing", (1, 8, 8), 4)
    with pytest.raises(ModelError, match=r"cannot import module 'no_such_module_xyz'"):
        build_model("no_such_module_xyz:make", (1, 8, 8), 4)


def test_unknown_model_suggests_closest() -> None:
    with pytest.raises(ModelError, match=r"did you mean 'resnet20'") as info:
        build_model("resnet21", (3, 32, 32), 10)
    assert "digits_cnn" in str(info.value)
    with pytest.raises(ModelError, match=r"did you mean 'lenet5'"):
        build_model("lenet-5", (1, 28, 28), 10)
    assert "torchvision" in model_names_help() and "package.module:factory" in model_names_help()
