"""QDQ ONNX export: integer initializers per layer width, removed channels gone, onnxruntime against the simulated
model, size against the float export, the tolerance refusal, and both CLI flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install 'ajpq[onnx]')")
onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'ajpq[onnx]')")

import ajpq  # noqa: E402
from ajpq.analysis import analyze_model  # noqa: E402
from ajpq.artifact import build_artifact  # noqa: E402
from ajpq.checkpoint import save_checkpoint  # noqa: E402
from ajpq.cli import main  # noqa: E402
from ajpq.data import load_dataset  # noqa: E402
from ajpq.models import build_model  # noqa: E402
from ajpq.onnx_export import (  # noqa: E402
    QDQ_TOLERANCE,
    OnnxExportError,
    export_float_onnx,
    export_qdq_onnx,
    run_logits,
    session,
)
from ajpq.policy import Policy, validate_policy  # noqa: E402
from ajpq.train import TrainConfig, seed_everything, train_model  # noqa: E402

SHAPE = (1, 6, 6)


class TinyNet(nn.Module):
    """conv1 (1->4) -> ReLU -> conv2 (4->6) -> ReLU -> 2x2 max pool -> flatten (6*3*3 = 54) -> fc (54->3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(54, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.max_pool2d(x, 2), 1))


def tiny_policy(analysis) -> Policy:
    """conv1 keeps 3 of 4 channels at <= 4 bits (int4), conv2 4 of 6 at 5-8 bits (int8), fc 1-2 bits (int4);
    conv1's input is signed 8-bit, conv2's unsigned 4-bit, fc's unsigned 6-bit."""
    policy = Policy.uniform(analysis, 8, 8)
    policy.layers["conv1"].weight_bits = np.array([3, 0, 2, 4])
    policy.layers["conv2"].weight_bits = np.array([8, 6, 0, 0, 5, 7])
    policy.layers["conv2"].activation_bits = 4
    policy.layers["fc"].weight_bits = np.array([2, 2, 1])
    policy.layers["fc"].activation_bits = 6
    return validate_policy(policy, analysis)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyNet().eval()
    analysis = analyze_model(model, SHAPE, model_name="tiny")
    calibration = torch.randn(128, *SHAPE)
    artifact = build_artifact(
        model, analysis, tiny_policy(analysis), calibration, model_name="tiny", input_shape=SHAPE, num_classes=3
    )
    folder = tmp_path_factory.mktemp("onnx")
    report = export_qdq_onnx(
        artifact.header, artifact.payload, artifact.slim, artifact.simulated, calibration, folder / "tiny.onnx"
    )
    return artifact, calibration, folder, report


def test_integer_initializers_per_layer_width_and_removed_channels_absent(tiny) -> None:
    artifact, _, folder, report = tiny
    model = onnx.load(folder / "tiny.onnx")
    assert model.opset_import[0].version == 21
    tensors = {t.name: t for t in model.graph.initializer}
    int4, int8, uint4, uint8 = (onnx.TensorProto.INT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT4,
                                onnx.TensorProto.UINT8)  # fmt: skip
    # conv1: 3 kept of 4 outputs, 1 input, 3x3; conv2: 4 kept of 6 outputs reading conv1's 3 kept; fc: conv2's 4
    # kept channels x 3x3 pooled positions = 36 inputs, stored [in, out]
    expected = {"conv1": ((3, 1, 3, 3), int4), "conv2": ((4, 3, 3, 3), int8), "fc": ((36, 3), int4)}
    for name, (shape, dtype) in expected.items():
        weight = tensors[f"{name}.wq"]
        assert tuple(weight.dims) == shape and weight.data_type == dtype, name
        assert tuple(tensors[f"{name}.ws"].dims) == (shape[1] if name == "fc" else shape[0],)
    assert report["layers"] == {"conv1": "int4", "conv2": "int8", "fc": "int4"}
    assert len(tensors["conv1.wq"].raw_data) == 3 * 9 // 2 + 1  # int4: two codes a byte (27 codes -> 14 bytes)
    assert not any(t.data_type == onnx.TensorProto.FLOAT and t.name.endswith(".weight") for t in tensors.values())
    # int32 bias only on the int8 layer (what onnxruntime's integer kernels take); the int4 layers keep float biases
    assert tensors["conv2.bq"].data_type == onnx.TensorProto.INT32 and "conv2.bias" not in tensors
    assert tensors["conv1.bias"].data_type == tensors["fc.bias"].data_type == onnx.TensorProto.FLOAT
    assert "conv1.bq" not in tensors and "fc.bq" not in tensors
    # the codes are the artifact's: DequantizeLinear of the initializers gives the slim model's weights
    from onnx import numpy_helper

    for name in expected:
        codes = numpy_helper.to_array(tensors[f"{name}.wq"]).astype(np.float32)
        scales = numpy_helper.to_array(tensors[f"{name}.ws"])
        weight = getattr(artifact.slim, name).weight.detach().numpy()
        dequantized = codes * scales if name == "fc" else codes * scales[:, None, None, None]
        np.testing.assert_array_equal(dequantized.T if name == "fc" else dequantized, weight)
    # activations: conv1 signed 8-bit -> int8 with a Clip to +-127 steps; conv2 unsigned 4-bit -> uint4 (its range
    # exactly, no Clip); fc unsigned 6-bit -> uint8 with a Clip to 63 steps
    zero_points = {name: tensors[f"{name}.xz"].data_type for name in expected}
    assert zero_points == {"conv1": int8, "conv2": uint4, "fc": uint8}
    clips = {n.output[0] for n in model.graph.node if n.op_type == "Clip"}
    assert clips == {"conv1.xclip", "fc.xclip"}
    scale = float(numpy_helper.to_array(tensors["fc.xs"]))
    assert float(numpy_helper.to_array(tensors["fc.xhi"])) == pytest.approx(63 * scale)
    assert float(numpy_helper.to_array(tensors["conv1.xlo"])) == pytest.approx(-127 * scale_of(tensors, "conv1"))


def scale_of(tensors, name: str) -> float:
    from onnx import numpy_helper

    return float(numpy_helper.to_array(tensors[f"{name}.xs"]))


def test_onnxruntime_matches_the_simulated_model_and_saturates_like_it(tiny) -> None:
    artifact, _, folder, report = tiny
    assert report["max_abs_logit_diff"]["relative"] <= QDQ_TOLERANCE
    data = (folder / "tiny.onnx").read_bytes()
    x = torch.cat([torch.randn(200, *SHAPE), 6 * torch.randn(56, *SHAPE)])  # large inputs: saturating activations
    with torch.no_grad():
        expected = artifact.simulated(x).numpy()
    for optimize in (True, False):
        got = run_logits(session(data, optimize=optimize), x)
        span = float(expected.max() - expected.min())
        assert float(np.abs(got - expected).max()) <= QDQ_TOLERANCE * span
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.98


def test_qdq_file_is_smaller_than_the_float_export(tiny) -> None:
    artifact, _, folder, report = tiny
    export_float_onnx(artifact.slim, SHAPE, folder / "tiny.float.onnx")
    assert report["bytes"] == (folder / "tiny.onnx").stat().st_size
    assert report["bytes"] < (folder / "tiny.float.onnx").stat().st_size


class Shifted(nn.Module):
    """The simulated model with its logits moved: a stand-in for a graph that computes something else."""

    def __init__(self, inner: nn.Module, shift: float) -> None:
        super().__init__()
        self.inner, self.shift = inner, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out + self.shift * (out.max() - out.min()) * torch.arange(out.shape[1])


def test_a_mismatch_above_the_tolerance_is_refused_with_one_line(tiny) -> None:
    artifact, calibration, folder, _ = tiny
    target = folder / "refused.onnx"
    with pytest.raises(OnnxExportError) as info:
        export_qdq_onnx(
            artifact.header, artifact.payload, artifact.slim, Shifted(artifact.simulated, 0.2), calibration, target
        )
    message = str(info.value)
    assert "\n" not in message
    assert "differ from the simulated model's by" in message and "of their range on 128 calibration images" in message
    assert f"(allowed {QDQ_TOLERANCE:.1%})" in message and "no ONNX file was written" in message
    assert not target.exists()


# --- the commands -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory):
    digits = load_dataset("digits")
    generator = seed_everything(0)
    model = build_model("digits_cnn", digits.input_shape, digits.num_classes)
    train_model(model, digits.train, TrainConfig(epochs=2, lr=0.05, batch_size=64), generator=generator, progress=False)
    path = tmp_path_factory.mktemp("digits") / "ref.pt"
    save_checkpoint(path, model, {"model": "digits_cnn", "dataset": "digits"})
    return digits, model.eval(), path


def test_cli_writes_qdq_with_onnx_and_float_with_onnx_float(digits_weights, tmp_path: Path, capsys) -> None:
    digits, model, weights = digits_weights
    analysis = analyze_model(model, digits.input_shape, model_name="digits_cnn")
    policy_path = tmp_path / "policy.json"
    Policy.uniform(analysis, 4, 8).save(policy_path)
    qdq, floating, out = tmp_path / "m.onnx", tmp_path / "m.float.onnx", tmp_path / "m.ajpq"
    args = ["--dataset", "digits", "--device", "cpu", "--weights", str(weights), "--policy", str(policy_path)]
    code = main(["export-model", *args, "--out", str(out), "--onnx", str(qdq), "--onnx-float", str(floating), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["onnx_bytes"] == qdq.stat().st_size < report["onnx_float_bytes"] == floating.stat().st_size
    assert report["onnx_max_abs_logit_diff"]["relative"] <= QDQ_TOLERANCE
    assert set(report["onnx_weight_types"].values()) == {"int4"}
    assert report["onnx_float_max_abs_diff"] < 1e-3
    assert onnx.load(floating).opset_import[0].version == 17  # today's float export, unchanged
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(floating).graph.node)
    x = digits.test.x[:100].numpy()
    (got,) = session(floating.read_bytes()).run(None, {"input": x})
    with torch.no_grad():
        expected = ajpq.load_compressed(out)(torch.from_numpy(x)).numpy()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
    assert main(["export-model", *args, "--out", str(out), "--onnx", str(qdq)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {qdq} (QDQ, opset 21, int4 weights): {qdq.stat().st_size:,} bytes" in printed
    assert "x the artifact's" in printed


def test_api_export_writes_qdq_onnx(digits_weights, tmp_path: Path) -> None:
    digits, model, _ = digits_weights
    analysis = analyze_model(model, digits.input_shape, model_name="digits_cnn")
    policy = Policy.uniform(analysis, 6, 8)
    calibration = (digits.train.x[:256], digits.train.y[:256])  # type: ignore[attr-defined]
    report = ajpq.export(model, policy, tmp_path / "m.ajpq", onnx=tmp_path / "m.onnx", calibration=calibration)
    assert report["onnx_bytes"] == (tmp_path / "m.onnx").stat().st_size
    assert set(report["onnx_weight_types"].values()) == {"int8"}
    tensors = onnx.load(tmp_path / "m.onnx").graph.initializer
    assert {t.data_type for t in tensors if t.name.endswith(".wq")} == {onnx.TensorProto.INT8}


def test_unquantized_activations_get_no_qdq_pairs_and_match_to_float_rounding(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = TinyNet().eval()
    analysis = analyze_model(model, SHAPE, model_name="tiny")
    policy = tiny_policy(analysis)
    for layer in policy.layers.values():
        layer.activation_bits = 32
    calibration = torch.randn(64, *SHAPE)
    artifact = build_artifact(model, analysis, policy, calibration, model_name="tiny", input_shape=SHAPE, num_classes=3)
    path = tmp_path / "fp_act.onnx"
    report = export_qdq_onnx(artifact.header, artifact.payload, artifact.slim, artifact.simulated, calibration, path)
    graph = onnx.load(path).graph
    assert not any(n.op_type in ("QuantizeLinear", "Clip") for n in graph.node)
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert dequantized == {"conv1.weight", "conv2.weight", "fc.weight"}  # biases stay float without an input scale
    assert report["max_abs_logit_diff"]["relative"] <= QDQ_TOLERANCE
    # the graph itself computes the simulated model to float rounding (integer weights x scales); onnxruntime's
    # default optimizations fuse the int4 fc into MatMulNBits, which rounds its float input to int8 internally
    got = run_logits(session(path.read_bytes(), optimize=False), calibration)
    with torch.no_grad():
        expected = artifact.simulated(calibration).numpy()
    assert float(np.abs(got - expected).max()) <= 1e-5 * float(expected.max() - expected.min())


# --- experiments/bench_deploy.py ----------------------------------------------------------------------------------


def test_bench_deploy_policies_reach_the_rate_with_the_most_channels_kept() -> None:
    from experiments_scripts import load_experiment

    from ajpq.cost import CostModel

    bench = load_experiment("bench_deploy")
    model = build_model("lenet5", (1, 28, 28), 10)
    analysis = analyze_model(model, (1, 28, 28), model_name="lenet5")
    cost = CostModel(analysis)
    for rate in (16, 32):
        policy, keep = bench.policy_for_rate(analysis, rate)
        assert cost.evaluate(policy).compression_rate >= rate
        assert cost.evaluate(bench.pruned_policy(analysis, keep + 0.01)).compression_rate < rate
        bits = np.concatenate([layer.weight_bits for layer in policy.layers.values()])
        assert set(bits.tolist()) == {0, 4}
        assert {layer.activation_bits for layer in policy.layers.values()} == {8}


@pytest.mark.expensive
def test_bench_deploy_quick_mode_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    from ajpq.data import DEBIAN_FASHION_MNIST

    if not DEBIAN_FASHION_MNIST.exists():
        pytest.skip("Fashion-MNIST is not installed here")
    script = Path(__file__).resolve().parents[1] / "experiments" / "bench_deploy.py"
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["bytes"]["qdq_onnx"] < row["bytes"]["float_slim_onnx"] < row["bytes"]["fp32_onnx"]
    assert abs(row["accuracy"]["qdq_onnx"] - row["accuracy"]["artifact"]) <= 0.002
    assert "qdq/art" in result.stdout and "latency" in result.stdout
