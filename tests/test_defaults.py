"""Commands given a checkpoint or a run work on what it records: no silent switch of dataset, split or weights."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

from ajpq.analysis import analyze_model
from ajpq.checkpoint import load_checkpoint, save_checkpoint
from ajpq.cli import main
from ajpq.data import DEBIAN_FASHION_MNIST, load_dataset
from ajpq.models import build_model
from ajpq.policy import Policy, validate_policy
from ajpq.train import TrainConfig, seed_everything, train_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits_cnn trained on digits split 3 with 200 validation images, saved as `ajpq pretrain` would."""
    digits = load_dataset("digits", split_seed=3, val_size=200)
    generator = seed_everything(0)
    model = build_model("digits_cnn", digits.input_shape, digits.num_classes)
    train_model(model, digits.train, TrainConfig(epochs=4, lr=0.05, batch_size=64), generator=generator, progress=False)
    path = tmp_path_factory.mktemp("weights") / "split3.pt"
    save_checkpoint(path, model, {"model": "digits_cnn", "dataset": "digits", "split_seed": 3, "val_size": 200})
    return path


def search_flags(run: Path) -> list[str]:
    return ["--episodes", "4", "--episodes-per-update", "2", "--checkpoint-every", "4", "--run-dir", str(run)]


def test_search_takes_the_data_its_weights_were_trained_on(trained: Path, tmp_path: Path, capsys) -> None:
    """Before: the search ignored the checkpoint's split and scored it on validation images it was trained on."""
    run = tmp_path / "run"
    assert main(["search", "--weights", str(trained), *search_flags(run), "--no-progress", "--json"]) == 0
    err = capsys.readouterr().err
    config = yaml.safe_load((run / "config.yaml").read_text())["default"]
    assert (config["dataset"], config["split_seed"], config["val_size"], config["weights"]) == (
        "digits",
        3,
        200,
        str(trained),
    )
    assert f"--split-seed 3 (from {trained})" in err and f"--val-size 200 (from {trained})" in err

    code = main(["search", "--weights", str(trained), "--split-seed", "1", *search_flags(tmp_path / "r2")])
    assert code == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert message[-1:] == [
        f"ajpq search: error: {trained} contradicts --split-seed 1 (the checkpoint records 3); drop those flags to "
        "use the checkpoint's, or give other weights"
    ]
    assert not (tmp_path / "r2").exists()


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs apt-get install dataset-fashion-mnist")
def test_search_with_fashion_mnist_weights_searches_fashion_mnist(tmp_path: Path, capsys) -> None:
    """The reported case: weights pretrained on Fashion-MNIST were searched on digits (FP32 val accuracy 0.083)."""
    weights = tmp_path / "fm.pt"
    model = build_model("digits_cnn", (1, 28, 28), 10)
    meta = {"model": "digits_cnn", "dataset": "fashion-mnist", "split_seed": 0, "val_size": 100}
    save_checkpoint(weights, model, meta)
    run = tmp_path / "run"
    assert main(["search", "--weights", str(weights), *search_flags(run), "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] == str(run)
    config = yaml.safe_load((run / "config.yaml").read_text())["default"]
    assert (config["dataset"], config["val_size"]) == ("fashion-mnist", 100)
    assert json.loads((run / "run.json").read_text())["dataset"] == "fashion-mnist"


def test_the_next_commands_a_search_prints_work_on_the_searched_weights(
    trained: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the printed finetune command dropped --weights, --split-seed and --val-size, so copying it
    fine-tuned the cached reference on another split."""
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--weights", str(trained), *search_flags(tmp_path / "run"), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    finetune = next(line.strip() for line in lines if line.strip().startswith("ajpq finetune"))
    export = next(line.strip() for line in lines if line.strip().startswith("ajpq export-model"))
    assert f"--weights {trained}" in finetune and "--split-seed 3 --val-size 200" in finetune
    assert "--weights finetuned.pt" in export and "--split-seed 3 --val-size 200" in export

    assert main([*shlex.split(finetune)[1:], "--epochs", "1", "--max-steps", "2", "--json"]) == 0
    tuned = load_checkpoint(tmp_path / "finetuned.pt")
    assert tuned["finetune"]["from_weights"] == str(trained)
    assert (tuned["split_seed"], tuned["val_size"]) == (3, 200)
    assert main([*shlex.split(export)[1:], "--json"]) == 0
    assert (tmp_path / "model.ajpq").is_file()


def four_bit_policy(path: Path) -> Policy:
    """Half of every prunable group removed, 3-bit weights, 4-bit activations (learned ranges matter there)."""
    model = build_model("digits_cnn", (1, 8, 8), 10)
    analysis = analyze_model(model, (1, 8, 8), model_name="digits_cnn")
    policy = Policy.uniform(analysis, 3, 4)
    for group in analysis.groups:
        if group.prunable:
            for member in group.members:
                bits = np.full(group.size, 3)
                bits[np.isin(analysis.out_root[member], group.order[group.size // 2 :])] = 0
                policy.layers[member].weight_bits = bits
    policy = validate_policy(policy, analysis)
    policy.save(path)
    return policy


def test_evaluate_reports_the_fine_tuned_model_the_artifact_holds(trained: Path, tmp_path: Path, capsys) -> None:
    """One model, one number: `evaluate --weights tuned.pt` (with or without --policy), fine-tuning's "after" and
    the exported artifact agree. Before: evaluate calibrated the activation ranges fine-tuning had learned."""
    four_bit_policy(tmp_path / "p.json")
    tuned = tmp_path / "tuned.pt"
    argv = ["--weights", str(trained), "--policy", str(tmp_path / "p.json"), "--out", str(tuned)]
    assert main(["finetune", *argv, "--epochs", "1", "--max-steps", "30", "--json"]) == 0
    after = json.loads(capsys.readouterr().out)["accuracy"]["after"]
    assert load_checkpoint(tuned)["activation_ranges"]

    for policy_flag in (["--policy", str(tmp_path / "p.json")], []):
        assert main(["evaluate", "--weights", str(tuned), *policy_flag, "--split", "test", "--json"]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["accuracy"] == after["test"]
        assert f"using the activation ranges {tuned} learned for 5 layers" in captured.err
    assert "using the policy embedded in" in captured.err

    assert main(["export-model", "--weights", str(tuned), "--out", str(tmp_path / "m.ajpq"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"]["test"] == after["test"]
