"""What the baseline methods share: option checks, masked (re)training and channel-group pruning.

Methods that change the weights (OLMP, ADMM) write them as ``weights.pt`` in the run folder
(:func:`save_weights`); their policy's meta names that file.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ajpq.analysis import layer_module
from ajpq.budget import Budget
from ajpq.checkpoint import checkpoint_meta, load_checkpoint, load_weights, save_checkpoint
from ajpq.compress import SimulatedModel
from ajpq.cost import CostModel
from ajpq.errors import BudgetError
from ajpq.logs import log
from ajpq.policy import Policy
from ajpq.runs import RunDir
from ajpq.train import evaluate_accuracy
from ajpq.workspace import Workspace

WEIGHTS_FILE = "weights.pt"


def simulate(workspace: Workspace, model: nn.Module | None = None) -> SimulatedModel:
    """The simulated model of the workspace's weights, or of retrained ``model`` (same analysis and calibration)."""
    if model is None:
        return workspace.simulated
    simulated = SimulatedModel(model, workspace.analysis, workspace.calibration_images(), workspace.device)
    simulated.cost_model.latency = workspace.latency_table  # the same shapes: the same latency
    return simulated


def prune_groups(workspace: Workspace, policy: Policy, fraction: float) -> Policy:
    """Remove the least important ``fraction`` of every prunable coupled group (all member layers together)."""
    analysis = workspace.analysis
    for group in analysis.groups:
        if not group.prunable:
            continue
        count = min(group.size - 1, round(fraction * group.size))
        if count <= 0:
            continue
        policy.prune_group(analysis, group.id, group.order[group.size - count :])
    return policy


def save_weights(run_dir: RunDir | None, workspace: Workspace, model: nn.Module, method: str) -> Path | None:
    """Write retrained FP32 weights as ``weights.pt`` in the run folder (a checkpoint ``--weights`` reads)."""
    if run_dir is None:
        return None
    meta = checkpoint_meta(
        workspace.model_name,
        workspace.splits,
        retrained_by=method,
        accuracy={"val": evaluate_accuracy(model, workspace.splits.val, workspace.device)},
    )
    return save_checkpoint(run_dir.path / WEIGHTS_FILE, model, meta)


def load_method_weights(workspace: Workspace, path: Path) -> nn.Module:
    """A copy of the workspace's model with the weights a method wrote with :func:`save_weights`."""
    model = copy.deepcopy(workspace.model)
    load_weights(model, load_checkpoint(path), workspace.model_name, str(path))
    return model.to(workspace.device).eval()


def folded_scale(model: nn.Module, workspace: Workspace) -> dict[str, torch.Tensor]:
    """Per layer, ``|gamma| / sqrt(var + eps)`` of its BatchNorm (ones without one): folded |w| = |w| * scale."""
    scales = {}
    for layer in workspace.analysis.layers:
        weight = layer_module(model, layer.name).weight
        if layer.bn_name is None:
            scales[layer.name] = torch.ones(weight.shape[0], device=weight.device)
            continue
        bn = model.get_submodule(layer.bn_name)
        assert isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d) and bn.running_var is not None  # the analysis's BN
        gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
        scales[layer.name] = (gamma / torch.sqrt(bn.running_var + bn.eps)).abs()
    return {name: s.reshape(-1, *([1] * (layer_module(model, name).weight.dim() - 1))) for name, s in scales.items()}


def layer_masks(model: nn.Module, workspace: Workspace, sparsity: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Magnitude masks (on BN-folded magnitudes, all channels kept) of the layers with sparsity, by layer name."""
    cost_model = CostModel.from_model(workspace.analysis, model)
    masks = {}
    for layer in workspace.analysis.layers:
        s = float(sparsity.get(layer.name, 0.0))
        if s <= 0:
            continue
        bits = np.full(layer.out_channels, 8, dtype=np.int64)
        keep = cost_model.weight_mask(layer, bits, np.ones(layer.in_channels, dtype=bool), s)
        weight = layer_module(model, layer.name).weight
        masks[layer.name] = torch.from_numpy(keep).reshape(weight.shape).to(weight.device, weight.dtype)
    return masks


def sgd_epochs(
    model: nn.Module,
    workspace: Workspace,
    epochs: float,
    *,
    lr: float,
    generator: torch.Generator,
    batch_size: int = 128,
    weight_decay: float = 1e-4,
    penalty: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    on_epoch: Callable[[], None] | None = None,
) -> None:
    """SGD (momentum 0.9, cosine) for ``epochs`` (fractions allowed) with an optional extra loss term.

    ``after_step`` keeps constraints (masks) after every update; ``on_epoch`` runs after every full epoch (ADMM's
    Z and U updates).
    """
    if epochs <= 0:
        return
    device = workspace.device
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    train = workspace.splits.train
    steps_per_epoch = max(1, math.ceil(len(train) / batch_size))
    total = max(1, round(epochs * steps_per_epoch))
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    while step < total:
        for x, y in train.batches(batch_size, shuffle=True, generator=generator, augment=True, device=device):
            if step >= total:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if penalty is not None:
                loss = loss + penalty()
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            step += 1
            if step % steps_per_epoch == 0 and on_epoch is not None:
                on_epoch()
    model.eval()


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Callable[[], None]:
    """A function that zeroes the masked weights of ``model`` (call it after every optimizer step)."""

    @torch.no_grad()
    def enforce() -> None:
        for name, mask in masks.items():
            layer_module(model, name).weight.mul_(mask)

    enforce()
    return enforce


def sparse_policy(workspace: Workspace, names: list[str], sparsity: np.ndarray, bits: int, abits: int) -> Policy:
    """Every channel kept at ``bits``, layer ``names[i]`` with weight sparsity ``sparsity[i]``."""
    policy = Policy.uniform(workspace.analysis, bits, abits)
    for name, s in zip(names, sparsity, strict=True):
        policy.layers[name].weight_sparsity = float(round(float(s), 6))
    return policy


def fitting_bits(
    workspace: Workspace,
    simulated: SimulatedModel,
    budget: Budget,
    max_bits: int,
    max_sparsity: float,
    abits: int,
    method: str,
) -> int:
    """The highest width <= ``max_bits`` at which ``max_sparsity`` in every layer meets the budget."""
    names = workspace.analysis.layer_names
    for bits in range(max_bits, 0, -1):
        policy = sparse_policy(workspace, names, np.full(len(names), max_sparsity), bits, abits)
        report = simulated.cost_model.evaluate(policy)
        if budget.fits(report):
            if bits < max_bits:
                log(
                    f"{method}: {max_bits}-bit weights cannot meet the budget at sparsity {max_sparsity:g}; "
                    f"using {bits} bits"
                )
            return bits
    raise BudgetError(
        f"method '{method}' cannot meet the budget ({budget.describe()}): 1-bit weights with max_sparsity "
        f"{max_sparsity:g} in every layer still have size ratio {report.size_ratio:.4g} (sparse storage costs at "
        "least (bits + 4) / 16 bits per weight position); raise the budget or max_sparsity"
    )
