"""The command line end to end on the embedded digits data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ajpq.cli import main
from ajpq.models import build_model
from ajpq.policy import Policy


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a subprocess (exit codes and stream separation as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "ajpq.cli", *args], capture_output=True, text=True, env=dict(os.environ), timeout=300
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    assert main(["pretrain", "--epochs", "8", "--out", str(out), "--json"]) == 0
    return out


def test_inspect_json_has_layers_groups_and_reference(capsys):
    assert main(["inspect", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "digits_cnn" and len(report["fingerprint"]) == 16
    assert [layer["name"] for layer in report["layers"]] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert set(report["layers"][0]) >= {
        "name",
        "type",
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "groups",
        "out_hw",
        "params",
        "macs",
        "group",
    }
    assert report["layers"][1]["macs"] == 32 * 16 * 9 * 64
    assert report["reference"]["size_bits"] == 1_520_960 and report["reference"]["bops"] == 484_992 * 1024


def test_pretrain_records_model_data_and_accuracy(checkpoint, capsys):
    data = torch.load(checkpoint, weights_only=True)
    assert data["model"] == "digits_cnn" and data["dataset"] == "digits" and data["split_seed"] == 0
    assert data["accuracy"]["val"] > 0.85 and data["accuracy"]["test"] > 0.85
    model = build_model("digits_cnn", (1, 8, 8), 10)
    model.load_state_dict(data["state_dict"])


def test_evaluate_fp32_and_policy_json(checkpoint, tmp_path, capsys):
    assert main(["evaluate", "--weights", str(checkpoint), "--json"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert fp32["size_ratio"] == 1.0 and fp32["accuracy"] > 0.85
    assert main(["inspect", "--write-policy", str(tmp_path / "p.json"), "--json"]) == 0
    capsys.readouterr()
    template = json.loads((tmp_path / "p.json").read_text())
    for layer in template["layers"]:
        if layer["name"] != "fc2":
            layer["weight_bits"] = [4] * len(layer["weight_bits"])
    (tmp_path / "p.json").write_text(json.dumps(template))
    assert main(["evaluate", "--weights", str(checkpoint), "--policy", str(tmp_path / "p.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {
        "accuracy",
        "size_bits",
        "size_ratio",
        "compression_rate",
        "bops",
        "bops_ratio",
        "reference_size_bits",
        "reference_bops",
    }
    assert report["size_ratio"] < 0.25 and report["compression_rate"] == pytest.approx(1 / report["size_ratio"])
    assert report["accuracy"] > 0.8 and abs(report["accuracy"] - fp32["accuracy"]) < 0.1


def test_cli_json_alone_on_stdout_and_auto_pretrain_message():
    result = run_cli("evaluate", "--json", "--split", "val")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["accuracy"] > 0.85  # stdout is exactly one JSON document
    assert "FP32 reference" in result.stderr  # says it pretrained (or used the cached reference)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "--model", "lenet6"], "unknown model 'lenet6'"),
        (["inspect", "--dataset", "mnits", "--data-dir", "/nonexistent"], "did you mean 'mnist'"),
        (["evaluate", "--weights", "/nonexistent/w.pt"], "weights file /nonexistent/w.pt does not exist"),
        (["evaluate", "--policy", "/nonexistent/p.json"], "policy file /nonexistent/p.json does not exist"),
        (["evaluate", "--split", "train"], "invalid choice: 'train'"),
        (["evaluate", "--device", "tpu"], "device must be cpu, cuda or auto"),
    ],
)
def test_bad_input_is_one_message_and_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_debug_shows_the_traceback():
    result = run_cli("evaluate", "--policy", "/nonexistent/p.json", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "PolicyError" in result.stderr


def test_mismatched_weights_are_refused(tmp_path, checkpoint):
    result = run_cli("evaluate", "--model", "lenet300", "--weights", str(checkpoint))
    assert (
        result.returncode == 2 and "contradicts --model lenet300 (the checkpoint records digits_cnn)" in result.stderr
    )


def test_policy_of_another_model_is_refused(tmp_path, checkpoint):
    from ajpq.analysis import analyze_model

    lenet = build_model("lenet300", (1, 8, 8), 10)
    Policy.uniform(analyze_model(lenet, (1, 8, 8), model_name="lenet300")).save(tmp_path / "other.json")
    result = run_cli("evaluate", "--weights", str(checkpoint), "--policy", str(tmp_path / "other.json"))
    assert result.returncode == 2 and "made for model 'lenet300'" in result.stderr
