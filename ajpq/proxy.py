"""How a search scores a candidate policy: the *proxy* for the accuracy the user gets after fine-tuning.

Every search method and every evaluation backend builds its scorer here, from a workspace and a frozen
:class:`ProxyOptions` (picklable, so worker processes and Ray actors rebuild the same scorer). Today's proxies:
plain validation accuracy of the simulated compressed model, or accuracy after ``finetune_steps`` SGD steps of a copy
of the FP32 model before the policy is applied.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ajpq.compress import SimulatedModel
from ajpq.errors import ConfigError
from ajpq.policy import Policy
from ajpq.train import TrainConfig, evaluate_accuracy, train_model
from ajpq.workspace import CALIBRATION_SIZE, Workspace

Evaluator = Callable[[Policy], float]
"""A complete, validated policy -> its search score (a validation accuracy in [0, 1])."""


@dataclass(frozen=True)
class ProxyOptions:
    """What a candidate's score is (the same for every candidate of a search)."""

    finetune_steps: int = 0
    """SGD steps of fine-tuning before the candidate is evaluated (0: none)."""
    seed: int = 0
    """Seed of the fine-tuning data order (the same for every candidate, so scores are comparable)."""

    def __post_init__(self) -> None:
        if isinstance(self.finetune_steps, bool) or not isinstance(self.finetune_steps, int) or self.finetune_steps < 0:
            raise ConfigError(f"finetune_steps must be an integer >= 0, but got {self.finetune_steps!r}")


def make_evaluator(workspace: Workspace, options: ProxyOptions | None = None) -> Evaluator:
    """The scorer of candidate policies on ``workspace``'s validation split under ``options``."""
    options = options or ProxyOptions()
    val = workspace.splits.val
    if not options.finetune_steps:

        def evaluate(policy: Policy) -> float:
            return evaluate_accuracy(workspace.simulated.apply(policy), val, workspace.device)

        return evaluate
    calibration = next(workspace.splits.train.batches(CALIBRATION_SIZE))[0]

    def evaluate_after_finetune(policy: Policy) -> float:
        # SGD (lr 0.005) on a copy of the FP32 model, then the policy applied to that copy (BN folded, quantized)
        model = copy.deepcopy(workspace.model)
        train_model(
            model,
            workspace.splits.train,
            TrainConfig(epochs=1, lr=0.005, max_steps=options.finetune_steps, augment=False),
            device=workspace.device,
            generator=torch.Generator().manual_seed(options.seed),
            progress=False,
        )
        model.eval()
        simulated = SimulatedModel(model, workspace.analysis, calibration, workspace.device)
        return evaluate_accuracy(simulated.apply(policy), val, workspace.device)

    return evaluate_after_finetune
