"""The compressed artifact: packing, physical removal, round trip to the simulated model, bad files, ONNX."""

from __future__ import annotations

import functools
import importlib.util
import json
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ajpq import load_compressed
from ajpq.analysis import analyze_model
from ajpq.cli import main
from ajpq.compress import SimulatedModel
from ajpq.data import load_dataset
from ajpq.errors import ArtifactError
from ajpq.export import (
    MAGIC,
    build_artifact,
    export_onnx,
    pack_codes,
    parse_artifact,
    read_artifact,
    unpack_codes,
)
from ajpq.finetune import finetune, finetune_config
from ajpq.models import build_model
from ajpq.policy import Policy, validate_policy
from ajpq.train import TrainConfig, evaluate_accuracy, seed_everything, train_model
from ajpq.workspace import save_checkpoint

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


# --- packing --------------------------------------------------------------------------------------------------


@st.composite
def _codes(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    widths = np.asarray(draw(st.lists(st.integers(0, 8), min_size=1, max_size=12)), dtype=np.int64)
    per_row = draw(st.integers(1, 19))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    levels = np.where(widths >= 2, 2 ** np.maximum(widths - 1, 0) - 1, 0)
    codes = rng.integers(-levels[:, None], levels[:, None] + 1, size=(widths.size, per_row))
    ones = widths == 1
    codes[ones] = rng.choice([-1, 1], size=(int(ones.sum()), per_row))
    return widths, codes


@settings(max_examples=150, deadline=None)
@given(_codes())
def test_pack_unpack_round_trip_every_width(case: tuple[np.ndarray, np.ndarray]) -> None:
    widths, codes = case
    data = pack_codes(codes, widths)
    assert len(data) == -(-int(widths.sum()) * codes.shape[1] // 8)
    np.testing.assert_array_equal(unpack_codes(data, widths, codes.shape[1]), codes)


def test_pack_widths_exhaustively() -> None:
    for width in range(9):
        level = 2 ** (width - 1) - 1 if width >= 2 else width
        values = np.array([-1, 1]) if width == 1 else np.arange(-level, level + 1)
        codes = values[None, :]
        data = pack_codes(codes, np.array([width]))
        assert len(data) == -(-width * values.size // 8)
        np.testing.assert_array_equal(unpack_codes(data, np.array([width]), values.size), codes)


def test_pack_refuses_codes_out_of_range() -> None:
    with pytest.raises(ArtifactError, match="out of range"):
        pack_codes(np.array([[4]]), np.array([3]))
    with pytest.raises(ArtifactError, match="out of range"):
        pack_codes(np.array([[0]]), np.array([1]))


# --- helpers ----------------------------------------------------------------------------------------------------


def half_policy(analysis, seed: int = 0, activation_bits: int = 8) -> Policy:
    """Remove the less important half of every prunable group; mixed 1..8 bits on the rest."""
    rng = np.random.default_rng(seed)
    policy = Policy.uniform(analysis, 8, activation_bits)
    for group in analysis.groups:
        removed = group.order[group.size // 2 :] if group.prunable else np.array([], dtype=np.int64)
        for member in group.members:
            bits = rng.integers(2, 9, size=group.size)
            bits[rng.random(group.size) < 0.1] = 1
            bits[np.isin(analysis.out_root[member], removed)] = 0
            policy.layers[member].weight_bits = bits
    return validate_policy(policy, analysis)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    generator = seed_everything(0)
    model = build_model("digits_cnn", digits.input_shape, digits.num_classes)
    train_model(model, digits.train, TrainConfig(epochs=4, lr=0.05, batch_size=64), generator=generator, progress=False)
    analysis = analyze_model(model, digits.input_shape, model_name="digits_cnn")
    calibration = next(digits.train.batches(256))[0]
    return model.eval(), analysis, calibration


@pytest.fixture(scope="module")
def round_trip(digits, trained, tmp_path_factory):
    """Policy -> a few fine-tuning steps -> export -> write -> load_compressed."""
    model, analysis, calibration = trained
    policy = half_policy(analysis)
    result = finetune(
        model,
        analysis,
        policy,
        digits.train,
        calibration,
        finetune_config(epochs=1, max_steps=4, batch_size=64),
        progress=False,
    )
    artifact = build_artifact(
        result.model,
        analysis,
        policy,
        calibration,
        model_name="digits_cnn",
        input_shape=digits.input_shape,
        num_classes=digits.num_classes,
        dataset="digits",
    )
    path = tmp_path_factory.mktemp("artifact") / "model.ajpq"
    artifact.write(path)
    simulated = SimulatedModel(result.model, analysis, calibration).apply(policy)
    return path, artifact, simulated, policy, analysis, result.model


# --- round trip -----------------------------------------------------------------------------------------------


def test_loaded_model_reproduces_simulated_model(digits, round_trip) -> None:
    path, _, simulated, _, _, _ = round_trip
    slim = load_compressed(path)
    x = digits.test.x
    with torch.no_grad():
        expected, got = simulated(x), slim(x)
    span = float(expected.max() - expected.min())
    assert float((got - expected).abs().max()) <= 1e-4 * span
    assert evaluate_accuracy(slim, digits.test) == evaluate_accuracy(simulated, digits.test)


def test_payload_is_cost_model_size(round_trip) -> None:
    path, _, _, policy, analysis, model = round_trip
    size_bits = SimulatedModel(model, analysis, torch.zeros(1, 1, 8, 8)).cost_model.evaluate(policy).size_bits
    read = read_artifact(path)
    assert read.payload_bytes == pytest.approx(size_bits / 8, rel=0.01)
    assert read.payload_bytes >= size_bits / 8
    assert read.header_bytes + read.payload_bytes == path.stat().st_size
    assert read.header["metrics"]["size_bits"] == size_bits


def test_channels_are_physically_gone(round_trip) -> None:
    path, _, _, policy, _, model = round_trip
    slim = load_compressed(path)
    kept = {name: int((layer.weight_bits > 0).sum()) for name, layer in policy.layers.items()}
    assert slim.conv1.weight.shape == (kept["conv1"], 1, 3, 3)
    assert slim.conv2.weight.shape == (kept["conv2"], kept["conv1"], 3, 3)
    assert slim.conv3.weight.shape == (kept["conv3"], kept["conv2"], 3, 3)
    assert slim.fc1.weight.shape == (kept["fc1"], kept["conv3"] * 4 * 4)
    assert slim.fc2.weight.shape == (10, kept["fc1"])
    assert isinstance(slim.bn1, torch.nn.Identity)
    assert sum(p.numel() for p in slim.parameters()) < 0.4 * sum(p.numel() for p in model.parameters())


def test_artifact_header_documents_itself(round_trip) -> None:
    path, *_ = round_trip
    data = path.read_bytes()
    assert data[:8] == MAGIC
    version, _, length = struct.unpack_from("<HHI", data, 8)
    header = json.loads(data[48 : 48 + length])
    assert version == header["version"] == 1
    assert header["format"] == "ajpq-artifact"
    assert header["model"]["name"] == "digits_cnn"
    assert set(header["activations"]["conv2"]) == {"bits", "max_abs", "signed"}
    assert header["policy"]["format"] == "ajpq-policy"


# --- bad files --------------------------------------------------------------------------------------------------


def test_bad_files_are_refused(round_trip, tmp_path: Path) -> None:
    path, *_ = round_trip
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[-10] ^= 0x40
    with pytest.raises(ArtifactError, match=r"corrupted.*payload's sha256"):
        parse_artifact(bytes(flipped))
    header_flip = bytearray(data)
    header_flip[60] ^= 0x01
    with pytest.raises(ArtifactError, match=r"corrupted.*header"):
        parse_artifact(bytes(header_flip))
    for cut in (5, 30, 200, len(data) - 1):
        with pytest.raises(ArtifactError, match="truncated"):
            parse_artifact(data[:cut])
    with pytest.raises(ArtifactError, match="not an AJPQ artifact"):
        parse_artifact(b"PK\x03\x04" + data[4:])
    newer = bytearray(data)
    struct.pack_into("<H", newer, 8, 2)
    with pytest.raises(ArtifactError, match="version 2, which is newer"):
        parse_artifact(bytes(newer))
    with pytest.raises(ArtifactError, match="does not exist"):
        read_artifact(tmp_path / "missing.ajpq")
    broken = tmp_path / "broken.ajpq"
    broken.write_bytes(data[:-3])
    with pytest.raises(ArtifactError, match="truncated"):
        load_compressed(broken)


def test_cli_refuses_corrupted_artifact(round_trip, tmp_path: Path, capsys) -> None:
    path, *_ = round_trip
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    bad = tmp_path / "bad.ajpq"
    bad.write_bytes(bytes(data))
    assert main(["evaluate", "--artifact", str(bad), "--dataset", "digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupted" in err[0]


# --- other architectures ------------------------------------------------------------------------------------------


def _export_and_compare(model, name: str, input_shape, tmp_path: Path, *, user_model: bool = False):
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    analysis = analyze_model(model, input_shape, model_name=name)
    policy = half_policy(analysis, seed=1)
    calibration = torch.randn(64, *input_shape)
    artifact = build_artifact(
        model, analysis, policy, calibration, model_name=name, input_shape=input_shape, num_classes=10
    )
    path = tmp_path / f"{name.replace(':', '_')}.ajpq"
    artifact.write(path)
    slim = load_compressed(path, model=model if user_model else None)  # a file's factory name is never imported
    x = torch.randn(32, *input_shape)
    with torch.no_grad():
        expected, got = artifact.simulated(x), slim(x)
    span = float(expected.max() - expected.min())
    assert float((got - expected).abs().max()) <= 1e-4 * span
    payload = read_artifact(path).payload_bytes
    assert payload == pytest.approx(artifact.header["metrics"]["size_bits"] / 8, rel=0.01)
    return slim, policy


def test_residual_net_exports_and_runs(tmp_path: Path) -> None:
    model = build_model("resnet20", (3, 8, 8), 10)
    slim, policy = _export_and_compare(model, "resnet20", (3, 8, 8), tmp_path)
    kept_stage1 = int((policy.layers["layer1.0.conv2"].weight_bits > 0).sum())
    assert slim.conv1.weight.shape[0] == kept_stage1  # coupled with the residual stream of stage 1
    assert slim.layer1[0].conv2.weight.shape[0] == kept_stage1
    assert slim.layer2[0].shortcut[0].weight.shape == (slim.layer2[0].conv2.weight.shape[0], kept_stage1, 1, 1)
    assert slim.fc.weight.shape[1] == slim.layer3[2].conv2.weight.shape[0] < 64


DEPTHWISE_NET = """
from torch import nn


def build(in_channels, num_classes):
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, num_classes),
    )
"""


def test_depthwise_net_exports_and_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ajpq_test_dwnet.py").write_text(textwrap.dedent(DEPTHWISE_NET))
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "ajpq_test_dwnet:build"
    model = build_model(name, (3, 8, 8), 10)
    slim, policy = _export_and_compare(model, name, (3, 8, 8), tmp_path, user_model=True)
    kept = int((policy.layers["0"].weight_bits > 0).sum())
    assert kept == 8
    assert slim[3].weight.shape == (kept, 1, 3, 3) and slim[3].groups == kept
    assert slim[6].weight.shape[1] == kept


# --- ONNX -------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_ORT, reason="onnx/onnxruntime not installed (pip install 'ajpq[onnx]')")
def test_onnx_matches_slim_model(digits, round_trip, tmp_path: Path) -> None:
    import onnxruntime

    path, *_ = round_trip
    slim = load_compressed(path)
    onnx_path = tmp_path / "model.onnx"
    export_onnx(slim, digits.input_shape, onnx_path)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = digits.test.x[:200]
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = slim(x).numpy()
    span = float(expected.max() - expected.min())
    assert float(np.abs(got - expected).max()) <= 1e-4 * span
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99


def test_cli_export_evaluate_round_trip(digits, trained, tmp_path: Path, capsys, monkeypatch) -> None:
    import ajpq.export

    monkeypatch.setattr(ajpq.export, "latency_report", functools.partial(ajpq.export.latency_report, repeats=3))
    model, analysis, _ = trained
    weights = tmp_path / "ref.pt"
    save_checkpoint(weights, model, {"model": "digits_cnn", "dataset": "digits"})
    policy_path = tmp_path / "policy.json"
    half_policy(analysis).save(policy_path)
    out = tmp_path / "m.ajpq"
    args = ["--dataset", "digits", "--device", "cpu", "--weights", str(weights)]
    assert main(["export-model", *args, "--policy", str(policy_path), "--out", str(out), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["payload_bytes"] == pytest.approx(exported["expected_payload_bytes"], rel=0.01)
    assert main(["evaluate", "--artifact", str(out), "--dataset", "digits", "--json", "--weights", str(weights)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"accuracy", "file_bytes", "payload_bytes", "header_bytes", "latency_ms"}
    assert set(report["latency_ms"]) == {"batch1", "batch64", "fp32_batch1", "fp32_batch64"}
    assert report["accuracy"] == pytest.approx(exported["accuracy"]["test"])
    assert report["file_bytes"] == out.stat().st_size == report["payload_bytes"] + report["header_bytes"]
