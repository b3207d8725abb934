"""The model zoo: small reference networks, any torchvision classifier, or a user factory.

Zoo models use flat, stable attribute names (``conv1``, ``layer1.0.conv1``, ``fc``), because compression
policies are keyed by qualified module names and must keep matching the model they were searched on.
"""

from __future__ import annotations

import difflib

from torch import Tensor, nn

from ajpq.errors import ModelError
from ajpq.factories import accepted_kwargs, import_factory

ZOO: tuple[str, ...] = ("digits_cnn", "lenet5", "lenet300", "resnet20", "resnet56")
DEFAULT_MODEL = "digits_cnn"
DEFAULT_DATASET = "digits"


def _kaiming_init(model: nn.Module) -> None:
    """He init for convs (ReLU nets), unit/zero BatchNorm, so training starts the same way for every seed."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: three 3x3 convs with BatchNorm, one max-pool, two linear layers."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        if height < 2 or width < 2:
            raise ModelError(f"digits_cnn needs inputs of at least 2x2, but got {height}x{width}")
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * (height // 2) * (width // 2), 64)
        self.fc2 = nn.Linear(64, num_classes)
        self.relu = nn.ReLU()
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.relu(self.fc1(self.flatten(x)))
        return self.fc2(x)


class LeNet5(nn.Module):
    """Caffe's LeNet-5 (20-50-500): the network of the Deep Compression LeNet experiments, 431,080 params."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        h, w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        if h < 1 or w < 1:
            raise ModelError(
                f"lenet5 needs inputs of at least 16x16, but got {height}x{width}; use a dataset with larger images "
                "(--dataset mnist, fashion-mnist, cifar10 or cifar100)"
            )
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * h * w, 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


class LeNet300(nn.Module):
    """The fully connected LeNet-300-100 (inputs flattened)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.fc1(self.flatten(x)))
        return self.fc3(self.relu(self.fc2(x)))


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual; downsampling blocks use a 1x1 conv+BN shortcut (option B)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016): 3 stages of 16/32/64 channels, ``n`` basic blocks each, depth 6n+2."""

    def __init__(self, n: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        _kaiming_init(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _torchvision_names() -> list[str]:
    try:
        import torchvision.models
    except ImportError:  # torchvision is a dependency, but the zoo itself does not need it
        return []
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _replace_first_conv(model: nn.Module, in_channels: int, name: str) -> None:
    """Swap the first ``Conv2d`` for one with ``in_channels`` inputs (e.g. grayscale into an RGB net)."""
    for qual, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise ModelError(f"{name}: cannot adapt grouped first conv {qual!r} to {in_channels} channels")
            # Ignored arg-type below: Conv2d stores its sizes as tuple[int, ...], and its constructor is typed
            # for int | tuple[int, int]; these are the 2-tuples it made itself.
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,  # type: ignore[arg-type]
                stride=module.stride,  # type: ignore[arg-type]
                padding=module.padding,  # type: ignore[arg-type]
                dilation=module.dilation,  # type: ignore[arg-type]
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            parent_name, _, attr = qual.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            return
    raise ModelError(f"{name}: found no Conv2d to adapt to {in_channels} input channels")


def _from_factory(spec: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    factory = import_factory(spec, "model", ModelError)
    offered = {"num_classes": num_classes, "in_channels": input_shape[0], "input_shape": input_shape}
    kwargs = accepted_kwargs(factory, offered)
    try:
        model = factory(**kwargs)
    except Exception as exc:  # a failing user factory must not crash with a bare traceback
        raise ModelError(f"model factory {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {spec!r} must return a torch.nn.Module, but returned {type(model)}")
    return model


def is_builtin_model(name: str) -> bool:
    """True for a zoo or torchvision name: one that ``build_model`` resolves without importing any other code.

    Names read from a file (an artifact header, a checkpoint) are built only when this holds, because
    ``package.module:factory`` would import and call whatever the file names.
    """
    if not isinstance(name, str) or ":" in name:
        return False
    return name.strip().lower() in ZOO or name in _torchvision_names()


def model_names_help() -> str:
    """One sentence for ``--help``: which model names ``build_model`` accepts."""
    return (
        f"a zoo model ({', '.join(ZOO)}; default {DEFAULT_MODEL}), any torchvision.models name "
        "(e.g. resnet18, mobilenet_v2), or 'package.module:factory' (called with whichever of num_classes, "
        "in_channels, input_shape it accepts)"
    )


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build a freshly initialized model (deterministic under ``torch.manual_seed``).

    Args:
        name: A ``ZOO`` name, a torchvision classification model name, or ``package.module:factory``.
        input_shape: ``(C, H, W)`` of one input.
        num_classes: Number of output classes.

    Raises:
        ModelError: Unknown name, failing factory, or an input shape the model cannot take.
    """
    if len(input_shape) != 3 or any(not isinstance(s, int) or s < 1 for s in input_shape):
        raise ModelError(f"input_shape must be three positive integers (C, H, W), but got {input_shape!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, but got {num_classes!r}")
    c, h, w = input_shape
    if ":" in name:
        return _from_factory(name, input_shape, num_classes)
    key = name.strip().lower()
    if key == "digits_cnn":
        return DigitsCNN(c, h, w, num_classes)
    if key == "lenet5":
        return LeNet5(c, h, w, num_classes)
    if key == "lenet300":
        return LeNet300(c * h * w, num_classes)
    if key in ("resnet20", "resnet56"):
        return CifarResNet(3 if key == "resnet20" else 9, c, num_classes)
    tv_names = _torchvision_names()
    if name in tv_names:
        import torchvision.models

        try:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        except Exception as exc:  # torchvision builders raise ValueError/TypeError on bad arguments
            raise ModelError(f"torchvision model {name!r} failed to build: {exc}") from exc
        if c != 3:
            _replace_first_conv(model, c, name)
        return model
    close = difflib.get_close_matches(key, [*ZOO, *tv_names], n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(m) for m in close)}?" if close else ""
    raise ModelError(f"unknown model {name!r}; expected {model_names_help()}{hint}")


__all__ = [
    "DEFAULT_DATASET",
    "DEFAULT_MODEL",
    "ZOO",
    "BasicBlock",
    "CifarResNet",
    "DigitsCNN",
    "LeNet5",
    "LeNet300",
    "build_model",
    "is_builtin_model",
    "model_names_help",
]
