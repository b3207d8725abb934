"""What every method shares: options, the run-folder record, masked (re)training and channel-group pruning.

A method is ``run(workspace, budget, seed, options, run_dir) -> MethodResult``: it reads the model, data and
budget, writes ``config.yaml``, ``run.json``, ``episodes.jsonl`` (one line per evaluated candidate),
``best_policy.json`` and TensorBoard scalars into ``run_dir`` (an :class:`ajpq.runs.RunDir`), and returns a complete,
validated policy that meets the budget. Methods that change the weights (OLMP, ADMM) also write ``weights.pt``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ajpq.budget import Budget
from ajpq.checkpoint import checkpoint_meta, save_checkpoint
from ajpq.compress import SimulatedModel
from ajpq.cost import CostModel, CostReport
from ajpq.errors import BudgetError, ConfigError
from ajpq.logs import log
from ajpq.policy import Policy, validate_policy
from ajpq.runs import RunDir
from ajpq.train import evaluate_accuracy
from ajpq.workspace import Workspace

WEIGHTS_FILE = "weights.pt"


def options_with_defaults(method: str, defaults: Mapping[str, Any], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """``defaults`` updated by ``given``; an unknown key is refused with the list of known ones."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} for method '{method}'; it takes {sorted(defaults)} (see the README's "
            "'Methods and compare' section)"
        )
    values = dict(defaults)
    values.update({k: v for k, v in given.items() if v is not None})
    return values


def check_fraction(name: str, value: Any, *, high: float = 1.0, closed: bool = False) -> float:
    """A number in ``[0, high)`` (``[0, high]`` when ``closed``), or a :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number in [0, {high:g}{']' if closed else ')'}, but got {value!r}")
    if not (0.0 <= value <= high if closed else 0.0 <= value < high):
        raise ConfigError(f"{name} must be in [0, {high:g}{']' if closed else ')'}, but got {value:g}")
    return float(value)


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, but got {value!r}")
    return int(value)


def check_bits(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        raise ConfigError(f"{name} must be an integer from 1 to 8, but got {value!r}")
    return int(value)


@dataclass
class MethodResult:
    """What a method returns: its policy (complete, with metrics and meta) and how it got there."""

    method: str
    policy: Policy
    report: CostReport
    val_accuracy: float
    evaluations: int
    wall_time: float
    weights_path: Path | None = None
    """Weights the policy applies to, when the method retrained them (OLMP, ADMM); None = the workspace's."""
    extra: dict[str, Any] = field(default_factory=dict)


class Recorder:
    """Writes a method's run folder: configuration, one line per evaluated candidate, the best policy, TensorBoard."""

    def __init__(
        self,
        workspace: Workspace,
        method: str,
        budget: Budget,
        seed: int,
        options: Mapping[str, Any],
        run_dir: RunDir | None,
        search_recorder: Any = None,
    ) -> None:
        self.workspace = workspace
        self.method = method
        self.budget = budget
        self.seed = seed
        self.options = dict(options)
        self.run_dir = run_dir
        self.search_recorder = search_recorder
        """Inside ``ajpq search``: the search loop's recorder (it writes episodes, progress and TensorBoard)."""
        self.fp32_accuracy = getattr(search_recorder, "fp32_accuracy", None)
        self.evaluations = 0
        self.start = time.perf_counter()
        self.best: tuple[float, Policy, CostReport] | None = None
        if run_dir is not None and search_recorder is None:
            run_dir.write_config(self.config())
            run_dir.write_info(
                {
                    "method": method,
                    "model": workspace.model_name,
                    "dataset": workspace.splits.name,
                    "fingerprint": workspace.analysis.fingerprint,
                    "reference_accuracy": workspace.checkpoint.get("accuracy"),
                }
            )

    def config(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model": self.workspace.model_name,
            "dataset": self.workspace.splits.name,
            "split_seed": self.workspace.splits.split_seed,
            "seed": self.seed,
            "size_budget": self.budget.size,
            "bops_budget": self.budget.bops,
            "method_options": self.options,
        }

    def record(
        self,
        policy: Policy,
        accuracy: float,
        report: CostReport,
        *,
        eval_time: float = 0.0,
        projected: bool = False,
        **extra: Any,
    ) -> None:
        """One evaluated candidate: an ``episodes.jsonl`` line and TensorBoard scalars; tracks the best that fits."""
        self.evaluations += 1
        feasible = self.budget.fits(report)
        if feasible and (self.best is None or accuracy > self.best[0]):
            self.best = (accuracy, policy.copy(), report)
        if self.search_recorder is not None:
            from ajpq.envs import EpisodeResult

            reward = accuracy - (self.fp32_accuracy or 0.0)
            result = EpisodeResult(reward, accuracy, report, feasible, projected, policy, eval_time)
            extra = {k: v for k, v in extra.items() if isinstance(v, int | float | str | bool)}
            sparsity = {n: layer.weight_sparsity for n, layer in policy.layers.items() if layer.weight_sparsity > 0}
            self.search_recorder.record(result, {**extra, **({"weight_sparsity": sparsity} if sparsity else {})})
            return
        if self.run_dir is None:
            return
        record = {
            "episode": self.evaluations,
            "reward": accuracy if feasible else 0.0,
            "accuracy": accuracy,
            "size_ratio": report.size_ratio,
            "bops_ratio": report.bops_ratio,
            "feasible": feasible,
            "wall_time": time.perf_counter() - self.start,
            **extra,
        }
        sparsity = {name: layer.weight_sparsity for name, layer in policy.layers.items() if layer.weight_sparsity > 0}
        if sparsity:
            record["weight_sparsity"] = sparsity
        self.run_dir.append_episode(record, policy)
        self.run_dir.add_scalars(
            {
                "search/accuracy": accuracy,
                "search/size_ratio": report.size_ratio,
                "search/bops_ratio": report.bops_ratio,
                "search/best_accuracy": self.best[0] if self.best else 0.0,
            },
            self.evaluations,
        )

    def finish(
        self,
        policy: Policy,
        simulated: SimulatedModel,
        *,
        weights_path: Path | None = None,
        val_accuracy: float | None = None,
        **meta: Any,
    ) -> MethodResult:
        """Validate the final policy, check the budget, stamp metrics and meta, write ``best_policy.json``."""
        analysis = self.workspace.analysis
        policy = validate_policy(policy, analysis, f"{self.method} policy")
        report = simulated.cost_model.evaluate(policy)
        if not self.budget.fits(report):
            raise BudgetError(
                f"method '{self.method}' could not meet the budget ({self.budget.describe()}): its policy has size "
                f"ratio {report.size_ratio:.4g} and BOPs ratio {report.bops_ratio:.4g}; raise the budget or the "
                "method's max_sparsity"
            )
        if val_accuracy is None:
            val_accuracy = evaluate_accuracy(simulated.apply(policy), self.workspace.splits.val, self.workspace.device)
        wall = time.perf_counter() - self.start
        extra_meta = {"evaluations": self.evaluations, "search_wall_time": wall, **meta}
        if weights_path is not None:
            extra_meta["weights"] = str(weights_path)
        stamped = policy.with_meta(self.method, self.seed, **extra_meta)
        stamped.metrics = {"val_accuracy": val_accuracy, **report.as_dict()}
        if self.search_recorder is not None and self.run_dir is not None:
            # the method's final policy is its answer (OLMP/ADMM retrain weights after their candidates)
            stamped.metrics = {
                "val_accuracy": val_accuracy,
                "fp32_accuracy": self.fp32_accuracy,
                "split": "val",
                **report.as_dict(),
            }
            self.run_dir.write_best(stamped)
            self.search_recorder.restore_best(
                {
                    "episode": self.search_recorder.episode,
                    "reward": val_accuracy - (self.fp32_accuracy or 0.0),
                    "accuracy": val_accuracy,
                    "size_ratio": report.size_ratio,
                    "bops_ratio": report.bops_ratio,
                    "compression_rate": report.compression_rate,
                }
            )
        elif self.run_dir is not None:
            self.run_dir.write_best(stamped)
            self.run_dir.add_scalars(
                {
                    "eval/accuracy": val_accuracy,
                    "search/size_ratio_final": report.size_ratio,
                    "search/bops_ratio_final": report.bops_ratio,
                    "time/search_wall_time": wall,
                },
                self.evaluations,
            )
            self.run_dir.close()
        log(
            f"{self.method}: size ratio {report.size_ratio:.4g} ({report.compression_rate:.1f}x), BOPs ratio "
            f"{report.bops_ratio:.4g}, val accuracy {val_accuracy:.4f}, {self.evaluations} evaluations, {wall:.1f} s"
        )
        return MethodResult(self.method, stamped, report, val_accuracy, self.evaluations, wall, weights_path)


def simulate(workspace: Workspace, model: nn.Module | None = None) -> SimulatedModel:
    """The simulated model of the workspace's weights, or of retrained ``model`` (same analysis and calibration)."""
    if model is None:
        return workspace.simulated
    return SimulatedModel(model, workspace.analysis, workspace.calibration_images(), workspace.device)


def prune_groups(workspace: Workspace, policy: Policy, fraction: float) -> Policy:
    """Remove the least important ``fraction`` of every prunable coupled group (all member layers together)."""
    analysis = workspace.analysis
    for group in analysis.groups:
        if not group.prunable:
            continue
        count = min(group.size - 1, round(fraction * group.size))
        if count <= 0:
            continue
        removed = group.order[group.size - count :]
        for member in group.members:
            policy.layers[member].weight_bits[np.isin(analysis.out_root[member], removed)] = 0
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


def folded_scale(model: nn.Module, workspace: Workspace) -> dict[str, torch.Tensor]:
    """Per layer, ``|gamma| / sqrt(var + eps)`` of its BatchNorm (ones without one): folded |w| = |w| * scale."""
    scales = {}
    for layer in workspace.analysis.layers:
        weight = model.get_submodule(layer.name).weight
        if layer.bn_name is None:
            scales[layer.name] = torch.ones(weight.shape[0], device=weight.device)
            continue
        bn = model.get_submodule(layer.bn_name)
        gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
        scales[layer.name] = (gamma / torch.sqrt(bn.running_var + bn.eps)).abs()
    return {name: s.reshape(-1, *([1] * (model.get_submodule(name).weight.dim() - 1))) for name, s in scales.items()}


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
        weight = model.get_submodule(layer.name).weight
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
            model.get_submodule(name).weight.mul_(mask)

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
