"""The compressed artifact: packing, physical removal, round trip to the simulated model, bad files, ONNX."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from nets import GroupedConvNet, LayerNormMLP, ShuffleNet

from ajpq import load_compressed
from ajpq.analysis import analyze_model
from ajpq.artifact import (
    MAGIC,
    build_artifact,
    decode_sparse,
    encode_sparse,
    pack_codes,
    parse_artifact,
    read_artifact,
    unpack_codes,
)
from ajpq.checkpoint import save_checkpoint
from ajpq.cli import main
from ajpq.compress import SimulatedModel
from ajpq.cost import sparse_storage_bits
from ajpq.data import load_dataset
from ajpq.errors import ArtifactError, ModelError
from ajpq.models import build_model
from ajpq.onnx_export import export_float_onnx
from ajpq.policy import Policy, validate_policy
from ajpq.qat import finetune, finetune_config
from ajpq.train import TrainConfig, evaluate_accuracy, seed_everything, train_model

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


@contextlib.contextmanager
def activations_unquantized(*models: torch.nn.Module):
    """Switch off the activation quantizers (forward pre-hooks with ``bits``) of the models for a while."""
    hooks = [h for m in models for module in m.modules() for h in module._forward_pre_hooks.values()]
    quantizers = [h for h in hooks if hasattr(h, "bits")]
    saved = [q.bits for q in quantizers]
    for quantizer in quantizers:
        quantizer.bits = 32
    try:
        yield
    finally:
        for quantizer, bits in zip(quantizers, saved, strict=True):
            quantizer.bits = bits


def test_loaded_model_reproduces_simulated_model(digits, round_trip) -> None:
    path, _, simulated, _, _, _ = round_trip
    slim = load_compressed(path)
    x = digits.test.x
    # Without activation quantization only float rounding separates them (with it, a value on a rounding boundary
    # may round the other way after the slim model's different summation order, one activation step per flip).
    with torch.no_grad(), activations_unquantized(slim, simulated):
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
    assert version == header["version"] == 2
    assert header["format"] == "ajpq-artifact"
    assert header["model"]["name"] == "digits_cnn"
    assert set(header["activations"]["conv2"]) == {"bits", "max_abs", "signed"}
    assert header["policy"]["format"] == "ajpq-policy"


def test_version_1_files_still_load(digits, round_trip, tmp_path: Path) -> None:
    path, *_ = round_trip
    artifact = read_artifact(path)
    header = json.loads(json.dumps(artifact.header))
    header["version"] = 1
    for entry in header["layers"]:
        del entry["storage"]  # version 1 had no storage key: every layer dense
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    preamble = struct.pack("<8sHHI32s", MAGIC, 1, 0, len(header_bytes), hashlib.sha256(header_bytes).digest())
    old = tmp_path / "v1.ajpq"
    old.write_bytes(preamble + header_bytes + artifact.payload)
    x = digits.test.x[:100]
    with torch.no_grad():
        assert torch.equal(load_compressed(old)(x), load_compressed(path)(x))


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
    struct.pack_into("<H", newer, 8, 3)
    with pytest.raises(ArtifactError, match="version 3, which is newer"):
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


def test_export_refuses_a_rebuilt_model_that_differs_from_the_simulation() -> None:
    # The analysis of the same modules without the shuffle maps conv1's channels to conv2's inputs one to one, so the
    # slim model cuts conv2's inputs 1 and 4 where the shuffled network reads channels 1 and 4 at positions 2 and 3.
    torch.manual_seed(0)
    model = ShuffleNet().eval()
    analysis = analyze_model(ShuffleNet(shuffle=False), (1, 6, 6), model_name="shuffle")
    policy = Policy.uniform(analysis, 8, 32)
    policy.layers["conv1"].weight_bits = np.array([8, 0, 8, 8, 0, 8])
    policy = validate_policy(policy, analysis)
    with pytest.raises(ModelError, match=r"differ by \d+\.\d% of their range with activation quantization off"):
        build_artifact(
            model,
            analysis,
            policy,
            torch.randn(16, 1, 6, 6),
            model_name="shuffle",
            input_shape=(1, 6, 6),
            num_classes=3,
        )
    policy.layers["conv1"].weight_bits = np.array([8, 0, 8, 8, 8, 8])  # 5 channels cannot be viewed as 2 x 2.5
    with pytest.raises(ModelError, match="rebuilt with the removed channels cut out cannot run"):
        build_artifact(
            model,
            analysis,
            policy,
            torch.randn(16, 1, 6, 6),
            model_name="shuffle",
            input_shape=(1, 6, 6),
            num_classes=3,
        )


@pytest.mark.parametrize(
    ("net", "shape"), [(ShuffleNet, (1, 6, 6)), (LayerNormMLP, (1, 8, 8)), (GroupedConvNet, (1, 6, 6))]
)
def test_shuffles_layernorms_and_grouped_convs_export_what_was_simulated(net, shape, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = net().eval()
    analysis = analyze_model(model, shape, model_name="net")
    policy = half_policy(analysis, seed=1, activation_bits=32)
    assert any((layer.weight_bits == 0).any() for layer in policy.layers.values())  # something is still removed
    artifact = build_artifact(
        model, analysis, policy, torch.randn(64, *shape), model_name="net", input_shape=shape, num_classes=10
    )
    path = tmp_path / "net.ajpq"
    artifact.write(path)
    slim = load_compressed(path, model=net())
    x = torch.randn(256, *shape)
    with torch.no_grad():
        expected, got = artifact.simulated(x), slim(x)
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.max() - expected.min())
    assert torch.equal(got.argmax(1), expected.argmax(1))
    size_bits = artifact.header["metrics"]["size_bits"]
    assert 0 <= read_artifact(path).payload_bytes - size_bits / 8 < len(analysis.layers)


# --- ONNX -------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_ORT, reason="onnx/onnxruntime not installed (pip install 'ajpq[onnx]')")
def test_onnx_matches_slim_model(digits, round_trip, tmp_path: Path) -> None:
    import onnxruntime

    path, *_ = round_trip
    slim = load_compressed(path)
    x = digits.test.x[:200]

    def onnx_and_torch() -> tuple[np.ndarray, np.ndarray]:
        onnx_path = tmp_path / "model.onnx"
        export_float_onnx(slim, digits.input_shape, onnx_path)
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            return got, slim(x).numpy()

    with activations_unquantized(slim):  # the weights and graph: float rounding only
        got, expected = onnx_and_torch()
    span = float(expected.max() - expected.min())
    assert float(np.abs(got - expected).max()) <= 1e-4 * span
    got, expected = onnx_and_torch()  # with the quantizers: a few rounding flips at most
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99


def test_cli_export_evaluate_round_trip(digits, trained, tmp_path: Path, capsys, monkeypatch) -> None:
    import ajpq.evaluation
    import ajpq.latency

    monkeypatch.setattr(ajpq.evaluation, "latency_report", functools.partial(ajpq.latency.latency_report, repeats=3))
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


# --- sparse layers (format version 2) -----------------------------------------------------------------------------


@given(_codes(), st.floats(0.0, 1.0), st.sampled_from(["relative-index", "bitmap"]))
@settings(max_examples=60, deadline=None)
def test_sparse_streams_round_trip_at_the_cost_models_size(
    case: tuple[np.ndarray, np.ndarray], density: float, storage: str
) -> None:
    widths, codes = case
    kept = widths > 0  # a slim layer has no removed rows
    assume(kept.any())
    widths, codes = widths[kept], codes[kept]
    keep = np.random.default_rng(codes.size).random(codes.shape) < density
    codes = codes * keep
    data, info = encode_sparse(codes, widths, keep, storage)
    assert np.array_equal(decode_sparse(data, widths, codes.shape[1], storage, info), codes)
    bits, fmt = sparse_storage_bits(keep.ravel(), np.repeat(widths, codes.shape[1]))
    if storage == ("relative-index", "bitmap")[fmt]:
        assert len(data) == math.ceil(bits / 8)


def test_relative_index_by_hand() -> None:
    # one 2-bit channel of 20 positions storing +1 at 0 and -1 at 18: entry (gap 0, code 1+1=2), a filler at 16
    # (gap 15, code 0+1=1), entry (gap 1, code -1+1=0): fields 0000 01 | 1111 10 | 1000 00, LSB first = 18 bits.
    codes = np.zeros((1, 20), dtype=np.int64)
    codes[0, 0], codes[0, 18] = 1, -1
    data, info = encode_sparse(codes, np.array([2]), codes != 0, "relative-index")
    bits = "".join(str(b) for b in np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little"))
    assert bits[:18] == "0000" + "01" + "1111" + "10" + "1000" + "00" and info["entries"] == 3
    assert sparse_storage_bits((codes != 0).ravel(), np.full(20, 2)) == (18, 0)


@pytest.mark.expensive
@pytest.mark.parametrize("method", ["opq", "olmp", "admm"])
def test_sparse_policies_export_at_the_cost_models_size(method: str, tmp_path: Path) -> None:
    from ajpq.methods.common import load_method_weights
    from ajpq.policy import load_policy
    from ajpq.runner import run_search
    from ajpq.search_config import SearchConfig
    from ajpq.workspace import WorkspaceSpec, open_workspace

    workspace = open_workspace(WorkspaceSpec(device="cpu"), progress=False)
    fast = {
        "opq": {},
        "olmp": {"rounds": 1, "population": 2, "iterations": 1, "retrain_epochs": 0.5},
        "admm": {"steps": 2, "admm_epochs": 0.5, "retrain_epochs": 0.5, "quant_epochs": 0.5},
    }[method]
    config = SearchConfig(
        method=method, size_budget=1 / 16, method_options=fast, run_dir=str(tmp_path / method), progress=False
    )
    result = run_search(config, workspace=workspace)
    policy = load_policy(result.run_dir / "best_policy.json", workspace.analysis)
    model = load_method_weights(workspace, policy.meta["weights"]) if "weights" in policy.meta else workspace.model
    assert any(layer.weight_sparsity > 0 for layer in policy.layers.values())
    calibration = next(workspace.splits.train.batches(256))[0]
    artifact = build_artifact(
        model, workspace.analysis, policy, calibration, model_name="digits_cnn", input_shape=(1, 8, 8), num_classes=10
    )
    path = tmp_path / "sparse.ajpq"
    artifact.write(path)
    read = read_artifact(path)
    assert read.header["version"] == 2
    assert {entry["storage"] for entry in read.header["layers"]} - {"dense"}
    slim = load_compressed(path)
    simulated = SimulatedModel(model, workspace.analysis, calibration).apply(policy)
    test = workspace.splits.test
    assert evaluate_accuracy(slim, test) == evaluate_accuracy(simulated, test)
    with torch.no_grad(), activations_unquantized(slim, simulated):
        expected, got = simulated(test.x), slim(test.x)
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.max() - expected.min())
    size_bits = artifact.header["metrics"]["size_bits"]
    assert 0 <= read.payload_bytes - size_bits / 8 < len(workspace.analysis.layers)


def test_a_diverged_model_is_refused_with_one_line() -> None:
    """NaN weights (a fine-tuning that diverged) are named, not reported as an internal error."""
    import torch

    from ajpq.analysis import analyze_model
    from ajpq.artifact import build_artifact
    from ajpq.errors import ArtifactError
    from ajpq.models import build_model
    from ajpq.policy import Policy

    model = build_model("lenet300", (1, 8, 8), 10).eval()
    analysis = analyze_model(model, (1, 8, 8), model_name="lenet300")
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(ArtifactError, match=r"NaN or infinite values \(training diverged"):
        build_artifact(
            model,
            analysis,
            Policy.uniform(analysis, 4, 8),
            torch.randn(8, 1, 8, 8),
            model_name="lenet300",
            input_shape=(1, 8, 8),
            num_classes=10,
        )
