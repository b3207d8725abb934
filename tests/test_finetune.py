"""Quantization-aware fine-tuning: removed channels stay removed, the recipe, the CLI and its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nets import BatchNormNet

from ajpq.analysis import analyze_model
from ajpq.artifact import build_artifact, read_artifact
from ajpq.checkpoint import load_checkpoint, save_checkpoint
from ajpq.cli import main
from ajpq.compress import SimulatedModel
from ajpq.data import load_dataset
from ajpq.errors import ConfigError
from ajpq.models import build_model
from ajpq.policy import Policy, validate_policy
from ajpq.qat import OPQ_RECIPE, QATModel, finetune, finetune_config
from ajpq.quant import quantize_activation_learned
from ajpq.train import TrainConfig, distillation_loss, evaluate_accuracy, lr_factor, seed_everything, train_model


def half_policy(analysis, bits: int = 3) -> Policy:
    policy = Policy.uniform(analysis, bits, 8)
    for group in analysis.groups:
        if not group.prunable:
            continue
        removed = group.order[group.size // 2 :]
        for member in group.members:
            layer_bits = np.full(group.size, bits)
            layer_bits[np.isin(analysis.out_root[member], removed)] = 0
            policy.layers[member].weight_bits = layer_bits
    return validate_policy(policy, analysis)


@pytest.fixture(scope="module")
def setup():
    digits = load_dataset("digits")
    generator = seed_everything(0)
    model = build_model("digits_cnn", digits.input_shape, digits.num_classes)
    train_model(model, digits.train, TrainConfig(epochs=4, lr=0.05, batch_size=64), generator=generator, progress=False)
    analysis = analyze_model(model, digits.input_shape, model_name="digits_cnn")
    calibration = next(digits.train.batches(256))[0]
    return digits, model.eval(), analysis, calibration


def test_config_defaults_are_the_opq_recipe() -> None:
    config = finetune_config()
    assert (config.lr, config.momentum, config.weight_decay) == (0.005, 0.9, 1e-4) == tuple(OPQ_RECIPE.values())
    assert finetune_config(lr=0.01, momentum=None).lr == 0.01
    with pytest.raises(ConfigError, match="lr must be > 0"):
        finetune_config(lr=-1.0)


def test_removed_channels_never_come_back(setup) -> None:
    digits, model, analysis, calibration = setup
    policy = half_policy(analysis)
    result = finetune(
        model, analysis, policy, digits.train, calibration, finetune_config(max_steps=6, batch_size=64), progress=False
    )
    tuned = result.model
    for layer in analysis.layers:
        removed = torch.from_numpy(policy.layers[layer.name].weight_bits == 0)
        module = tuned.get_submodule(layer.name)
        assert float(module.weight.detach()[removed].abs().sum()) == 0.0
        if module.bias is not None:
            assert float(module.bias.detach()[removed].abs().sum()) == 0.0
        if layer.bn_name:
            bn = tuned.get_submodule(layer.bn_name)
            assert float(bn.weight.detach()[removed].abs().sum()) == float(bn.bias.detach()[removed].abs().sum()) == 0.0
    # the weights reading removed inputs are zero too, and weights did change elsewhere
    removed_in = torch.from_numpy(policy.layers["conv1"].weight_bits == 0)
    assert float(tuned.conv2.weight.detach()[:, removed_in].abs().sum()) == 0.0
    assert not torch.equal(tuned.conv2.weight, model.conv2.weight)
    simulated = SimulatedModel(tuned, analysis, calibration).apply(policy)
    removed_out = torch.from_numpy(policy.layers["conv2"].weight_bits == 0)
    assert isinstance(simulated.bn2, torch.nn.Identity)
    assert float(simulated.conv2.bias.detach()[removed_out].abs().sum()) == 0.0  # folds to a zero bias


def test_forward_uses_quantized_weights_and_straight_through_gradient(setup) -> None:
    _, model, analysis, calibration = setup
    policy = half_policy(analysis, bits=2)
    qat = QATModel(model, analysis, policy, calibration)
    conv = qat.module.conv2
    levels = conv.weight.detach()
    kept = torch.from_numpy(policy.layers["conv2"].weight_bits > 0)
    per_channel = [torch.unique(levels[c].abs()).numel() for c in torch.nonzero(kept).flatten().tolist()]
    assert max(per_channel) <= 2  # 2 bits: codes -1, 0, 1 -> |w| in {0, scale}
    qat.module.train()
    loss = qat.module(calibration[:16]).sum()
    loss.backward()
    grad = conv.parametrizations.weight.original.grad
    assert float(grad[~kept].abs().sum()) == 0.0 and float(grad[kept].abs().sum()) > 0.0


def test_finetune_recovers_accuracy(setup) -> None:
    digits, model, analysis, calibration = setup
    policy = half_policy(analysis, bits=2)
    result = finetune(
        model,
        analysis,
        policy,
        digits.train,
        calibration,
        finetune_config(epochs=2, batch_size=64),
        val=digits.val,
        report={"val": digits.val},
        progress=False,
    )
    assert result.accuracy_after["val"] > result.accuracy_before["val"]
    assert len(result.history) == 2 and "val_accuracy" in result.history[0]
    assert set(result.activation_ranges) == {layer.name for layer in analysis.layers}  # learned by default
    simulated = SimulatedModel(result.model, analysis, calibration, activation_ranges=result.activation_ranges)
    assert evaluate_accuracy(simulated.apply(policy), digits.val) == pytest.approx(result.accuracy_after["val"])


def test_cli_finetune_then_export(setup, tmp_path: Path, capsys) -> None:
    _, model, analysis, _ = setup
    weights = tmp_path / "ref.pt"
    save_checkpoint(weights, model, {"model": "digits_cnn", "dataset": "digits"})
    policy_path = tmp_path / "policy.json"
    half_policy(analysis).save(policy_path)
    out = tmp_path / "tuned.pt"
    common = ["--dataset", "digits", "--device", "cpu"]
    argv = ["finetune", *common, "--weights", str(weights), "--policy", str(policy_path), "--out", str(out)]
    assert main([*argv, "--epochs", "1", "--max-steps", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["accuracy"]) == {"before", "after"} and set(report["accuracy"]["after"]) == {"val", "test"}
    assert list((tmp_path / "tuned_tb").glob("events.out.tfevents.*"))
    checkpoint = load_checkpoint(out)
    assert checkpoint["policy"]["format"] == "ajpq-policy" and checkpoint["model"] == "digits_cnn"
    artifact = tmp_path / "tuned.ajpq"
    assert main(["export-model", *common, "--weights", str(out), "--out", str(artifact), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["accuracy"]["test"] == pytest.approx(report["accuracy"]["after"]["test"])
    assert exported["max_abs_logit_diff"]["relative"] <= 1e-4


def test_cli_refuses_policy_of_another_model(setup, tmp_path: Path, capsys) -> None:
    digits, model, _, _ = setup
    weights = tmp_path / "ref.pt"
    save_checkpoint(weights, model, {"model": "digits_cnn", "dataset": "digits"})
    other = build_model("lenet300", digits.input_shape, digits.num_classes)
    policy_path = tmp_path / "other.json"
    Policy.uniform(analyze_model(other, digits.input_shape, model_name="lenet300"), 4).save(policy_path)
    for command in ("finetune", "export-model"):
        argv = [command, "--dataset", "digits", "--device", "cpu", "--weights", str(weights)]
        assert main([*argv, "--policy", str(policy_path), "--out", str(tmp_path / "x.out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "fingerprint" in err[0]


def test_weight_sparsity_mask_is_kept_through_fine_tuning(setup) -> None:
    digits, model, analysis, calibration = setup
    policy = half_policy(analysis, bits=4)
    policy.layers["fc1"].weight_sparsity = 0.6
    simulated = SimulatedModel(model, analysis, calibration)
    before = (simulated.apply(policy).fc1.weight != 0).clone()
    stored_before = int(before.sum())
    result = finetune(
        model, analysis, policy, digits.train, calibration, finetune_config(max_steps=6, batch_size=64), progress=False
    )
    tuned_fc1 = result.model.fc1.weight.detach()
    assert torch.count_nonzero(tuned_fc1[~before]) == 0  # pruned weights stay exactly zero
    assert not torch.equal(tuned_fc1[before], model.fc1.weight.detach()[before])  # the others trained
    after = SimulatedModel(result.model, analysis, calibration).apply(policy).fc1.weight != 0
    assert int(after.sum()) == stored_before and torch.equal(after, before)  # same mask, so same cost


# --- BatchNorm: fine-tuning trains the exported model -----------------------------------------------------------


@pytest.fixture(scope="module")
def bn_setup():
    digits = load_dataset("digits")
    generator = seed_everything(0)
    model = BatchNormNet()
    train_model(model, digits.train, TrainConfig(epochs=2, lr=0.05, batch_size=64), generator=generator, progress=False)
    with torch.no_grad():  # small and uneven BatchNorm scales make folding matter (fp16 scales of small weights)
        model.bn2.weight.mul_(torch.linspace(0.002, 1.0, 16))
    analysis = analyze_model(model, digits.input_shape, model_name="bn")
    calibration = next(digits.train.batches(256))[0]
    return digits, model.eval(), analysis, calibration


def test_qat_module_computes_the_simulated_model_on_batchnorm_nets(bn_setup) -> None:
    digits, model, analysis, calibration = bn_setup
    policy = half_policy(analysis, bits=2)
    qat = QATModel(model, analysis, policy, calibration)
    x = next(digits.val.batches(200))[0]
    with torch.no_grad():
        got = qat.module.eval()(x)
        expected = SimulatedModel(qat.fp32_model(), analysis, calibration).apply(policy)(x)
    span = float(expected.max() - expected.min())
    assert float((got - expected).abs().max()) <= 1e-4 * span


def _finetune_and_export(bn_setup, policy: Policy, learn_ranges: bool = False):
    """Two fine-tuning epochs of the BatchNorm net, then its artifact (with the learned ranges, if any)."""
    digits, model, analysis, calibration = bn_setup
    result = finetune(
        model,
        analysis,
        policy,
        digits.train,
        calibration,
        finetune_config(epochs=2, batch_size=64),
        val=digits.val,
        report={"val": digits.val},
        generator=seed_everything(0),
        progress=False,
        learn_ranges=learn_ranges,
    )
    artifact = build_artifact(
        result.model,
        analysis,
        policy,
        calibration,
        model_name="bn",
        input_shape=(1, 8, 8),
        num_classes=10,
        activation_ranges=result.activation_ranges,
    )
    return result, artifact


def test_finetuned_accuracy_is_the_exported_artifacts(bn_setup) -> None:
    digits, _, analysis, _ = bn_setup
    result, artifact = _finetune_and_export(bn_setup, half_policy(analysis, bits=2))
    exported = evaluate_accuracy(artifact.slim, digits.val)
    assert result.history[-1]["val_accuracy"] == result.accuracy_after["val"] == exported


# --- distillation and the short-run schedule ---------------------------------------------------------------------


def test_distillation_loss_by_hand() -> None:
    # Row 1: teacher softmax at T=2 of [2 ln 3, 0] is [3/4, 1/4], the student's of [0, 0] is [1/2, 1/2]:
    #   KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120; label 0: CE = ln 2.
    # Row 2: teacher = student, so KL = 0; label 1: CE = ln 2.
    # batch mean KL = 0.0654060; loss = 0.25 * 2^2 * 0.0654060 + 0.75 * ln 2 = 0.0654060 + 0.5198604 = 0.5852664.
    student = torch.zeros(2, 2)
    teacher = torch.tensor([[2 * np.log(3.0), 0.0], [0.0, 0.0]])
    targets = torch.tensor([0, 1])
    loss = distillation_loss(student, teacher, targets, temperature=2.0, alpha=0.25)
    assert float(loss) == pytest.approx(0.5852664, abs=1e-6)
    # alpha 0 is plain cross-entropy; alpha 1 and T 1 is the KL alone (row 1 only: 0.1308120 / 2)
    assert float(distillation_loss(student, teacher, targets, 3.0, 0.0)) == pytest.approx(np.log(2.0), abs=1e-6)
    assert float(distillation_loss(student, teacher / 2, targets, 1.0, 1.0)) == pytest.approx(0.0654060, abs=1e-6)


def test_warmup_then_cosine_schedule() -> None:
    factors = [lr_factor(step, 20, 4) for step in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[12] == pytest.approx(0.5) and factors[20] == pytest.approx(0.0)
    assert [lr_factor(step, 10, 0) for step in (0, 5)] == [1.0, pytest.approx(0.5)]  # no warm-up: cosine only
    with pytest.raises(ConfigError, match="distill_alpha must be in"):
        finetune_config(distill_alpha=1.5)


def test_finetune_distils_from_the_fp32_model_unless_told_not_to(setup) -> None:
    digits, model, analysis, calibration = setup
    policy = half_policy(analysis, bits=2)
    config = finetune_config(max_steps=4, batch_size=64)
    runs = {
        distill: finetune(
            model,
            analysis,
            policy,
            digits.train,
            calibration,
            config,
            generator=seed_everything(0),
            progress=False,
            distill=distill,
        )
        for distill in (True, False)
    }
    assert runs[True].history[0]["loss"] != runs[False].history[0]["loss"]  # a different objective was trained
    assert not torch.equal(runs[True].model.fc1.weight, runs[False].model.fc1.weight)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_gradient_clipping_bounds_a_training_step(clip: float | None) -> None:
    """The first SGD step (lr 1, Nesterov momentum 0.9, no decay) moves the weights by 1.9 x the (clipped) gradient."""
    from ajpq.data import TensorSplit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3))
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    data = TensorSplit(torch.randn(32, 1, 2, 3) * 10, torch.randint(0, 3, (32,)))
    config = TrainConfig(epochs=1, lr=1.0, momentum=0.9, weight_decay=0.0, batch_size=32, augment=False)
    config.max_grad_norm = clip
    config.max_steps = 1
    train_model(model, data, config, progress=False, generator=torch.Generator().manual_seed(0))
    moved = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm())
    if clip is None:
        assert moved > 1.9 * 0.5  # the raw gradient of this loss is larger than the clip below
    else:
        assert moved == pytest.approx(1.9 * clip, rel=1e-5)
    assert finetune_config().max_grad_norm == 5.0
    with pytest.raises(ConfigError, match="max_grad_norm must be > 0"):
        TrainConfig(max_grad_norm=0.0)


# --- learned activation ranges (LSQ) --------------------------------------------------------------------------------


def test_learned_activation_step_gradient_by_hand() -> None:
    """2-bit unsigned codes 0..3 with step 0.2: LSQ's step gradient is round(x/s) - x/s inside the range, the clipped
    code outside, times 1/sqrt(features * 3); the input gets the gradient only inside the range."""
    x = torch.tensor([[0.13, 0.35, 0.47, 2.0, -0.1]], requires_grad=True)
    step = torch.tensor(0.2, requires_grad=True)
    out = quantize_activation_learned(x, step, bits=2, signed=False)
    assert torch.allclose(out, torch.tensor([[0.2, 0.4, 0.4, 0.6, 0.0]]))
    out.sum().backward()
    # (1 - 0.65) + (2 - 1.75) + (2 - 2.35) + 3 (clipped high) + 0 (clipped low) = 3.25
    assert step.grad is not None and float(step.grad) == pytest.approx(3.25 / (5 * 3) ** 0.5, rel=1e-5)
    assert x.grad is not None and x.grad.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]


def test_learned_ranges_are_trained_and_travel_to_the_artifact(bn_setup) -> None:
    digits, model, analysis, calibration = bn_setup
    policy = half_policy(analysis, bits=2)
    for name in policy.layers:
        policy.layers[name].activation_bits = 3
    calibrated = dict(SimulatedModel(model, analysis, calibration).ranges)
    short = finetune_config(max_steps=2)
    plain = finetune(model, analysis, policy, digits.train, calibration, short, progress=False, learn_ranges=False)
    assert plain.activation_ranges == {}
    default = finetune(model, analysis, half_policy(analysis), digits.train, calibration, short, progress=False)
    assert set(default.activation_ranges) == {layer.name for layer in analysis.layers}  # learned, 8 bits too
    result, artifact = _finetune_and_export(bn_setup, policy, learn_ranges=True)
    ranges = result.activation_ranges
    assert set(ranges) == {layer.name for layer in analysis.layers}
    moved = [name for name in ranges if abs(ranges[name][0] - calibrated[name][0]) > 1e-3 * calibrated[name][0]]
    assert moved, (ranges, calibrated)  # trained, not the calibration of the starting weights
    assert dict(SimulatedModel(model, analysis, calibration).ranges) == calibrated  # the reference is untouched
    stored = {name: (spec["max_abs"], spec["signed"]) for name, spec in artifact.header["activations"].items()}
    assert stored == ranges
    exported = evaluate_accuracy(artifact.slim, digits.val)
    assert result.history[-1]["val_accuracy"] == result.accuracy_after["val"] == exported


def test_cli_learned_ranges_go_from_finetune_to_export_model(setup, tmp_path: Path, capsys) -> None:
    _, model, analysis, _ = setup
    weights = tmp_path / "ref.pt"
    save_checkpoint(weights, model, {"model": "digits_cnn", "dataset": "digits"})
    policy = half_policy(analysis)
    for name in policy.layers:
        policy.layers[name].activation_bits = 4
    policy_path = tmp_path / "policy.json"
    policy.save(policy_path)
    out = tmp_path / "tuned.pt"
    common = ["--dataset", "digits", "--device", "cpu"]
    argv = ["finetune", *common, "--weights", str(weights), "--policy", str(policy_path), "--out", str(out)]
    assert main([*argv, "--epochs", "1", "--max-steps", "20", "--learn-ranges", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    checkpoint = load_checkpoint(out)
    learned = checkpoint["activation_ranges"]
    assert set(learned) == set(policy.layers) and all(entry["bits"] == 4 for entry in learned.values())
    artifact = tmp_path / "tuned.ajpq"
    assert main(["export-model", *common, "--weights", str(out), "--out", str(artifact), "--json"]) == 0
    captured = capsys.readouterr()
    exported = json.loads(captured.out)
    assert f"using the activation ranges {out} learned for {len(learned)} layers" in captured.err
    assert exported["accuracy"]["test"] == pytest.approx(report["accuracy"]["after"]["test"])
    header = read_artifact(artifact).header["activations"]
    assert {name: spec["max_abs"] for name, spec in header.items()} == {
        name: entry["max_abs"] for name, entry in learned.items()
    }

    for flag, learned_expected in (([], True), (["--no-learn-ranges"], False)):  # learned by default
        path = tmp_path / f"tuned{len(flag)}.pt"
        assert main([*argv[:-1], str(path), "--epochs", "1", "--max-steps", "5", *flag]) == 0
        checkpoint = load_checkpoint(path)
        assert ("activation_ranges" in checkpoint) is learned_expected
        assert checkpoint["finetune"]["learn_ranges"] is learned_expected
    capsys.readouterr()

    other = half_policy(analysis)  # 8-bit activations: the ranges learned for 4 bits do not apply
    other_path = tmp_path / "other.json"
    other.save(other_path)
    again = ["export-model", *common, "--weights", str(out), "--policy", str(other_path)]
    assert main([*again, "--out", str(tmp_path / "other.ajpq"), "--json"]) == 0
    assert "for other activation bits; calibrating those" in capsys.readouterr().err

    broken = tmp_path / "broken.pt"
    checkpoint["activation_ranges"] = {"fc1": {"bits": 4, "max_abs": -1.0, "signed": False}}
    torch.save(checkpoint, broken)
    assert main(["export-model", *common, "--weights", str(broken), "--out", str(tmp_path / "b.ajpq")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert 'activation_ranges["fc1"] is not a learned range (bits, a finite max_abs > 0, signed)' in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "b.ajpq").exists()
