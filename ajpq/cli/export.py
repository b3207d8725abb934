"""``ajpq export-model`` (the really compressed model: a .ajpq artifact, optionally ONNX) and the ``--artifact``
branch of ``ajpq evaluate`` (accuracy, sizes and CPU latency of an artifact)."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ajpq.artifact import build_artifact
from ajpq.cli.common import add_weights, check_out, open_from_args, print_json
from ajpq.errors import ConfigError, PolicyError
from ajpq.evaluation import evaluate_artifact
from ajpq.logs import log
from ajpq.onnx_export import onnx_summary, require_onnx, write_onnx
from ajpq.policy import Policy, load_policy
from ajpq.train import evaluate_accuracy
from ajpq.workspace import SPEC_KEYS, Workspace, WorkspaceSpec


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    export = subparsers.add_parser(
        "export-model",
        parents=[common],
        help="write the really compressed model (.ajpq artifact, optionally ONNX)",
        description="Remove the 0-bit channels physically (coupled layers included), fold BatchNorm, pack each "
        "channel's weights at its own bit width and write a checksummed .ajpq artifact that "
        "`ajpq.load_compressed` turns back into a slim nn.Module. The payload is the cost model's size_bits/8.",
    )
    export.add_argument(
        "--policy", default=None, help="policy JSON (default: the policy embedded in a `finetune` checkpoint)"
    )
    add_weights(export, "FP32 or fine-tuned checkpoint (default: cached reference)")
    export.add_argument("--out", required=True, help="artifact to write (e.g. model.ajpq)")
    export.add_argument(
        "--onnx",
        default=None,
        metavar="PATH",
        help="also write the model as QDQ ONNX (opset 21): integer weights (int4 for layers of <= 4 bits, else "
        "int8) with per-channel scales, activations as QuantizeLinear/DequantizeLinear at the policy's bits",
    )
    export.add_argument(
        "--onnx-float",
        default=None,
        metavar="PATH",
        help="also write the slim model as float ONNX (opset 17, quantization as Div/Round/Clip/Mul) for runtimes "
        "without Q/DQ support",
    )
    export.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    export.set_defaults(handler=run_export_model)


def command_policy(args: argparse.Namespace, workspace: Workspace) -> Policy | None:
    """``--policy``, or else the policy a ``finetune`` checkpoint embeds (what it was fine-tuned with), or None;
    a ``--policy`` other than the embedded one gets a note."""
    embedded = workspace.embedded_policy()
    if args.policy:
        policy = load_policy(args.policy, workspace.analysis)
        if embedded is not None:
            same = all(
                (embedded.layers[n].weight_bits == p.weight_bits).all()
                and embedded.layers[n].activation_bits == p.activation_bits
                for n, p in policy.layers.items()
            )
            if not same:
                log(f"note: {args.policy} differs from the policy {args.weights} was fine-tuned with")
        return policy
    if embedded is not None:
        log(f"using the policy embedded in {args.weights}")
    return embedded


def run_export_model(args: argparse.Namespace) -> int:
    out = check_out(args.out, "model.ajpq")
    if args.onnx or args.onnx_float:
        require_onnx()
    workspace = open_from_args(args)
    policy = command_policy(args, workspace)
    if policy is None:
        raise PolicyError(
            "no --policy given and the weights hold no fine-tuning policy; pass --policy P (or --weights of a "
            "checkpoint written by `ajpq finetune`)"
        )
    ranges = workspace.activation_ranges(policy)
    artifact = build_artifact(
        workspace.model,
        workspace.analysis,
        policy,
        workspace.calibration_images(),
        model_name=args.model,
        input_shape=workspace.splits.input_shape,
        num_classes=workspace.splits.num_classes,
        dataset=workspace.splits.name,
        activation_ranges=ranges,
    )
    metrics = artifact.header["metrics"]
    metrics["accuracy"] = {
        "val": evaluate_accuracy(artifact.slim, workspace.splits.val),
        "test": evaluate_accuracy(artifact.slim, workspace.splits.test),
    }
    report_onnx = write_onnx(artifact, workspace.calibration_images(), args.onnx, args.onnx_float)
    artifact.write(out)
    header_bytes = len(artifact.to_bytes()) - len(artifact.payload)
    report: dict[str, Any] = {
        "out": str(out),
        "file_bytes": header_bytes + len(artifact.payload),
        "payload_bytes": len(artifact.payload),
        "header_bytes": header_bytes,
        "expected_payload_bytes": metrics["expected_payload_bytes"],
        "accuracy": metrics["accuracy"],
        "max_abs_logit_diff": metrics["max_abs_logit_diff"],
        "size_bits": metrics["size_bits"],
        "compression_rate": metrics["compression_rate"],
    }
    report.update(report_onnx)
    if args.json:
        print_json(report)
        return 0
    print(
        f"wrote {out}: {report['file_bytes']:,} bytes = payload {report['payload_bytes']:,} (cost model "
        f"{report['expected_payload_bytes']:,.0f}) + header {header_bytes:,}; "
        f"{metrics['compression_rate']:.2f}x smaller than FP32"
    )
    print(
        f"test accuracy {metrics['accuracy']['test']:.4f} (val {metrics['accuracy']['val']:.4f}); slim vs simulated "
        f"max |logit diff| {metrics['max_abs_logit_diff']['relative']:.2e} of the logit range"
    )
    for line in onnx_summary(report, report["file_bytes"]):
        print(line)
    return 0


def run_evaluate_artifact(args: argparse.Namespace) -> int:
    """``ajpq evaluate --artifact A``: accuracy, file/payload/header bytes, CPU latency next to FP32."""
    if getattr(args, "policy", None):
        raise ConfigError("--policy and --artifact exclude each other: the artifact carries its policy")
    spec = WorkspaceSpec.from_dict({key: getattr(args, key) for key in SPEC_KEYS if hasattr(args, key)})
    result = evaluate_artifact(args.artifact, spec, args.split)
    if args.json:
        print_json(result.as_dict())
        return 0
    latency = result.latency_ms
    print(f"artifact {args.artifact} ({result.name}) on {result.dataset}/{args.split}: accuracy {result.accuracy:.4f}")
    print(f"file {result.file_bytes:,} bytes = payload {result.payload_bytes:,} + header {result.header_bytes:,}")
    print(
        f"CPU latency ({torch.get_num_threads()} threads, median): batch 1 {latency['batch1']:.3f} ms "
        f"(FP32 {latency['fp32_batch1']:.3f} ms), batch 64 {latency['batch64']:.3f} ms "
        f"(FP32 {latency['fp32_batch64']:.3f} ms)"
    )
    return 0
