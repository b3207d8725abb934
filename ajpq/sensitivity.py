"""How much each layer step suffers when compressed alone: the sensitivity curves the search is steered by.

For every layer step (a coupled channel group, as the environments step through them) and nothing else changed
(every other layer at 8 bits), we measure the damage of

* pruning the least important 25%, 50% and 75% of the step's channels (the rest at 8 bits), and
* quantizing every channel of the step to 1, 2 and 4 bits, and
* quantizing the inputs of the step's layers to 2 and 4 bits (activation bits),

as the mean KL divergence of the compressed model's predictions from the FP32 model's on (up to)
:data:`SENSITIVITY_IMAGES` validation images, minus that of the all-8-bit model (so 0 means "as harmless as 8 bits").
Galen and HiReLC steer their agents with such curves; MCT and AIMET allocate bits from them alone. The table is
measured once per model, weights, validation split and activation bits, and cached as JSON beside the reference
models (``$AJPQ_CACHE_DIR/sensitivity/``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ajpq.analysis import ModelAnalysis
from ajpq.compress import SimulatedModel
from ajpq.data import Split
from ajpq.io import atomic_write_json
from ajpq.policy import Policy

PRUNE_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75)
"""Fractions of a layer step's channels removed (least important first) when its pruning sensitivity is measured."""
QUANT_BITS: tuple[int, ...] = (1, 2, 4)
"""Weight widths of a layer step when its quantization sensitivity is measured."""
ACT_BITS: tuple[int, ...] = (2, 4)
"""Input activation widths of a layer step's layers when its activation sensitivity is measured."""
SENSITIVITY_IMAGES = 512
"""Validation images the divergences are measured on."""
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SensitivityTable:
    """Damage (nats of KL divergence from FP32, beyond the all-8-bit model's) per layer step and setting.

    Rows follow the layer steps of :class:`ajpq.envs.CompressionProblem` (coupled groups ordered by their first
    member layer); ``prune[u, i]`` is the damage of removing ``PRUNE_FRACTIONS[i]`` of step ``u``'s channels (0 for
    steps that may not be pruned, the classifier's outputs), ``quant[u, j]`` that of ``QUANT_BITS[j]``-bit weights,
    ``act[u, k]`` that of ``ACT_BITS[k]``-bit input activations.
    """

    groups: tuple[int, ...]
    """Group id of each row."""
    prune: np.ndarray
    quant: np.ndarray
    act: np.ndarray
    base_kl: float
    """KL divergence of the all-8-bit model from FP32 (subtracted from every entry)."""

    def row(self, group_id: int) -> np.ndarray:
        """The step's eight damages (prune 25/50/75%, weights at 1/2/4 bits, activations at 2/4 bits)."""
        u = self.groups.index(group_id)
        return np.concatenate([self.prune[u], self.quant[u], self.act[u]])

    def features(self, group_id: int) -> np.ndarray:
        """The step's damages squashed into [0, 1) (``d / (1 + d)``): eight observation features."""
        damage = np.maximum(self.row(group_id), 0.0)
        return damage / (1.0 + damage)

    def prune_damage(self, group_id: int, fraction: float) -> float:
        """Damage of removing ``fraction`` of the step's channels, linear between the measured points (0 at 0)."""
        u = self.groups.index(group_id)
        xs = np.array((0.0, *PRUNE_FRACTIONS))
        ys = np.concatenate([[0.0], np.maximum(self.prune[u], 0.0)])
        if fraction <= xs[-1]:
            return float(np.interp(fraction, xs, ys))
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])  # extrapolate the last segment, never decreasing
        return float(ys[-1] + max(slope, 0.0) * (fraction - xs[-1]))

    def quant_damage(self, group_id: int, bits: int) -> float:
        """Damage of ``bits``-bit weights: measured at 1, 2 and 4 bits, 0 at 8, geometric in between (the error of
        uniform quantization shrinks about 4x per extra bit)."""
        u = self.groups.index(group_id)
        measured = dict(zip(QUANT_BITS, np.maximum(self.quant[u], 0.0), strict=True))
        if bits >= 8:
            return 0.0
        if bits in measured:
            return float(measured[bits])
        if bits == 3:
            return float(math.sqrt(max(measured[2], 0.0) * max(measured[4], 0.0)))
        return float(measured[4] * 4.0 ** -(bits - 4))

    def act_damage(self, group_id: int, bits: int) -> float:
        """Damage of ``bits``-bit input activations: measured at 2 and 4 bits, 0 at 8, geometric in between."""
        u = self.groups.index(group_id)
        at2, at4 = np.maximum(self.act[u], 0.0)
        if bits >= 8:
            return 0.0
        if bits <= 2:
            return float(at2)
        if bits == 3:
            return float(math.sqrt(at2 * at4))
        return float(at4 * 4.0 ** -(bits - 4))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "ajpq-sensitivity",
            "version": FORMAT_VERSION,
            "prune_fractions": list(PRUNE_FRACTIONS),
            "quant_bits": list(QUANT_BITS),
            "act_bits": list(ACT_BITS),
            "groups": list(self.groups),
            "prune": self.prune.tolist(),
            "quant": self.quant.tolist(),
            "act": self.act.tolist(),
            "base_kl": self.base_kl,
        }

    @classmethod
    def from_dict(cls, data: Any) -> SensitivityTable | None:
        """The table, or None when ``data`` is not a table this build wrote (the cache is then measured anew)."""
        try:
            if data["format"] != "ajpq-sensitivity" or data["version"] != FORMAT_VERSION:
                return None
            if (
                tuple(data["prune_fractions"]) != PRUNE_FRACTIONS
                or tuple(data["quant_bits"]) != QUANT_BITS
                or tuple(data["act_bits"]) != ACT_BITS
            ):
                return None
            prune = np.asarray(data["prune"], dtype=np.float64).reshape(-1, len(PRUNE_FRACTIONS))
            quant = np.asarray(data["quant"], dtype=np.float64).reshape(-1, len(QUANT_BITS))
            act = np.asarray(data["act"], dtype=np.float64).reshape(-1, len(ACT_BITS))
            groups = tuple(int(g) for g in data["groups"])
            if not len(groups) == len(prune) == len(quant) == len(act):
                return None
            return cls(groups, prune, quant, act, float(data["base_kl"]))
        except (KeyError, TypeError, ValueError):
            return None

    def markdown(self, analysis: ModelAnalysis) -> str:
        """A table for TensorBoard and the README: one row per layer step."""
        head = "| step | layers | " + " | ".join(
            [
                *(f"prune {f:.0%}" for f in PRUNE_FRACTIONS),
                *(f"w {b} bit" for b in QUANT_BITS),
                *(f"a {b} bit" for b in ACT_BITS),
            ]
        )
        lines = [head + " |", "|" + "---|" * (2 + len(PRUNE_FRACTIONS) + len(QUANT_BITS) + len(ACT_BITS))]
        for u, gid in enumerate(self.groups):
            members = ", ".join(analysis.groups[gid].members)
            values = " | ".join(f"{v:.4f}" for v in self.row(gid))
            lines.append(f"| {u} | {members} | {values} |")
        return "\n".join(lines)


def step_groups(analysis: ModelAnalysis) -> list[int]:
    """Group ids in the order the environments step through them (by each group's first layer)."""
    seen: list[int] = []
    for layer in analysis.layers:
        if layer.group not in seen:
            seen.append(layer.group)
    return seen


def _pruned(analysis: ModelAnalysis, base: Policy, group_id: int, fraction: float) -> Policy:
    policy = base.copy()
    group = analysis.groups[group_id]
    count = min(group.size - 1, round(fraction * group.size))
    policy.prune_group(analysis, group_id, group.order[group.size - count :])
    return policy


def _quantized(analysis: ModelAnalysis, base: Policy, group_id: int, bits: int) -> Policy:
    policy = base.copy()
    for member in analysis.groups[group_id].members:
        policy.layers[member].weight_bits[:] = bits
    return policy


def _activations(analysis: ModelAnalysis, base: Policy, group_id: int, bits: int) -> Policy:
    policy = base.copy()
    for member in analysis.groups[group_id].members:
        policy.layers[member].activation_bits = bits
    return policy


@torch.inference_mode()
def _is_classifier(outputs: torch.Tensor) -> bool:
    """Whether outputs are class scores (one row of several per image), compared by KL divergence; other outputs
    (a regression, dense maps) are compared by their squared error relative to the reference's variance."""
    return outputs.dim() == 2 and outputs.shape[1] > 1


def _reference(outputs: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(outputs.double(), dim=1) if _is_classifier(outputs) else outputs.double()


@torch.inference_mode()
def _mean_kl(module: torch.nn.Module, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of KL(reference || module) of the softmax predictions (relative squared error for outputs
    that are not class scores)."""
    outputs = module(images).double()
    if not _is_classifier(outputs):
        return float((outputs - reference).square().mean() / reference.var().clamp_min(1e-12))
    log_q = F.log_softmax(outputs, dim=1)
    return float(F.kl_div(log_q, reference, reduction="batchmean", log_target=True))


def measure_sensitivity(
    model: torch.nn.Module,
    simulated: SimulatedModel,
    analysis: ModelAnalysis,
    val: Split,
    activation_bits: int = 8,
    *,
    images: int = SENSITIVITY_IMAGES,
    progress: bool = True,
) -> SensitivityTable:
    """Measure the table (see the module docstring); ``simulated`` is the model's :class:`SimulatedModel`; a
    progress bar on stderr counts the evaluations (8 per layer step)."""
    device = simulated.device
    x = next(val.batches(images, device=device))[0]
    with torch.inference_mode():
        was_training = model.training
        model.eval()
        reference = _reference(model(x))
        model.train(was_training)
    base = Policy.uniform(analysis, 8, activation_bits)
    base_kl = _mean_kl(simulated.apply(base), x, reference)
    groups = step_groups(analysis)
    prune = np.zeros((len(groups), len(PRUNE_FRACTIONS)))
    quant = np.zeros((len(groups), len(QUANT_BITS)))
    act = np.zeros((len(groups), len(ACT_BITS)))

    total = sum(len(QUANT_BITS) + len(ACT_BITS) + len(PRUNE_FRACTIONS) * analysis.groups[g].prunable for g in groups)
    disable = not progress or os.environ.get("AJPQ_NO_PROGRESS") == "1"
    bar = tqdm(total=total, desc="layer sensitivity", unit="eval", disable=disable, leave=False)

    def damage(policy: Policy) -> float:
        bar.update(1)
        return _mean_kl(simulated.apply(policy), x, reference) - base_kl

    for u, gid in enumerate(groups):
        if analysis.groups[gid].prunable:
            for i, fraction in enumerate(PRUNE_FRACTIONS):
                prune[u, i] = damage(_pruned(analysis, base, gid, fraction))
        for j, bits in enumerate(QUANT_BITS):
            quant[u, j] = damage(_quantized(analysis, base, gid, bits))
        for k, bits in enumerate(ACT_BITS):
            act[u, k] = damage(_activations(analysis, base, gid, bits))
    bar.close()
    simulated.apply(base)
    return SensitivityTable(tuple(groups), prune, quant, act, base_kl)


def cache_key(model: torch.nn.Module, analysis: ModelAnalysis, val: Split, activation_bits: int, images: int) -> str:
    """A digest of everything the table depends on: weights, model structure, validation images, activation bits."""
    digest = hashlib.sha256()
    digest.update(f"{analysis.fingerprint}|{analysis.criterion}|{activation_bits}|{images}|{len(val)}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    x, y = next(val.batches(images))
    digest.update(x.to(torch.float32).contiguous().numpy().tobytes())
    digest.update(y.contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def load_or_measure(
    model: torch.nn.Module,
    simulated: SimulatedModel,
    analysis: ModelAnalysis,
    val: Split,
    activation_bits: int,
    cache: Path | None,
    *,
    images: int = SENSITIVITY_IMAGES,
    progress: bool = True,
) -> tuple[SensitivityTable, bool]:
    """The cached table for these weights and data, or a new measurement (cached when ``cache`` is a folder).

    Returns the table and whether it came from the cache.
    """
    path = None
    if cache is not None:
        path = cache / f"{cache_key(model, analysis, val, activation_bits, images)}.json"
        if path.is_file():
            try:
                table = SensitivityTable.from_dict(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                table = None
            if table is not None and list(table.groups) == step_groups(analysis):
                return table, True
    table = measure_sensitivity(model, simulated, analysis, val, activation_bits, images=images, progress=progress)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, table.to_dict())
        except OSError:
            pass  # a read-only cache only costs a re-measurement next time
    return table, False
