"""admm: progressive ADMM pruning, then ADMM quantization, then masked retraining (after Ye et al., 2019).

ADMM splits ``min_W loss(W) s.t. W in S`` into ``W``-steps of SGD on ``loss(W) + rho/2 ||W - Z + U||^2`` and, after
every epoch, ``Z = Proj_S(W + U)`` and ``U = U + W - Z``. Progressive ADMM reaches a high target in ``steps`` stages
of growing targets, each starting from the last one's retrained weights:

* pruning stage ``t`` (1..steps) targets a kept fraction ``(1 - s_l)^(t/steps)`` per layer; ``Proj_S`` keeps the
  largest BN-folded magnitudes of each layer (``removed_count`` smallest zeroed, the policy file's rule); after the
  ADMM epochs the weights are hard-pruned to the target and retrained with the mask kept (``retrain_epochs``);
* quantization stage: ``Proj_Q`` rounds the kept weights of each channel to the ``weight_bits`` levels of our
  per-channel quantizer (on BN-folded weights), for ``quant_epochs`` ADMM epochs with the masks kept.

The final per-layer sparsities ``s_l`` are set once, before training, to meet the budget at ``weight_bits``: one
global threshold on magnitudes normalised by each layer's RMS (a layer-wise magnitude allocation), capped at
``max_sparsity``, found by bisection on the exact cost (``weight_bits`` is lowered first if even ``max_sparsity``
cannot meet the budget at that width). If retraining moved the sparse-index cost above the budget,
the sparsities are raised (hard mode) without more training. The retrained weights are written to ``weights.pt``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ajpq.analysis import layer_module
from ajpq.budget import Budget
from ajpq.config import check_bits, check_fraction, check_int, check_non_negative
from ajpq.cost import magnitude_keep
from ajpq.errors import BudgetError
from ajpq.methods.base import MethodOptions, SearchContext, register_method
from ajpq.methods.common import (
    apply_masks,
    fitting_bits,
    folded_scale,
    layer_masks,
    save_weights,
    sgd_epochs,
    simulate,
    sparse_policy,
)
from ajpq.quant import quantize_weight
from ajpq.workspace import Workspace


@dataclass(frozen=True)
class ADMMOptions(MethodOptions):
    weight_bits: int = 4
    """Bits of every kept weight (lowered when max_sparsity cannot meet the budget at this width)."""
    steps: int = 3
    """Progressive pruning steps towards the final sparsities."""
    admm_epochs: float = 1.0
    """ADMM epochs per pruning step."""
    retrain_epochs: float = 1.0
    """Masked SGD epochs after each pruning step."""
    quant_epochs: float = 1.0
    """ADMM epochs towards the quantized weights at the end (0: none)."""
    rho: float = 0.01
    """ADMM penalty weight."""
    lr: float = 0.01
    """Learning rate."""
    max_sparsity: float = 0.99
    """Largest layer sparsity (in ``ajpq search``: the search's ``max_sparsity``)."""
    activation_bits: int = 8
    """Activation bits of every layer."""

    def __post_init__(self) -> None:
        check_bits("admm weight_bits", self.weight_bits)
        check_int("admm steps", self.steps)
        check_fraction("admm max_sparsity", self.max_sparsity)
        check_bits("admm activation_bits", self.activation_bits)
        for name in ("admm_epochs", "retrain_epochs", "quant_epochs", "rho", "lr"):
            check_non_negative(f"admm {name}", getattr(self, name))


def target_sparsity(
    workspace: Workspace, simulated: Any, budget: Budget, bits: int, abits: int, max_sparsity: float
) -> np.ndarray:
    """Per-layer sparsities from one global threshold on RMS-normalised magnitudes that meets the budget."""
    names = workspace.analysis.layer_names
    normalised = []
    for weight in simulated.reference_weights().values():
        w = weight.detach().abs().float().cpu().numpy().ravel()
        normalised.append(np.sort(w / max(float(np.sqrt((w**2).mean())), 1e-12)))

    def sparsities(threshold: float) -> np.ndarray:
        return np.array(
            [min(max_sparsity, np.searchsorted(v, threshold) / v.size) for v in normalised], dtype=np.float64
        ).round(6)

    def fits(threshold: float) -> bool:
        policy = sparse_policy(workspace, names, sparsities(threshold), bits, abits)
        return budget.fits(simulated.cost_model.evaluate(policy))

    high = max(float(v[-1]) for v in normalised) + 1.0
    if not fits(high):
        raise BudgetError(
            f"admm cannot meet the budget ({budget.describe()}) at {bits}-bit weights even with max_sparsity "
            f"{max_sparsity:g} in every layer; raise the budget, max_sparsity, or lower weight_bits"
        )
    low = 0.0
    if fits(low):
        return sparsities(low)
    for _ in range(40):
        mid = (low + high) / 2
        if fits(mid):
            high = mid
        else:
            low = mid
    return sparsities(high)


@register_method
class ADMM:
    name = "admm"
    Options = ADMMOptions
    resumable = False
    episodic = False

    def run(self, context: SearchContext, options: ADMMOptions) -> None:
        _run(context, options)


def _run(context: SearchContext, opts: ADMMOptions) -> None:
    workspace, budget, seed = context.workspace, context.problem.budget, context.config.seed
    steps, max_sparsity, rho, lr, abits = opts.steps, opts.max_sparsity, opts.rho, opts.lr, opts.activation_bits
    generator = torch.Generator().manual_seed(seed)
    names = workspace.analysis.layer_names
    bits = fitting_bits(workspace, workspace.simulated, budget, opts.weight_bits, max_sparsity, abits, "admm")
    final = target_sparsity(workspace, workspace.simulated, budget, bits, abits, max_sparsity)
    model = copy.deepcopy(workspace.model)
    weights = {name: layer_module(model, name).weight for name in names}

    def admm(project: Any, epochs: float, after_step: Any = None) -> None:
        z = {name: project(name, w.detach()) for name, w in weights.items()}
        u = {name: torch.zeros_like(w) for name, w in weights.items()}

        def penalty() -> torch.Tensor:
            return sum((rho / 2) * (weights[n] - z[n] + u[n]).pow(2).sum() for n in names)

        @torch.no_grad()
        def dual_update() -> None:
            for n in names:
                z[n] = project(n, weights[n].detach() + u[n])
                u[n] += weights[n].detach() - z[n]

        sgd_epochs(model, workspace, epochs, lr=lr, generator=generator, penalty=penalty, after_step=after_step)
        dual_update()

    masks: dict[str, torch.Tensor] = {}
    for step in range(1, steps + 1):
        target = np.round(1.0 - (1.0 - final) ** (step / steps), 6)

        def project_sparse(name: str, value: torch.Tensor, target: np.ndarray = target) -> torch.Tensor:
            s = float(target[names.index(name)])
            if s <= 0:
                return value.clone()
            scale = folded_scale(model, workspace)[name]
            keep = magnitude_keep((value.abs() * scale).cpu().numpy().ravel(), np.ones(value.numel(), dtype=bool), s)
            return value * torch.from_numpy(keep).reshape(value.shape).to(value.device, value.dtype)

        enforce = apply_masks(model, masks) if masks else None
        admm(project_sparse, opts.admm_epochs, enforce)
        masks = layer_masks(model, workspace, dict(zip(names, target, strict=True)))
        sgd_epochs(
            model,
            workspace,
            opts.retrain_epochs,
            lr=lr,
            generator=generator,
            after_step=apply_masks(model, masks),
        )
        simulated = simulate(workspace, model)
        policy = sparse_policy(workspace, names, target, bits, abits)
        accuracy = workspace.val_score(simulated.apply(policy))
        context.record(policy, accuracy, simulated, stage=f"prune{step}")

    def project_quant(name: str, value: torch.Tensor) -> torch.Tensor:
        scale = folded_scale(model, workspace)[name].clamp(min=1e-12)
        mask = masks.get(name, torch.ones_like(value))
        layer_bits = torch.full((value.shape[0],), bits, dtype=torch.int64, device=value.device)
        return quantize_weight(value * scale, layer_bits, mask > 0) / scale

    if opts.quant_epochs > 0:
        admm(project_quant, opts.quant_epochs, apply_masks(model, masks))
    simulated = simulate(workspace, model)
    sparsity = final
    policy = sparse_policy(workspace, names, sparsity, bits, abits)
    if not budget.fits(simulated.cost_model.evaluate(policy)):
        sparsity = target_sparsity(workspace, simulated, budget, bits, abits, max_sparsity)
        sparsity = np.maximum(sparsity, final)
        apply_masks(model, layer_masks(model, workspace, dict(zip(names, sparsity, strict=True))))
        simulated = simulate(workspace, model)
        policy = sparse_policy(workspace, names, sparsity, bits, abits)
    accuracy = workspace.val_score(simulated.apply(policy))
    context.record(policy, accuracy, simulated, stage="quantized")
    weights_path = save_weights(context.run_dir, workspace, model, "admm")
    context.finish(policy, simulated, weights_path=weights_path, val_accuracy=accuracy)
