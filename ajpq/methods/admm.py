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
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ajpq.budget import Budget
from ajpq.cost import magnitude_keep
from ajpq.errors import BudgetError
from ajpq.methods.common import (
    MethodResult,
    Recorder,
    apply_masks,
    check_bits,
    check_fraction,
    check_positive_int,
    fitting_bits,
    folded_scale,
    layer_masks,
    options_with_defaults,
    save_weights,
    sgd_epochs,
    simulate,
    sparse_policy,
)
from ajpq.quant import quantize_weight
from ajpq.runs import RunDir
from ajpq.train import evaluate_accuracy
from ajpq.workspace import Workspace

DEFAULTS: dict[str, Any] = {
    "weight_bits": 4,
    "steps": 3,
    "admm_epochs": 1.0,
    "retrain_epochs": 1.0,
    "quant_epochs": 1.0,
    "rho": 0.01,
    "lr": 0.01,
    "max_sparsity": 0.99,
    "activation_bits": 8,
}


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


def run(
    workspace: Workspace,
    budget: Budget,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    run_dir: RunDir | None = None,
    search_recorder: Any = None,
) -> MethodResult:
    opts = options_with_defaults("admm", DEFAULTS, options)
    bits = check_bits("admm weight_bits", opts["weight_bits"])
    steps = check_positive_int("admm steps", opts["steps"])
    max_sparsity = check_fraction("admm max_sparsity", opts["max_sparsity"])
    rho = float(opts["rho"])
    lr = float(opts["lr"])
    abits = int(opts["activation_bits"])
    recorder = Recorder(workspace, "admm", budget, seed, opts, run_dir, search_recorder)
    generator = torch.Generator().manual_seed(seed)
    names = workspace.analysis.layer_names
    bits = fitting_bits(workspace, workspace.simulated, budget, bits, max_sparsity, abits, "admm")
    final = target_sparsity(workspace, workspace.simulated, budget, bits, abits, max_sparsity)
    model = copy.deepcopy(workspace.model)
    weights = {name: model.get_submodule(name).weight for name in names}
    val = workspace.splits.val

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
        admm(project_sparse, float(opts["admm_epochs"]), enforce)
        masks = layer_masks(model, workspace, dict(zip(names, target, strict=True)))
        sgd_epochs(
            model,
            workspace,
            float(opts["retrain_epochs"]),
            lr=lr,
            generator=generator,
            after_step=apply_masks(model, masks),
        )
        simulated = simulate(workspace, model)
        policy = sparse_policy(workspace, names, target, bits, abits)
        accuracy = evaluate_accuracy(simulated.apply(policy), val, workspace.device)
        recorder.record(policy, accuracy, simulated.cost_model.evaluate(policy), stage=f"prune{step}")

    def project_quant(name: str, value: torch.Tensor) -> torch.Tensor:
        scale = folded_scale(model, workspace)[name].clamp(min=1e-12)
        mask = masks.get(name, torch.ones_like(value))
        layer_bits = torch.full((value.shape[0],), bits, dtype=torch.int64, device=value.device)
        return quantize_weight(value * scale, layer_bits, mask > 0) / scale

    if float(opts["quant_epochs"]) > 0:
        admm(project_quant, float(opts["quant_epochs"]), apply_masks(model, masks))
    simulated = simulate(workspace, model)
    sparsity = final
    policy = sparse_policy(workspace, names, sparsity, bits, abits)
    if not budget.fits(simulated.cost_model.evaluate(policy)):
        sparsity = target_sparsity(workspace, simulated, budget, bits, abits, max_sparsity)
        sparsity = np.maximum(sparsity, final)
        apply_masks(model, layer_masks(model, workspace, dict(zip(names, sparsity, strict=True))))
        simulated = simulate(workspace, model)
        policy = sparse_policy(workspace, names, sparsity, bits, abits)
    accuracy = evaluate_accuracy(simulated.apply(policy), val, workspace.device)
    recorder.record(policy, accuracy, simulated.cost_model.evaluate(policy), stage="quantized")
    weights_path = save_weights(run_dir, workspace, model, "admm")
    result = recorder.finish(policy, simulated, weights_path=weights_path, val_accuracy=accuracy)
    result.extra["model"] = model
    return result
