"""How a search scores a candidate policy: the *proxy* for the accuracy the user gets after fine-tuning.

Every search method and every evaluation backend builds its scorer here, from a workspace and a frozen
:class:`ProxyOptions` (picklable, so worker processes and Ray actors rebuild the same scorer). A candidate's score is
the validation accuracy of its simulated compressed model (:class:`~ajpq.compress.SimulatedModel`), after two
optional recovery steps that make the score rank candidates as fine-tuning will:

- ``finetune_steps`` K > 0: K steps of the quantization-aware fine-tuning of ``ajpq finetune``
  (:func:`ajpq.qat.finetune`, the OPQ recipe with its cosine schedule over K steps) on the compressed model,
  same seed and data order for every candidate; the candidate is then simulated from the fine-tuned weights.
- ``bn_batches`` B > 0 (adaptive BatchNorm, EagleEye, ECCV 2020): the statistics of every folded BatchNorm are
  re-estimated on B training batches run through the *compressed* candidate (quantized weights and activations), then
  folded again. Pruning and quantization shift each channel's pre-BN mean and variance; the reference's statistics no
  longer normalize them, and fine-tuning (which trains with batch statistics) repairs exactly that first.

The re-estimation works on the folded layer: with the reference fold ``y = s (z - mu) + beta``, ``s = gamma /
sqrt(var + eps)``, the candidate's layer output ``y_c`` implies ``z_c = (y_c - beta) / s + mu``, and BatchNorm with
``z_c``'s own statistics gives ``y' = |gamma| (y_c - m) / sqrt(v + eps s^2) + beta`` with ``m``, ``v`` the mean and
variance of ``y_c`` per channel: a per-channel affine map folded into the candidate's quantized weight (a per-channel
rescale keeps it on the same quantization grid) and bias. Removed channels stay exactly zero. Only the scorer's own
simulated model changes; the workspace's model and simulated model are never touched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ajpq.analysis import ModelAnalysis
from ajpq.compress import SimulatedModel
from ajpq.config import check_int
from ajpq.data import Split
from ajpq.errors import ConfigError
from ajpq.policy import Policy
from ajpq.train import cpu_threads
from ajpq.workspace import Workspace

Evaluator = Callable[[Policy], float]
"""A complete, validated policy -> its search score (a validation accuracy in [0, 1])."""


@dataclass(frozen=True)
class ProxyOptions:
    """What a candidate's score is (the same for every candidate of a search)."""

    finetune_steps: int = 0
    """Steps of quantization-aware fine-tuning (as ``ajpq finetune``) before the candidate is scored (0: none)."""
    bn_batches: int = 0
    """Training batches on which the candidate's BatchNorm statistics are re-estimated before scoring (0: none)."""
    bn_batch_size: int = 128
    """Images per BatchNorm re-estimation batch."""
    seed: int = 0
    """Seed of the fine-tuning and re-estimation data (the same for every candidate, so scores are comparable)."""

    def __post_init__(self) -> None:
        for name, low in (("finetune_steps", 0), ("bn_batches", 0), ("bn_batch_size", 2), ("seed", 0)):
            check_int(name, getattr(self, name), low)

    def describe(self) -> str:
        """A short name of the proxy, e.g. ``plain``, ``bn8``, ``qat50+bn8``."""
        parts = []
        if self.finetune_steps:
            parts.append(f"qat{self.finetune_steps}")
        if self.bn_batches:
            parts.append(f"bn{self.bn_batches}")
        return "+".join(parts) or "plain"


def reestimation_batches(
    train: Split, count: int, batch_size: int, seed: int, device: torch.device
) -> list[torch.Tensor]:
    """``count`` shuffled training batches (images only, no augmentation), the same for a seed; reshuffled epochs
    when the split is smaller than ``count * batch_size``."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    while len(batches) < count:
        before = len(batches)
        for x, _ in train.batches(batch_size, shuffle=True, generator=generator, device=device):
            if len(batches) == count:
                break
            if len(x) >= 2:
                batches.append(x)
        if len(batches) == before:
            raise ConfigError(f"the training split has too few images for BatchNorm re-estimation ({len(train)})")
    return batches


@torch.no_grad()
def reestimate_batchnorm(
    simulated: SimulatedModel, source: nn.Module, analysis: ModelAnalysis, batches: list[torch.Tensor]
) -> nn.Module:
    """Re-estimate the folded BatchNorms of ``simulated``'s current candidate on ``batches`` and fold them in.

    Args:
        simulated: A simulated model with the candidate's policy applied (its module is changed in place; the next
            :meth:`~ajpq.compress.SimulatedModel.apply` restores it from the reference weights).
        source: The unfolded model ``simulated`` was built from (its BatchNorms' ``gamma``, ``beta``, statistics).
        analysis: The model's analysis (which layer folds which BatchNorm).
        batches: Training images; statistics are averaged over batches as PyTorch's BatchNorm does with
            ``momentum=None`` (mean of batch means, mean of unbiased batch variances), and each batch is normalized
            with its own (biased) statistics while they are gathered, as in training mode.

    Returns:
        The simulated module, re-normalized.
    """
    module = simulated.module
    policy = simulated.policy
    assert policy is not None, "apply a policy before re-estimating its BatchNorms"
    folds: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for layer in analysis.layers:
        if layer.bn_name is None:
            continue
        bn = source.get_submodule(layer.bn_name)
        assert isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d)
        ones = torch.ones(layer.out_channels)
        var = bn.running_var.detach().float().cpu() if bn.running_var is not None else ones
        gamma = bn.weight.detach().float().cpu() if bn.weight is not None else ones
        beta = bn.bias.detach().float().cpu() if bn.bias is not None else torch.zeros(layer.out_channels)
        eps_s2 = bn.eps * gamma.square() / (var + bn.eps)
        kept = torch.from_numpy(policy.layers[layer.name].weight_bits > 0)
        device = simulated.device
        folds[layer.name] = (gamma.abs().to(device), beta.to(device), eps_s2.to(device), kept.to(device))
    if not folds:
        return module
    sums: dict[str, list[torch.Tensor]] = {name: [] for name in folds}

    def renormalize(name: str, y: torch.Tensor) -> torch.Tensor:
        gamma_abs, beta, eps_s2, kept = folds[name]
        dims = [0, *range(2, y.dim())]
        mean = y.mean(dim=dims)
        biased = y.var(dim=dims, unbiased=False)
        count = y.numel() // y.shape[1]
        sums[name].append(torch.stack([mean, biased * count / max(count - 1, 1)]))
        gain, shift = _affine(gamma_abs, beta, eps_s2, kept, mean, biased)
        shape = (1, -1, *([1] * (y.dim() - 2)))
        return y * gain.reshape(shape) + shift.reshape(shape)

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]:
        return lambda _module, _args, y: renormalize(name, y)

    handles = [module.get_submodule(name).register_forward_hook(hook(name)) for name in folds]
    try:
        for x in batches:
            module(x)
    finally:
        for handle in handles:
            handle.remove()
    for name, (gamma_abs, beta, eps_s2, kept) in folds.items():
        mean, var = torch.stack(sums[name]).mean(dim=0)
        gain, shift = _affine(gamma_abs, beta, eps_s2, kept, mean, var)
        layer_module = module.get_submodule(name)
        assert isinstance(layer_module, nn.Conv2d | nn.Linear) and layer_module.bias is not None
        weight = layer_module.weight
        weight.mul_(gain.reshape(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
        layer_module.bias.copy_(layer_module.bias * gain + shift)
    return module


def _affine(
    gamma_abs: torch.Tensor,
    beta: torch.Tensor,
    eps_s2: torch.Tensor,
    kept: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y' = gain * y + shift`` per channel: BatchNorm with statistics ``mean``/``var`` of the folded output ``y``
    (identity for removed channels, which stay zero)."""
    denominator = torch.sqrt(var + eps_s2)
    gain = torch.where(gamma_abs > 0, gamma_abs / denominator.clamp_min(torch.finfo(var.dtype).tiny), 0.0)
    shift = beta - gain * mean
    return torch.where(kept, gain, 1.0), torch.where(kept, shift, 0.0)


def make_evaluator(workspace: Workspace, options: ProxyOptions | None = None) -> Evaluator:
    """The scorer of candidate policies on ``workspace``'s validation split under ``options``."""
    options = options or ProxyOptions()
    device = workspace.device
    analysis = workspace.analysis
    has_batchnorm = any(layer.bn_name for layer in analysis.layers)
    if not options.finetune_steps and not (options.bn_batches and has_batchnorm):

        def evaluate(policy: Policy) -> float:
            return workspace.val_score(workspace.simulated.apply(policy))

        return evaluate
    calibration = workspace.calibration_images()
    batches = (
        reestimation_batches(workspace.splits.train, options.bn_batches, options.bn_batch_size, options.seed, device)
        if options.bn_batches and has_batchnorm
        else []
    )
    own: list[SimulatedModel] = []  # the scorer's private simulated model of the reference (built on first use)

    def evaluate_with_recovery(policy: Policy) -> float:
        if options.finetune_steps:
            source = qat_steps(workspace, policy, calibration, options)
            simulated = SimulatedModel(source, analysis, calibration, device)
        else:
            source = workspace.model
            if not own:
                own.append(SimulatedModel(source, analysis, calibration, device))
            simulated = own[0]
        module = simulated.apply(policy)
        if batches:
            module = reestimate_batchnorm(simulated, source, analysis, batches)
        return workspace.val_score(module)

    return evaluate_with_recovery


QAT_CPU_THREADS = 1
"""CPU threads of the QAT proxy's training steps, the same in every backend. Training sums its gradients in an order
that depends on the thread count, and ten steps are enough for that rounding to move a validation image across the
decision boundary (LeNet-5/Fashion-MNIST: 0.9115 with 2 threads, 0.911 with 1, for the same policy), so a
search on ``--backend local`` and one on two 1-thread workers would part ways. One thread: the worker processes'
count, and the score is a function of the policy and the seed alone."""


def qat_steps(workspace: Workspace, policy: Policy, calibration: torch.Tensor, options: ProxyOptions) -> nn.Module:
    """The FP32 weights after ``options.finetune_steps`` steps of ``ajpq finetune``'s QAT of ``policy``.

    Seeded from ``options.seed`` (data order, augmentation and torch's global generator, e.g. dropout, whose state is
    restored afterwards) and run on :data:`QAT_CPU_THREADS` CPU threads, so every candidate sees the same batches and
    a score repeats in any backend; the workspace's model is not changed.
    """
    from ajpq.qat import finetune, finetune_config

    devices = [workspace.device.index or 0] if workspace.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), cpu_threads(QAT_CPU_THREADS, workspace.device):
        torch.manual_seed(options.seed)
        result = finetune(
            workspace.model,
            workspace.analysis,
            policy,
            workspace.splits.train,
            calibration,
            finetune_config(max_steps=options.finetune_steps),
            device=workspace.device,
            generator=torch.Generator().manual_seed(options.seed),
            progress=False,
            learn_ranges=False,  # the candidate is scored with calibrated ranges; learned ones would be thrown away
        )
    return result.model


__all__ = [
    "Evaluator",
    "ProxyOptions",
    "make_evaluator",
    "qat_steps",
    "reestimate_batchnorm",
    "reestimation_batches",
]
