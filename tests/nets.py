"""Small networks with the structures compression must handle: residual sums, depthwise convs, flatten, concat."""

from __future__ import annotations

import torch
from torch import nn


class ResidualDepthwiseNet(nn.Module):
    """conv1 -> (conv2 + skip) -> depthwise -> pointwise -> pool -> flatten -> fc, on 1x4x4 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn3 = nn.BatchNorm2d(4)
        self.pw = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(self.conv1(x)))
        b = torch.relu(self.bn2(self.conv2(a))) + a
        c = self.bn3(self.dw(b))
        d = torch.nn.functional.max_pool2d(torch.relu(self.pw(c)), 2)
        return self.fc(d.flatten(1))


class ConcatNet(nn.Module):
    """Two branches concatenated on channels, then a conv reads both (6 = 2 + 4 inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(1, 2, 3, padding=1)
        self.right = nn.Conv2d(1, 4, 3, padding=1)
        self.merge = nn.Conv2d(6, 5, 3, padding=1)
        self.head = nn.Linear(5, 2)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], dim=1)
        y = torch.relu(self.merge(y)).mean(dim=(2, 3))
        return self.head(y) * self.temperature


class BatchNormNet(nn.Module):
    """conv-BN-ReLU twice, pool, linear: a plain BatchNorm CNN for 1x8x8 inputs (digits)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


class ShuffleNet(nn.Module):
    """conv1 -> channel shuffle (view/transpose/reshape, 2 groups of 3) -> conv2 -> mean -> fc, on 1x6x6 inputs.

    With ``shuffle=False`` the same modules without the shuffle: what an analysis that ignores the shuffle sees.
    """

    def __init__(self, shuffle: bool = True) -> None:
        super().__init__()
        self.shuffle = shuffle
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        if self.shuffle:
            b, c, h, w = x.shape
            x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


class LayerNormMLP(nn.Module):
    """flatten -> fc1 -> LayerNorm over its 32 features -> fc2 -> fc3, on 1x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.fc1(x.flatten(1))))
        return self.fc3(torch.relu(self.fc2(x)))


class GroupedConvNet(nn.Module):
    """conv1 -> grouped conv (2 groups, not depthwise) -> 1x1 conv -> mean -> fc, on 1x6x6 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.relu(self.conv3(x)).mean(dim=(2, 3)))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics so folding is really exercised."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            assert module.running_mean is not None and module.running_var is not None  # tracked by default
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


class DiesInAWorker:
    """Unpickles fine in the test process and ends any child process that unpickles it (a worker that dies while
    its pool starts)."""

    def __reduce__(self) -> tuple:
        return (_die_in_a_child, ())


def _die_in_a_child() -> DiesInAWorker:
    import multiprocessing
    import os

    if multiprocessing.current_process().name != "MainProcess":  # a spawned child, named before it unpickles
        os._exit(3)
    return DiesInAWorker()


def digits_artifact_bytes(weight_bits: int | None = None, removed_conv2: int = 0) -> bytes:
    """A valid ``.ajpq`` file of digits_cnn (seed 0): uniform bits (the policy default when ``weight_bits`` is None),
    the first ``removed_conv2`` channels of conv2 removed; what the readers' tests start from."""
    from ajpq.analysis import analyze_model
    from ajpq.artifact import build_artifact
    from ajpq.models import build_model
    from ajpq.policy import Policy, validate_policy

    torch.manual_seed(0)
    model = build_model("digits_cnn", (1, 8, 8), 10).eval()
    analysis = analyze_model(model, (1, 8, 8), model_name="digits_cnn")
    policy = Policy.uniform(analysis) if weight_bits is None else Policy.uniform(analysis, weight_bits)
    policy.layers["conv2"].weight_bits[:removed_conv2] = 0
    artifact = build_artifact(
        model,
        analysis,
        validate_policy(policy, analysis),
        torch.randn(32, 1, 8, 8),
        model_name="digits_cnn",
        input_shape=(1, 8, 8),
        num_classes=10,
        dataset="digits",
    )
    return artifact.to_bytes()
