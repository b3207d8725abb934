"""opq: one-shot pruning-quantization (after Hu et al., AAAI 2021), analytic from the pretrained weights alone.

OPQ's setting: pretrained weights of each layer are modelled as zero-mean Laplace, ``w ~ Laplace(0, b_l)`` with
``b_l = mean|w|`` (its maximum-likelihood scale); every layer gets a magnitude-pruning rate ``p_l`` and one shared
quantizer (here: the same ``k_l`` bits for every channel of the layer); allocations are solved in closed form against
a compression target, with no evaluation loop; the masks and widths stay fixed while fine-tuning. Our distortion
model (relative mean-squared error of a layer, i.e. normalised by ``E[w^2] = 2 b_l^2``):

* pruning with threshold ``t = b ln(1/(1-p))`` (so that ``P(|w| < t) = p``), ``x = t/b``:
  ``D_prune(p) = 1 - e^{-x} (1 + x + x^2/2) = 1 - (1-p)(1 + x + x^2/2)``;
* quantizing the kept weights, ``k >= 2``: uniform step ``Delta_c = max|w_c| / (2^{k-1} - 1)`` per channel (our
  quantizer's per-channel scale), noise ``Delta^2/12``: ``D_quant = (1-p) mean_c(Delta_c^2) / (12 * 2 b^2)``;
  ``k = 1`` (sign times mean): the kept magnitudes are ``t + Exp(b)``, whose variance is ``b^2``:
  ``D_quant = (1-p) / 2``;
* each layer's cost ``C_l(p, k)`` is the exact size in bits of the cost model (sparse storage included).

We minimise ``sum_l D_l(p_l, k_l)`` subject to the budget with a Lagrange multiplier: for a given ``lambda`` each
layer independently takes ``argmin_{p, k} D_l(p, k) + lambda C_l(p, k) / C_ref`` over a grid (``p`` in
``pruning_grid``, ``k`` in 1..8), and ``lambda`` is found by bisection as the smallest that meets the budget. The
result is deterministic and evaluates nothing (the accuracy in ``best_policy.json`` is measured once afterwards).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ajpq.budget import Budget
from ajpq.config import check_bits, check_fraction
from ajpq.cost import CostModel
from ajpq.errors import BudgetError
from ajpq.methods.base import MethodOptions, SearchContext, register_method
from ajpq.policy import LayerPolicy, Policy


@dataclass(frozen=True)
class OPQOptions(MethodOptions):
    max_pruning: float = 0.99
    """Largest magnitude-pruning rate of a layer (the top of the pruning grid)."""
    activation_bits: int = 8
    """Activation bits of every layer."""

    def __post_init__(self) -> None:
        check_fraction("opq max_pruning", self.max_pruning)
        check_bits("opq activation_bits", self.activation_bits)


PRUNING_GRID: tuple[float, ...] = (
    *np.round(np.arange(0.0, 0.9, 0.05), 2).tolist(),
    0.9,
    0.92,
    0.94,
    0.95,
    0.96,
    0.97,
    0.98,
    0.99,
)


def pruning_distortion(p: float) -> float:
    """Relative squared error of pruning the fraction ``p`` of smallest Laplace weights."""
    if p <= 0:
        return 0.0
    x = -math.log(1.0 - p)
    return 1.0 - (1.0 - p) * (1.0 + x + x * x / 2.0)


def quantization_distortion(p: float, bits: int, b: float, mean_sq_max: float) -> float:
    """Relative squared error of quantizing the kept fraction ``1 - p`` with ``bits`` (per-channel max scale)."""
    if bits == 1:
        return (1.0 - p) / 2.0
    step_sq = mean_sq_max / (2 ** (bits - 1) - 1) ** 2
    return (1.0 - p) * step_sq / 12.0 / (2.0 * b * b)


def opq_policy(
    analysis: Any,
    cost_model: CostModel,
    weights: Mapping[str, Any],
    budget: Budget,
    *,
    max_pruning: float = 0.99,
    activation_bits: int = 8,
) -> tuple[Policy, dict[str, Any]]:
    """The OPQ allocation (see the module docstring) from BN-folded ``weights``; no data, no evaluation."""
    grid = [p for p in PRUNING_GRID if p <= max_pruning + 1e-12]
    all_inputs = {layer.name: np.ones(layer.in_channels, dtype=bool) for layer in analysis.layers}
    tables = []
    for layer in analysis.layers:
        w = np.abs(np.asarray(weights[layer.name], dtype=np.float64)).reshape(layer.out_channels, -1)
        b = max(float(w.mean()), 1e-12)
        mean_sq_max = float((w.max(axis=1) ** 2).mean())
        rows = []
        for p in grid:
            for k in range(1, 9):
                bits = np.full(layer.out_channels, k, dtype=np.int64)
                if p > 0:
                    cost = cost_model.sparse_layer_cost(layer, bits, activation_bits, all_inputs[layer.name], p)
                else:
                    cost = cost_model.layer_cost(
                        layer, bits, activation_bits, np.full(layer.out_channels, layer.fan_in)
                    )
                distortion = pruning_distortion(p) + quantization_distortion(p, k, b, mean_sq_max)
                rows.append((distortion, cost.size_bits, cost.bops, p, k))
        tables.append(np.array(rows))
    reference_size = cost_model.reference_size_bits
    reference_bops = cost_model.reference_bops

    def choose(lam: float) -> tuple[list[int], float, float]:
        picks, size, bops = [], float(cost_model.other_bits), 0.0
        for table in tables:
            price = table[:, 1] / reference_size / (budget.size or 1.0) if budget.size is not None else 0.0
            if budget.bops is not None:
                price = price + table[:, 2] / reference_bops / budget.bops
            index = int(np.argmin(table[:, 0] + lam * price))
            picks.append(index)
            size += table[index, 1]
            bops += table[index, 2]
        return picks, size / reference_size, bops / reference_bops

    low, high = 0.0, 1e-6
    while not budget.fits_ratios(*choose(high)[1:]):
        high *= 4.0
        if high > 1e12:
            picks, size_ratio, bops_ratio = choose(high)
            raise BudgetError(
                f"opq cannot meet the budget ({budget.describe()}): with {max_pruning:.0%} pruning and 1 bit in every "
                f"layer the size ratio is {size_ratio:.4g} and the BOPs ratio {bops_ratio:.4g}; raise the budget or "
                "opq's max_pruning"
            )
    if budget.fits_ratios(*choose(0.0)[1:]):
        high = 0.0
    else:
        for _ in range(60):
            mid = (low + high) / 2.0
            if budget.fits_ratios(*choose(mid)[1:]):
                high = mid
            else:
                low = mid
    picks, _, _ = choose(high)
    policy = Policy(layers={}, model_name=analysis.model_name, fingerprint=analysis.fingerprint)
    allocation = {}
    for layer, table, index in zip(analysis.layers, tables, picks, strict=True):
        _, _, _, p, k = table[index]
        policy.layers[layer.name] = LayerPolicy(
            np.full(layer.out_channels, int(k), dtype=np.int64), activation_bits, float(p)
        )
        allocation[layer.name] = {"weight_sparsity": float(p), "bits": int(k)}
    return policy, {"lambda": high, "allocation": allocation}


def workspace_opq_policy(
    workspace: Any, budget: Budget, *, max_pruning: float, activation_bits: int
) -> tuple[Policy, dict[str, Any]]:
    """:func:`opq_policy` of a workspace's FP32 weights (the opq method's result, and ajpq's weight-sparse start)."""
    simulated = workspace.simulated
    weights = {name: weight.cpu().numpy() for name, weight in simulated.reference_weights().items()}
    return opq_policy(
        workspace.analysis,
        simulated.cost_model,
        weights,
        budget,
        max_pruning=max_pruning,
        activation_bits=activation_bits,
    )


@register_method
class OPQ:
    name = "opq"
    Options = OPQOptions
    resumable = False
    episodic = False

    def run(self, context: SearchContext, options: OPQOptions) -> None:
        policy, info = workspace_opq_policy(
            context.workspace,
            context.problem.budget,
            max_pruning=options.max_pruning,
            activation_bits=options.activation_bits,
        )
        simulated = context.workspace.simulated
        context.finish(policy, simulated, lagrange_multiplier=info["lambda"], allocation=info["allocation"])
