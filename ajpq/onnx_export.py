"""ONNX export of the slim compressed model: the QDQ format runtimes execute, and the float format for the rest.

QDQ (the default, opset 21): each compressible layer's weights are its integer codes as an initializer with one
scale per kept output channel (``DequantizeLinear`` along axis 0): ``int8`` when the layer's widest channel has 5-8
bits, ``int4`` (two codes a byte) when it has 1-4. Every quantized layer input gets a ``QuantizeLinear`` /
``DequantizeLinear`` pair with the policy's scale, ``uint8``/``int8`` (``uint4``/``int4`` below 5 bits) and zero
point 0; where the type's range is wider than the policy's (signed codes stop at ``-(2^(b-1)-1)``, 5-7 and 2-3
bit codes stop below the type's end) a ``Clip`` to the policy's range comes first, so the file saturates exactly
where the simulation does. A quantized int8 layer's bias is ``int32`` at scale ``input scale x weight scale`` (the
form onnxruntime fuses into integer kernels); other biases stay float32. Removed channels are absent: the graph is
the artifact's slim network.

What onnxruntime's CPU provider (1.32) makes of it with graph optimizations on: a layer with int8 weights whose
input is a uint8 Q/DQ pair and whose output goes straight (or through a ReLU) into the next Q runs as QLinearConv /
QGemm; an int8 Gemm without that output Q as QGemm with float output. int4 weights have no integer Conv kernel
there, and a DequantizeLinear-fed input keeps an int4 Gemm from MatMulNBits, so such layers run as float kernels
behind a DequantizeLinear that re-runs at every call; ``session.disable_quant_qdq=1`` makes onnxruntime fold the
weights' DequantizeLinear once at load instead (the activation Q/DQ pairs stay). A Clip for saturation also keeps
the layer that feeds it from fusing. Layers with weight sparsity are stored dense (their zeros included).

Float (``--onnx-float``, opset 17): the slim model with float weights ``code x scale`` and the activation
quantizers as Div/Round/Clip/Mul, for runtimes without Q/DQ support.

Both are checked against the simulated model with onnxruntime before the file is written.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ajpq.analysis import layer_module
from ajpq.errors import ModelError
from ajpq.io import atomic_write_bytes
from ajpq.policy import policy_from_dict
from ajpq.quant import activation_levels, activation_scale

FLOAT_OPSET = 17
QDQ_OPSET = 21
"""ONNX 1.16 (opset 21) added the 4-bit types and 4-bit Q/DQ."""

QDQ_TOLERANCE = 0.05
"""Largest max |logit difference| between onnxruntime (graph optimizations on) and the simulated model on the
calibration images, relative to the simulated logits' range. The two differ by float rounding of the int32 bias and
by activation rounding flips: onnxruntime's fused integer kernels requantize a layer's output straight from its
integer accumulator, so a value within float error of a rounding boundary may land one step away, and the step
travels to the logits; and an int4 Linear layer whose input is not quantized is fused into MatMulNBits, which by
default rounds its float input to int8 blocks (``session.qdq_matmulnbits_accuracy_level``). A few percent is what
that costs in the zoo; a wrong graph (a channel or scale in the wrong place) is off by the logit range itself."""


class OnnxExportError(ModelError):
    """The ONNX file would not compute the compressed model (onnxruntime disagrees beyond the tolerance)."""


def require_onnx() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules, or a :class:`ModelError` saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ModelError(
            "ONNX export needs the optional packages onnx and onnxruntime; install them with `pip install 'ajpq[onnx]'`"
        ) from None
    return onnx, onnxruntime


def _torch_export(model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic batch) into bytes."""
    example = torch.zeros(2, *input_shape)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="ajpq-onnx-") as folder:
        warnings.simplefilter("ignore")
        scratch = Path(folder) / "model.onnx"  # torch.onnx.export takes a path; the target is written atomically
        torch.onnx.export(
            model,
            (example,),
            scratch,
            opset_version=FLOAT_OPSET,
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
        return scratch.read_bytes()


def session(data: bytes, *, optimize: bool = True, threads: int = 0) -> Any:
    """An onnxruntime CPU session on a serialized model (all graph optimizations, or none)."""
    _, onnxruntime = require_onnx()
    options = onnxruntime.SessionOptions()
    level = onnxruntime.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run_logits(model: Any, images: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of an onnxruntime session (or serialized model) on images, in batches."""
    runner = session(model) if isinstance(model, bytes) else model
    array = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    array = array.astype(np.float32, copy=False)
    outputs = [runner.run(None, {"input": array[i : i + batch_size]})[0] for i in range(0, len(array), batch_size)]
    return np.concatenate(outputs)


# ---------------------------------------------------------------------------------------------------------------
# Float export (today's format, behind --onnx-float)
# ---------------------------------------------------------------------------------------------------------------


def export_float_onnx(slim: nn.Module, input_shape: tuple[int, ...], path: str | Path, *, check: bool = True) -> float:
    """Write the slim model as float ONNX (opset 17, dynamic batch) and return onnxruntime's max |logit difference|
    from the slim model on random inputs."""
    onnx, _ = require_onnx()
    data = _torch_export(slim, input_shape)
    onnx.checker.check_model(onnx.load_from_string(data))
    atomic_write_bytes(path, data)
    if not check:
        return 0.0
    example = torch.randn(4, *input_shape)
    with torch.no_grad():
        expected = slim(example).numpy()
    return float(np.abs(run_logits(session(data, optimize=False), example) - expected).max())


def export_fp32_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> int:
    """Write an uncompressed FP32 model as ONNX (the baseline a deployment compares against); its size in bytes."""
    data = _torch_export(copy.deepcopy(model).cpu().float().eval(), input_shape)
    atomic_write_bytes(path, data)
    return len(data)


# ---------------------------------------------------------------------------------------------------------------
# QDQ
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _QType:
    """An ONNX integer type for codes: its TensorProto id, numpy dtype and range."""

    proto: int
    dtype: Any
    low: int
    high: int


def _qtype(bits: int, signed: bool) -> _QType:
    import ml_dtypes
    from onnx import TensorProto

    if bits <= 4:
        if signed:
            return _QType(TensorProto.INT4, ml_dtypes.int4, -8, 7)
        return _QType(TensorProto.UINT4, ml_dtypes.uint4, 0, 15)
    if signed:
        return _QType(TensorProto.INT8, np.int8, -128, 127)
    return _QType(TensorProto.UINT8, np.uint8, 0, 255)


def weight_type_name(max_bits: int) -> str:
    """The initializer type of a layer whose widest kept channel has ``max_bits`` bits: int4 up to 4, else int8."""
    return "int4" if max_bits <= 4 else "int8"


class _Graph:
    """Collects the nodes and initializers added to the exported float graph."""

    def __init__(self) -> None:
        self.initializers: list[Any] = []
        self.nodes: list[Any] = []

    def constant(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output


def _weight_codes(module: nn.Conv2d | nn.Linear, scales: np.ndarray) -> np.ndarray:
    """The layer's integer codes: its weight is ``code x scale`` exactly (the artifact's check), so this is exact."""
    weight = module.weight.detach().cpu().double().numpy()
    flat = weight.reshape(weight.shape[0], -1) / scales.astype(np.float64)[:, None]
    return np.rint(flat).astype(np.int64).reshape(weight.shape)


def _layer_scales(header: dict[str, Any], payload: bytes, entry: dict[str, Any]) -> np.ndarray:
    offset, length = entry["scales"]
    return np.frombuffer(payload[offset : offset + length], dtype="<f2").astype(np.float32)


def qdq_model(header: dict[str, Any], payload: bytes, slim: nn.Module) -> Any:
    """The QDQ ``onnx.ModelProto`` of an artifact (header, payload) and the slim model it rebuilds to."""
    onnx, _ = require_onnx()
    from onnx import helper

    float_slim = copy.deepcopy(slim).cpu().eval()
    layers = header["layers"]
    for entry in layers:
        layer_module(float_slim, entry["name"])._forward_pre_hooks.clear()
    shape = tuple(header["model"]["input_shape"])
    model = onnx.load_from_string(_torch_export(float_slim, shape))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    added = _Graph()
    input_qdq: dict[int, list[Any]] = {}  # id(node) -> the nodes to insert before it
    removed: set[str] = set()
    activations = header["activations"]
    policy = policy_from_dict(header["policy"], "artifact policy")
    for entry in layers:
        name = entry["name"]
        weight_name = f"{name}.weight"
        nodes = users.get(weight_name, [])
        if weight_name not in initializers or len(nodes) != 1 or nodes[0].op_type not in ("Conv", "Gemm"):
            raise ModelError(
                f"layer '{name}' is not one Conv or Gemm reading initializer {weight_name!r} in the exported graph; "
                "use --onnx-float for this model"
            )
        node = nodes[0]
        module = layer_module(float_slim, name)
        scales = _layer_scales(header, payload, entry)
        codes = _weight_codes(module, scales)
        axis = 0
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0 or attrs.get("alpha", 1.0) != 1.0:
                raise ModelError(f"layer '{name}' exports as an unusual Gemm; use --onnx-float for this model")
            # [in, out] with transB=0: the layout onnxruntime fuses into MatMulNBits (int4) and QGemm (int8)
            codes, axis = np.ascontiguousarray(codes.T), 1
            del node.attribute[:]
            node.attribute.extend([helper.make_attribute("beta", 1.0)])
        bits = policy.layers[name].weight_bits
        wtype = _qtype(int(bits.max()), signed=True)
        added.constant(f"{name}.wq", codes.astype(wtype.dtype))
        added.constant(f"{name}.ws", scales)
        added.constant(f"{name}.wz", np.zeros(len(scales), dtype=wtype.dtype))
        added.node("DequantizeLinear", [f"{name}.wq", f"{name}.ws", f"{name}.wz"], weight_name, axis=axis)
        removed.add(weight_name)

        spec = activations.get(name)
        abits = int(spec["bits"]) if spec else 32
        if abits >= 32:
            continue
        signed = bool(spec["signed"])
        scale = np.float32(activation_scale(float(spec["max_abs"]), abits, signed))
        low, high = activation_levels(abits, signed)
        atype = _qtype(abits, signed)
        before = input_qdq.setdefault(id(node), [])
        local = _Graph()
        source = node.input[0]
        if (low, high) != (atype.low, atype.high):
            lo = local.constant(f"{name}.xlo", np.array(low * scale, dtype=np.float32))
            hi = local.constant(f"{name}.xhi", np.array(high * scale, dtype=np.float32))
            source = local.node("Clip", [source, lo, hi], f"{name}.xclip")
        local.constant(f"{name}.xs", np.array(scale, dtype=np.float32))
        local.constant(f"{name}.xz", np.array(0, dtype=atype.dtype))
        quantized = local.node("QuantizeLinear", [source, f"{name}.xs", f"{name}.xz"], f"{name}.xq")
        node.input[0] = local.node("DequantizeLinear", [quantized, f"{name}.xs", f"{name}.xz"], f"{name}.x")
        before.extend(local.nodes)
        added.initializers.extend(local.initializers)

        bias_name = node.input[2] if len(node.input) > 2 else ""
        # int32 only where it buys an integer kernel (int8 weights): its rounding moves logits measurably (ResNet-20
        # at 1/16, 4-bit: 0.5% of test predictions against 0.05% with the float bias)
        if bias_name in initializers and wtype.proto == _qtype(8, signed=True).proto:
            from onnx import numpy_helper

            bias = numpy_helper.to_array(initializers[bias_name]).astype(np.float64)
            bias_scale = (np.float64(scale) * scales.astype(np.float64)).astype(np.float32)
            quantized_bias = np.rint(bias / bias_scale.astype(np.float64))
            if np.abs(quantized_bias).max(initial=0) < 2**31 - 1:
                added.constant(f"{name}.bq", quantized_bias.astype(np.int32))
                added.constant(f"{name}.bs", bias_scale)
                added.constant(f"{name}.bz", np.zeros(len(scales), dtype=np.int32))
                added.node("DequantizeLinear", [f"{name}.bq", f"{name}.bs", f"{name}.bz"], bias_name, axis=0)
                removed.add(bias_name)

    kept = [t for t in graph.initializer if t.name not in removed]
    nodes = list(added.nodes)
    for node in graph.node:
        nodes.extend(input_qdq.get(id(node), []))
        nodes.append(node)
    del graph.initializer[:]
    graph.initializer.extend([*kept, *added.initializers])
    del graph.node[:]
    graph.node.extend(nodes)
    for node in graph.node:
        node.doc_string = ""
    graph.doc_string = ""
    del graph.value_info[:]
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", QDQ_OPSET)])
    model.ir_version = max(model.ir_version, 10)
    model.producer_name = "ajpq"
    onnx.checker.check_model(model, full_check=True)
    return model


def compare_logits(got: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """Max |logit difference| (absolute and relative to the expected logits' range) and argmax agreement."""
    diff = float(np.abs(got - expected).max()) if got.size else 0.0
    span = float(expected.max() - expected.min()) if expected.size else 0.0
    return {
        "abs": diff,
        "logit_range": span,
        "relative": diff / span if span > 0 else diff,
        "argmax_agreement": float((got.argmax(1) == expected.argmax(1)).mean()) if got.size else 1.0,
    }


def export_qdq_onnx(
    header: dict[str, Any],
    payload: bytes,
    slim: nn.Module,
    simulated: nn.Module,
    calibration: torch.Tensor,
    path: str | Path,
    *,
    tolerance: float = QDQ_TOLERANCE,
) -> dict[str, Any]:
    """Write the QDQ ONNX file of an artifact after checking onnxruntime's logits against the simulated model.

    Returns ``{"bytes", "max_abs_logit_diff": {"abs", "logit_range", "relative", "argmax_agreement"}, "layers":
    {name: weight type}}``.

    Raises:
        OnnxExportError: onnxruntime's logits differ from the simulated model's by more than ``tolerance`` of
            their range on the calibration images; nothing is written.
    """
    model = qdq_model(header, payload, slim)
    data = model.SerializeToString()
    got = run_logits(session(data), calibration)
    with torch.no_grad():
        expected = simulated.cpu().eval()(calibration.cpu()).numpy()
    difference = compare_logits(got, expected)
    if not difference["relative"] <= tolerance:
        raise OnnxExportError(
            f"the QDQ ONNX model's onnxruntime logits differ from the simulated model's by "
            f"{difference['relative']:.1%} of their range on {len(calibration)} calibration images (allowed "
            f"{tolerance:.1%}); no ONNX file was written (try --onnx-float)"
        )
    atomic_write_bytes(path, data)
    policy = policy_from_dict(header["policy"], "artifact policy")
    types = {name: weight_type_name(int(layer.weight_bits.max())) for name, layer in policy.layers.items()}
    return {"bytes": len(data), "max_abs_logit_diff": difference, "layers": types}


def write_onnx(
    artifact: Any,
    calibration: torch.Tensor,
    qdq_path: str | Path | None,
    float_path: str | Path | None,
) -> dict[str, Any]:
    """Write the ONNX files an export asks for (QDQ and/or float) of a :class:`~ajpq.artifact.CompressedArtifact`;
    the report entries ``onnx``, ``onnx_bytes``, ``onnx_max_abs_logit_diff``, ``onnx_weight_types``, ``onnx_float``,
    ``onnx_float_bytes``, ``onnx_float_max_abs_diff`` for the files written."""
    report: dict[str, Any] = {}
    if qdq_path is not None:
        result = export_qdq_onnx(
            artifact.header, artifact.payload, artifact.slim, artifact.simulated, calibration, qdq_path
        )
        report["onnx"] = str(qdq_path)
        report["onnx_bytes"] = result["bytes"]
        report["onnx_max_abs_logit_diff"] = result["max_abs_logit_diff"]
        report["onnx_weight_types"] = result["layers"]
    if float_path is not None:
        shape = tuple(artifact.header["model"]["input_shape"])
        report["onnx_float_max_abs_diff"] = export_float_onnx(artifact.slim, shape, float_path)
        report["onnx_float"] = str(float_path)
        report["onnx_float_bytes"] = Path(float_path).stat().st_size
    return report


def onnx_summary(report: dict[str, Any], artifact_bytes: int) -> list[str]:
    """The lines an export prints about its ONNX files: sizes next to the artifact's, and the checks."""
    lines = []
    if "onnx" in report:
        diff = report["onnx_max_abs_logit_diff"]
        types = sorted(set(report["onnx_weight_types"].values()))
        lines.append(
            f"wrote {report['onnx']} (QDQ, opset {QDQ_OPSET}, {'/'.join(types)} weights): {report['onnx_bytes']:,} "
            f"bytes, {report['onnx_bytes'] / max(artifact_bytes, 1):.2f}x the artifact's {artifact_bytes:,}; "
            f"onnxruntime vs simulated max |logit diff| {diff['relative']:.2e} of the logit range (allowed "
            f"{QDQ_TOLERANCE:.0e}), argmax agreement {diff['argmax_agreement']:.4f}"
        )
    if "onnx_float" in report:
        lines.append(
            f"wrote {report['onnx_float']} (float, opset {FLOAT_OPSET}): {report['onnx_float_bytes']:,} bytes, "
            f"{report['onnx_float_bytes'] / max(artifact_bytes, 1):.2f}x the artifact's; onnxruntime max |logit "
            f"diff| {report['onnx_float_max_abs_diff']:.2e}"
        )
    return lines


__all__ = [
    "FLOAT_OPSET",
    "QDQ_OPSET",
    "QDQ_TOLERANCE",
    "OnnxExportError",
    "compare_logits",
    "export_float_onnx",
    "export_fp32_onnx",
    "export_qdq_onnx",
    "onnx_summary",
    "qdq_model",
    "require_onnx",
    "run_logits",
    "session",
    "weight_type_name",
    "write_onnx",
]
