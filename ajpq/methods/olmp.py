"""olmp: layer-wise magnitude-pruning thresholds found by negatively correlated search (after Li et al., IJCAI 2018).

OLMP searches one pruning threshold per layer with a derivative-free optimizer, minimizing the model size subject to
an accuracy-loss bound, inside an iterative prune-and-retrain loop. Here a threshold is a layer's
``weight_sparsity`` (the fraction of its weights removed by BN-folded magnitude, the policy file's unit); every
round:

1. NCS (Tang, Yang and Yao 2016): ``population`` (1+1)-search processes with Gaussian mutation; a child replaces its
   parent when ``f(child) / (f(parent) + f(child))`` divided by ``Corr(child) / (Corr(parent) + Corr(child))`` is
   below ``lambda_t ~ N(1, 0.1 - 0.1 t/T)``, where ``Corr`` is the smallest Bhattacharyya distance between the
   process's Gaussian and the other processes' (negative correlation keeps the processes apart); step sizes follow
   the 1/5 success rule. The objective is ``f(s) = size_ratio(s) / size_budget + penalty * max(0, loss(s) -
   accuracy_loss)``, with ``loss`` the validation-accuracy drop of the simulated compressed model (the policy's
   ``weight_bits`` and activation bits included) from the FP32 reference, so the bound is a penalty, as OLMP
   handles its constraint. Sparsities only grow from round to round (pruned weights stay pruned).
2. The best sparsities are applied as magnitude masks and the network is retrained with the masks kept (masked SGD,
   ``retrain_epochs``).

OLMP prunes only; its weights are stored at ``weight_bits`` (default 4) in every channel, like Deep Compression's
quantization after pruning, lowered to the highest width at which ``max_sparsity`` can meet the budget (the sparse
format costs at least ``(bits + 4) / 16`` bits per position, so 4-bit weights cannot go below 1/64 of FP32). If
the last round's model is still above the budget, all sparsities are raised along
``s + a (max_sparsity - s)`` with the smallest ``a`` that fits (hard mode). The retrained weights are written to
``weights.pt`` in the run folder; the policy applies to them (``meta.weights``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ajpq.config import check_bits, check_fraction, check_int, check_non_negative
from ajpq.errors import BudgetError
from ajpq.methods.base import MethodOptions, SearchContext, register_method
from ajpq.methods.common import (
    apply_masks,
    fitting_bits,
    layer_masks,
    save_weights,
    sgd_epochs,
    simulate,
    sparse_policy,
)


@dataclass(frozen=True)
class OLMPOptions(MethodOptions):
    weight_bits: int = 4
    """Bits of every kept weight (lowered when max_sparsity cannot meet the budget at this width)."""
    rounds: int = 3
    """Search-then-retrain rounds; each round's sparsities are the next one's lower bounds."""
    population: int = 4
    """NCS population."""
    iterations: int = 5
    """NCS iterations per round."""
    accuracy_loss: float = 0.01
    """Largest validation accuracy drop (from FP32) before the penalty applies."""
    penalty: float = 100.0
    """Weight of the accuracy-drop penalty in NCS's objective."""
    sigma: float = 0.15
    """Initial NCS step size, relative to the search box."""
    retrain_epochs: float = 1.0
    """Masked SGD epochs after each round."""
    lr: float = 0.01
    """Learning rate of the retraining."""
    max_sparsity: float = 0.99
    """Largest layer sparsity (in ``ajpq search``: the search's ``max_sparsity``)."""
    eval_limit: int = 2000
    """Validation images per candidate evaluation."""
    activation_bits: int = 8
    """Activation bits of every layer."""

    def __post_init__(self) -> None:
        check_bits("olmp weight_bits", self.weight_bits)
        check_int("olmp rounds", self.rounds)
        check_int("olmp population", self.population)
        check_int("olmp iterations", self.iterations, 0)
        check_fraction("olmp accuracy_loss", self.accuracy_loss, closed=True)
        check_fraction("olmp max_sparsity", self.max_sparsity)
        check_int("olmp eval_limit", self.eval_limit)
        check_bits("olmp activation_bits", self.activation_bits)
        for name in ("penalty", "sigma", "retrain_epochs", "lr"):
            check_non_negative(f"olmp {name}", getattr(self, name))


def bhattacharyya(mu1: np.ndarray, s1: float, mu2: np.ndarray, s2: float) -> float:
    """Bhattacharyya distance between ``N(mu1, s1^2 I)`` and ``N(mu2, s2^2 I)``."""
    var = (s1 * s1 + s2 * s2) / 2.0
    diff = float(((mu1 - mu2) ** 2).sum())
    return diff / (8.0 * var) + 0.5 * mu1.size * math.log(var / max(s1 * s2, 1e-300))


def ncs_minimize(
    objective: Any,
    low: np.ndarray,
    high: np.ndarray,
    *,
    population: int,
    iterations: int,
    sigma: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float]:
    """Negatively correlated search over the box ``[low, high]``; returns the best point and its value."""
    span = np.maximum(high - low, 1e-9)
    xs = [low + rng.uniform(0.0, 1.0, low.size) * span for _ in range(population)]
    sigmas = [sigma] * population
    fs = [objective(x) for x in xs]
    best = int(np.argmin(fs))
    best_x, best_f = xs[best].copy(), fs[best]
    successes = 0
    for t in range(iterations):
        lam = rng.normal(1.0, max(0.1 - 0.1 * t / max(iterations, 1), 1e-3))
        for i in range(population):
            child = np.clip(xs[i] + rng.normal(0.0, sigmas[i], low.size) * span, low, high)
            f_child = objective(child)
            if f_child < best_f:
                best_x, best_f = child.copy(), f_child
            others = [j for j in range(population) if j != i]
            if others:
                corr_parent = min(bhattacharyya(xs[i], sigmas[i], xs[j], sigmas[j]) for j in others)
                corr_child = min(bhattacharyya(child, sigmas[i], xs[j], sigmas[j]) for j in others)
            else:
                corr_parent = corr_child = 1.0
            f_ratio = f_child / max(fs[i] + f_child, 1e-12)
            c_ratio = corr_child / max(corr_parent + corr_child, 1e-12)
            if f_ratio / max(c_ratio, 1e-12) < lam:
                xs[i], fs[i] = child, f_child
                successes += 1
        rate = successes / population
        successes = 0
        sigmas = [s / 0.9 if rate > 0.2 else s * 0.9 for s in sigmas]
    return best_x, best_f


@register_method
class OLMP:
    name = "olmp"
    Options = OLMPOptions
    resumable = False
    episodic = False

    def run(self, context: SearchContext, options: OLMPOptions) -> None:
        _run(context, options)


def _run(context: SearchContext, opts: OLMPOptions) -> None:
    workspace, budget, seed = context.workspace, context.problem.budget, context.config.seed
    bound, max_sparsity, abits, limit = opts.accuracy_loss, opts.max_sparsity, opts.activation_bits, opts.eval_limit
    size_budget = budget.size or 1.0
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    reference = workspace.val_score(workspace.model, limit=limit)
    names = workspace.analysis.layer_names
    bits = fitting_bits(workspace, workspace.simulated, budget, opts.weight_bits, max_sparsity, abits, "olmp")
    model = copy.deepcopy(workspace.model)
    lower = np.zeros(len(names))
    upper = np.full(len(names), max_sparsity)
    for round_index in range(opts.rounds):
        simulated = simulate(workspace, model)

        def objective(sparsity: np.ndarray, simulated: Any = simulated, round_index: int = round_index) -> float:
            policy = sparse_policy(workspace, names, sparsity, bits, abits)
            report = simulated.cost_model.evaluate(policy)
            accuracy = workspace.val_score(simulated.apply(policy), limit=limit)
            context.record(policy, accuracy, simulated, round=round_index + 1)
            loss = reference - accuracy
            bops_term = report.bops_ratio / budget.bops if budget.bops else 0.0
            return report.size_ratio / size_budget + bops_term + opts.penalty * max(0.0, loss - bound)

        best, _ = ncs_minimize(
            objective,
            lower,
            upper,
            population=opts.population,
            iterations=opts.iterations,
            sigma=opts.sigma,
            rng=rng,
        )
        lower = np.round(best, 6)
        masks = layer_masks(model, workspace, dict(zip(names, lower, strict=True)))
        sgd_epochs(
            model,
            workspace,
            opts.retrain_epochs,
            lr=opts.lr,
            generator=generator,
            after_step=apply_masks(model, masks),
        )
    simulated = simulate(workspace, model)
    sparsity = lower
    if not budget.fits(simulated.cost_model.evaluate(sparse_policy(workspace, names, sparsity, bits, abits))):

        def raised(a: float) -> np.ndarray:
            return np.round(lower + a * (upper - lower), 6)

        if not budget.fits(simulated.cost_model.evaluate(sparse_policy(workspace, names, raised(1.0), bits, abits))):
            raise BudgetError(
                f"olmp cannot meet the budget ({budget.describe()}) at {bits}-bit weights even with max_sparsity "
                f"{max_sparsity:g} in every layer; raise the budget, max_sparsity, or lower weight_bits"
            )
        a_low, a_high = 0.0, 1.0
        for _ in range(30):
            mid = (a_low + a_high) / 2
            if budget.fits(simulated.cost_model.evaluate(sparse_policy(workspace, names, raised(mid), bits, abits))):
                a_high = mid
            else:
                a_low = mid
        sparsity = raised(a_high)
        apply_masks(model, layer_masks(model, workspace, dict(zip(names, sparsity, strict=True))))
        simulated = simulate(workspace, model)
    policy = sparse_policy(workspace, names, sparsity, bits, abits)
    weights_path = save_weights(context.run_dir, workspace, model, "olmp")
    context.finish(policy, simulated, weights_path=weights_path, reference_val_accuracy=reference)
