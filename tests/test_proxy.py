"""The search's scorer: BatchNorm re-estimation of the candidate only, QAT steps, and their options."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from nets import ResidualDepthwiseNet, randomize_batchnorm
from torch import nn

from ajpq.analysis import analyze_model
from ajpq.compress import ActivationQuantizer, SimulatedModel
from ajpq.data import DataSplits, TensorSplit, load_dataset
from ajpq.errors import ConfigError
from ajpq.models import build_model
from ajpq.policy import Policy, validate_policy
from ajpq.proxy import ProxyOptions, make_evaluator, reestimate_batchnorm, reestimation_batches
from ajpq.train import TrainConfig, evaluate_accuracy, seed_everything, train_model
from ajpq.workspace import Workspace


def pruned_policy(analysis, bits: int = 3, fraction: float = 0.5) -> Policy:
    """``bits`` everywhere, the least important ``fraction`` of every prunable group removed."""
    policy = Policy.uniform(analysis, bits, 8)
    for group in analysis.groups:
        if not group.prunable:
            continue
        removed = group.order[group.size - int(group.size * fraction) :]
        for member in group.members:
            layer_bits = np.full(group.size, bits)
            layer_bits[np.isin(analysis.out_root[member], removed)] = 0
            policy.layers[member].weight_bits = layer_bits
    return validate_policy(policy, analysis)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def tiny() -> Workspace:
    """ResidualDepthwiseNet (three folded BatchNorms, a residual sum) labelled by its own FP32 predictions."""
    torch.manual_seed(0)
    model = randomize_batchnorm(ResidualDepthwiseNet())
    generator = torch.Generator().manual_seed(1)

    def split(n: int) -> TensorSplit:
        x = torch.randn(n, 1, 4, 4, generator=generator) + 0.3
        with torch.no_grad():
            y = model(x).argmax(dim=1)
        return TensorSplit(x, y)

    splits = DataSplits("tiny", split(400), split(300), split(50), (1, 4, 4), 3, 0)
    analysis = analyze_model(model, (1, 4, 4))
    return Workspace("tiny", splits, model, analysis, torch.device("cpu"))


def test_options_are_validated_with_clear_messages() -> None:
    with pytest.raises(ConfigError, match=r"^bn_batches must be an integer >= 0, but got -1$"):
        ProxyOptions(bn_batches=-1)
    with pytest.raises(ConfigError, match=r"^finetune_steps must be an integer >= 0, but got 2.5$"):
        ProxyOptions(finetune_steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^bn_batches must be an integer >= 0, but got True$"):
        ProxyOptions(bn_batches=True)
    with pytest.raises(ConfigError, match=r"^bn_batch_size must be an integer >= 2, but got 1$"):
        ProxyOptions(bn_batch_size=1)
    assert ProxyOptions(finetune_steps=20, bn_batches=4).describe() == "qat20+bn4"
    assert ProxyOptions().describe() == "plain"


def test_bn_reestimation_equals_pytorch_adaptive_batchnorm_on_the_unfolded_candidate(tiny: Workspace) -> None:
    """Direct computation: unfold the candidate's quantized weights by hand, let PyTorch's BatchNorm re-estimate its
    statistics (momentum None, training mode) on the same batches, and compare logits and score."""
    analysis, model = tiny.analysis, tiny.model
    policy = pruned_policy(analysis)
    calibration = tiny.calibration_images()
    simulated = SimulatedModel(model, analysis, calibration)
    module: Any = simulated.apply(policy)
    folded = {
        layer.name: (module.get_submodule(layer.name).weight.clone(), module.get_submodule(layer.name).bias.clone())
        for layer in analysis.layers
    }
    batches = reestimation_batches(tiny.splits.train, 3, 64, seed=0, device=torch.device("cpu"))

    unfolded = copy.deepcopy(model)
    for layer in analysis.layers:
        conv: Any = unfolded.get_submodule(layer.name)
        weight, bias = folded[layer.name]
        kept = torch.from_numpy(policy.layers[layer.name].weight_bits > 0)
        if layer.bn_name is None:
            conv.weight.data.copy_(weight)
            conv.bias.data.copy_(bias)
        else:
            bn: Any = unfolded.get_submodule(layer.bn_name)
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            safe = torch.where(kept, s, torch.ones_like(s)).detach()
            conv.weight = nn.Parameter(weight / safe.reshape(-1, 1, 1, 1) * kept.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter(((bias - bn.bias) / safe + bn.running_mean) * kept)
            bn.weight.data.mul_(kept)  # a removed channel's BatchNorm affine is zero, as QAT keeps it
            bn.bias.data.mul_(kept)
            bn.reset_running_stats()
            bn.momentum = None
        bits = policy.layers[layer.name].activation_bits
        max_abs, signed = simulated.ranges[layer.name]
        conv.register_forward_pre_hook(ActivationQuantizer(max_abs, signed, bits))
    unfolded.eval()
    with torch.no_grad():
        for module in unfolded.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.train()
        for x in batches:
            unfolded(x)
    unfolded.eval()

    module = reestimate_batchnorm(simulated, model, analysis, batches)
    x = next(tiny.splits.val.batches(len(tiny.splits.val)))[0]
    with torch.no_grad():
        expected, got, before = unfolded(x), module(x), simulated.apply(policy)(x)
    assert not torch.allclose(expected, before, atol=1e-2)  # re-estimation really changes the candidate
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    score = make_evaluator(tiny, ProxyOptions(bn_batches=3, bn_batch_size=64))(policy)
    assert score == evaluate_accuracy(unfolded, tiny.splits.val)
    assert score != evaluate_accuracy(simulated.apply(policy), tiny.splits.val)


def test_bn_reestimation_changes_only_the_candidate(tiny: Workspace) -> None:
    reference = state(tiny.model)
    simulated = tiny.simulated
    simulated_state = state(simulated.module)
    reference_weights = {k: v.clone() for k, v in simulated.reference_weights().items()}
    policy = pruned_policy(tiny.analysis)
    plain = make_evaluator(tiny)
    plain_before = plain(policy)
    evaluate = make_evaluator(tiny, ProxyOptions(bn_batches=4, bn_batch_size=32))
    first = evaluate(policy)
    assert evaluate(Policy.uniform(tiny.analysis, 8, 8)) > 0.9
    assert evaluate(policy) == first  # the next candidate starts from the reference statistics again
    assert first != plain_before
    for key, value in state(tiny.model).items():
        assert torch.equal(value, reference[key]), key
    simulated.apply(Policy.uniform(tiny.analysis, 8, 8))
    for name, weight in simulated.reference_weights().items():
        assert torch.equal(weight, reference_weights[name]), name
    assert set(state(simulated.module)) == set(simulated_state)
    assert plain(policy) == plain_before


def test_bn_reestimation_is_a_no_op_without_batchnorm(tiny: Workspace) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()
    analysis = analyze_model(model, (1, 4, 4))
    workspace = Workspace("plain", tiny.splits, model, analysis, torch.device("cpu"))
    policy = pruned_policy(analysis)
    assert make_evaluator(workspace, ProxyOptions(bn_batches=4))(policy) == make_evaluator(workspace)(policy)


@pytest.fixture(scope="module")
def digits_workspace() -> Workspace:
    digits = load_dataset("digits")
    generator = seed_everything(0)
    model = build_model("digits_cnn", digits.input_shape, digits.num_classes)
    train_model(model, digits.train, TrainConfig(epochs=3, lr=0.05, batch_size=64), generator=generator, progress=False)
    analysis = analyze_model(model.eval(), digits.input_shape, model_name="digits_cnn")
    return Workspace("digits_cnn", digits, model, analysis, torch.device("cpu"))


def test_qat_steps_proxy_is_deterministic_and_leaves_the_workspace_unchanged(digits_workspace: Workspace) -> None:
    workspace = digits_workspace
    reference = state(workspace.model)
    policy = pruned_policy(workspace.analysis, bits=2, fraction=0.5)
    plain = make_evaluator(workspace)(policy)
    evaluate = make_evaluator(workspace, ProxyOptions(finetune_steps=8, seed=3))
    torch.manual_seed(123)
    first = evaluate(policy)
    after_first = torch.rand(1)
    torch.manual_seed(123)
    assert evaluate(policy) == first
    assert torch.equal(torch.rand(1), after_first)  # the proxy leaves torch's global generator as it found it
    assert make_evaluator(workspace, ProxyOptions(finetune_steps=8, seed=3))(policy) == first
    assert first > plain  # 8 QAT steps recover some of what 2 bits and half the channels cost
    for key, value in state(workspace.model).items():
        assert torch.equal(value, reference[key]), key
    assert make_evaluator(workspace)(policy) == plain


def test_qat_proxy_trains_with_the_calibrated_ranges_it_scores_with(
    digits_workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The candidate is scored with calibrated activation ranges, so its QAT steps must train with them too, whatever
    ``finetune``'s default (learned ranges since they recover collapsed policies): a proxy that trained learned ranges
    and then threw them away scored every candidate differently from the search the README measured."""
    import ajpq.qat
    from ajpq.proxy import qat_steps

    workspace = digits_workspace
    policy = pruned_policy(workspace.analysis, bits=2, fraction=0.5)
    options = ProxyOptions(finetune_steps=6, seed=2)
    calibration = workspace.calibration_images()
    proxy = state(qat_steps(workspace, policy, calibration, options))
    original = ajpq.qat.finetune

    def forced(learn_ranges: bool) -> dict[str, torch.Tensor]:
        """The same QAT steps with ``learn_ranges`` imposed on the proxy's own call of ``finetune``."""
        monkeypatch.setattr(
            ajpq.qat,
            "finetune",
            lambda *args, **kwargs: original(*args, **{**kwargs, "learn_ranges": learn_ranges}),
        )
        return state(qat_steps(workspace, policy, calibration, options))

    calibrated, learned = forced(False), forced(True)
    assert all(torch.equal(proxy[k], calibrated[k]) for k in proxy)
    assert not all(torch.equal(proxy[k], learned[k]) for k in proxy)  # the setting matters here


def test_qat_proxy_trains_on_one_thread_whatever_the_callers_count(
    digits_workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gradient sums depend on the thread count, enough to move a LeNet-5 score by an image: the QAT steps run on
    QAT_CPU_THREADS threads in every backend, and the caller's count comes back afterwards."""
    import ajpq.qat
    from ajpq.proxy import QAT_CPU_THREADS

    seen: list[int] = []
    original = ajpq.qat.finetune

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(ajpq.qat, "finetune", recording)
    policy = pruned_policy(digits_workspace.analysis, bits=2, fraction=0.5)
    evaluate = make_evaluator(digits_workspace, ProxyOptions(finetune_steps=4))
    before = torch.get_num_threads()
    try:
        scores = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            scores.append(evaluate(policy))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert seen == [QAT_CPU_THREADS, QAT_CPU_THREADS] and QAT_CPU_THREADS == 1
    assert scores[0] == scores[1]


def test_search_scores_with_the_configured_proxy(tmp_path, capsys) -> None:
    from ajpq.cli import main
    from ajpq.policy import load_policy
    from ajpq.workspace import WorkspaceSpec, open_workspace

    assert main(["search", "--proxy-bn-batches", "-2"]) == 2
    assert "proxy_bn_batches must be an integer >= 0, but got -2" in capsys.readouterr().err
    run = tmp_path / "run"
    argv = ["search", "--episodes", "2", "--warmup-episodes", "2", "--proxy-bn-batches", "2", "--seed", "4"]
    argv.append("--no-warm-start")  # random episodes: policies that the re-estimation visibly changes
    assert main([*argv, "--run-dir", str(run), "--no-progress", "--json"]) == 0
    assert "proxy_bn_batches: 2" in (run / "config.yaml").read_text()
    workspace = open_workspace(WorkspaceSpec(), progress=False)
    best = load_policy(run / "best_policy.json", workspace.analysis)
    score = make_evaluator(workspace, ProxyOptions(bn_batches=2, seed=4))(best)
    assert best.metrics["accuracy"] == pytest.approx(score, abs=1e-8)  # policy files round metrics to 8 digits
    assert score != make_evaluator(workspace)(best)
