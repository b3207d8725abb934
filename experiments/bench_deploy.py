"""Benchmark of what a runtime executes: FP32 ONNX, QDQ ONNX and the .ajpq artifact, on Fashion-MNIST.

For LeNet-5, ResNet-20 and MobileNetV2 (torchvision's, first conv adapted to 1 channel) at 1/16 and 1/32 of the FP32
size, each with the same kind of policy: 4-bit weights and 8-bit activations on the kept channels, and the least
important channels of every prunable group removed (the same fraction in every group, found by bisection on the cost
model) until the size budget is met. These are not searched policies; they are uniform in bits so that the int4
storage of the QDQ file holds the codes without padding.

Training is short (the FP32 reference and the fine-tuning stop after ``--pretrain-steps`` / ``--finetune-steps``
optimizer steps of 128 images), so the accuracies are of briefly trained models; the FP32 references are cached in
the output folder. Per case:

* bytes of the FP32 ONNX file (the uncompressed reference), the float ONNX of the slim model (``--onnx-float``),
  the QDQ ONNX file (``--onnx``) and the artifact;
* test accuracy of the FP32 ONNX, QDQ ONNX (onnxruntime) and artifact (``load_compressed``) on the test split;
* onnxruntime CPU latency (graph optimizations on, ``--threads`` intra-op threads) of the FP32 ONNX and the QDQ
  ONNX at batch 1 and 64, the sessions timed alternately in one run, median of ``--repeats``; the QDQ file once
  with onnxruntime's defaults and once with ``session.disable_quant_qdq=1`` (weights dequantized once at load).

    python experiments/bench_deploy.py --out bench_deploy.json           # full
    python experiments/bench_deploy.py --quick --out bench_deploy.json   # CI: LeNet-5 at 1/16, tiny training
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ajpq.analysis import ModelAnalysis, analyze_model
from ajpq.artifact import build_artifact, load_compressed
from ajpq.cost import CostModel
from ajpq.data import DataSplits, load_dataset
from ajpq.io import atomic_write_json
from ajpq.models import build_model
from ajpq.onnx_export import (
    export_float_onnx,
    export_fp32_onnx,
    export_qdq_onnx,
    require_onnx,
    run_logits,
    session,
)
from ajpq.policy import Policy, validate_policy
from ajpq.qat import finetune, finetune_config
from ajpq.train import TrainConfig, evaluate_accuracy, seed_everything, train_model

MODELS = ("lenet5", "resnet20", "mobilenet_v2")
RATES = (16, 32)


def pruned_policy(analysis: ModelAnalysis, keep: float, weight_bits: int = 4, activation_bits: int = 8) -> Policy:
    """``weight_bits`` on the most important ``keep`` fraction of every prunable group's channels, the rest removed."""
    policy = Policy.uniform(analysis, weight_bits, activation_bits)
    for group in analysis.groups:
        if not group.prunable:
            continue
        removed = group.order[max(1, math.ceil(group.size * keep)) :]
        policy.prune_group(analysis, group.id, removed)
    return validate_policy(policy, analysis)


def policy_for_rate(analysis: ModelAnalysis, rate: float, weight_bits: int = 4) -> tuple[Policy, float]:
    """The policy of :func:`pruned_policy` with the largest kept fraction whose compression rate reaches ``rate``."""
    cost = CostModel(analysis)
    low, high = 0.0, 1.0
    if cost.evaluate(pruned_policy(analysis, high, weight_bits)).compression_rate >= rate:
        return pruned_policy(analysis, high, weight_bits), high
    for _ in range(30):
        middle = (low + high) / 2
        if cost.evaluate(pruned_policy(analysis, middle, weight_bits)).compression_rate >= rate:
            low = middle
        else:
            high = middle
    return pruned_policy(analysis, low, weight_bits), low


def reference(name: str, splits: DataSplits, steps: int, folder: Path) -> torch.nn.Module:
    """The FP32 model after ``steps`` training steps, cached in ``folder``."""
    path = folder / f"{name}_fp32_{steps}steps.pt"
    model = build_model(name, splits.input_shape, splits.num_classes)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    generator = seed_everything(0)
    config = TrainConfig(epochs=1, lr=0.02 if name == "lenet5" else 0.05, max_steps=steps)
    train_model(model, splits.train, config, generator=generator, progress=False)
    torch.save(model.state_dict(), path)
    return model.eval()


def onnx_accuracy(runner: Any, splits: DataSplits, test_size: int | None) -> float:
    test = splits.test if test_size is None else splits.test.subset(test_size)  # type: ignore[attr-defined]
    correct = total = 0
    for x, y in test.batches(500):
        logits = run_logits(runner, x, batch_size=500)
        correct += int((logits.argmax(1) == y.numpy()).sum())
        total += len(y)
    return correct / total


def latency(sessions: dict[str, Any], shape: tuple[int, ...], batch: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per run of each session, the sessions run alternately (a load spike hits all alike)."""
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    for runner in sessions.values():
        for _ in range(10):
            runner.run(None, {"input": x})
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(repeats):
        for key, runner in sessions.items():
            start = time.perf_counter()
            runner.run(None, {"input": x})
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) * 1000.0 for key, values in times.items()}


def case(name: str, rate: int, model: torch.nn.Module, splits: DataSplits, args: argparse.Namespace, folder: Path):
    shape = splits.input_shape
    analysis = analyze_model(model, shape, model_name=name)
    policy, keep = policy_for_rate(analysis, rate, args.weight_bits)
    calibration = next(splits.train.batches(256))[0]
    start = time.perf_counter()
    tuned = finetune(
        model,
        analysis,
        policy,
        splits.train,
        calibration,
        finetune_config(epochs=1, max_steps=args.finetune_steps),
        progress=False,
    )
    finetune_seconds = time.perf_counter() - start
    artifact = build_artifact(
        tuned.model,
        analysis,
        policy,
        calibration,
        model_name=name,
        input_shape=shape,
        num_classes=splits.num_classes,
        activation_ranges=tuned.activation_ranges,
    )
    stem = folder / f"{name}_r{rate}_w{args.weight_bits}"
    artifact_path = artifact.write(stem.with_suffix(".ajpq"))
    qdq = export_qdq_onnx(
        artifact.header, artifact.payload, artifact.slim, artifact.simulated, calibration, f"{stem}.qdq.onnx"
    )
    export_float_onnx(artifact.slim, shape, f"{stem}.float.onnx", check=False)
    fp32_bytes = export_fp32_onnx(model, shape, folder / f"{name}_fp32.onnx")
    test_size = args.test_size
    slim = load_compressed(artifact_path)
    test = splits.test if test_size is None else splits.test.subset(test_size)  # type: ignore[attr-defined]
    qdq_data = Path(f"{stem}.qdq.onnx").read_bytes()
    fp32_data = (folder / f"{name}_fp32.onnx").read_bytes()
    accuracy = {
        "fp32_onnx": onnx_accuracy(session(fp32_data), splits, test_size),
        "qdq_onnx": onnx_accuracy(session(qdq_data), splits, test_size),
        "qdq_onnx_folded": onnx_accuracy(_folded(qdq_data), splits, test_size),
        "artifact": evaluate_accuracy(slim, test),
    }
    sessions = {
        "fp32": session(fp32_data, threads=args.threads),
        "qdq": session(qdq_data, threads=args.threads),
        "qdq_folded": _folded(qdq_data, threads=args.threads),
    }
    latency_ms = {
        f"batch{batch}": latency(sessions, shape, batch, args.repeats if batch == 1 else max(5, args.repeats // 4))
        for batch in (1, 64)
    }
    cost = artifact.header["metrics"]
    return {
        "model": name,
        "rate": rate,
        "weight_bits": args.weight_bits,
        "policy": f"{args.weight_bits}-bit weights / 8-bit activations, {keep:.3f} of each prunable group's channels "
        "kept",
        "compression_rate_cost_model": cost["compression_rate"],
        "bytes": {
            "fp32_onnx": fp32_bytes,
            "float_slim_onnx": Path(f"{stem}.float.onnx").stat().st_size,
            "qdq_onnx": qdq["bytes"],
            "artifact": artifact_path.stat().st_size,
        },
        "qdq_weight_types": sorted(set(qdq["layers"].values())),
        "qdq_vs_simulated": qdq["max_abs_logit_diff"],
        "accuracy": accuracy,
        "latency_ms": latency_ms,
        "finetune_seconds": finetune_seconds,
    }


def _folded(data: bytes, threads: int = 0) -> Any:
    """A session with onnxruntime's QDQ fusions off: the weights' DequantizeLinear nodes are folded at load."""
    _, onnxruntime = require_onnx()
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _label(row: dict[str, Any]) -> str:
    return f"1/{row['rate']} w{row.get('weight_bits', 4)}"


def print_tables(results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    print("bytes (QDQ/artifact ratio; target <= 1.5x)")
    print(
        f"{'model':<13}{'policy':>8} "
        f"{'fp32 onnx':>10} {'float slim':>11} {'qdq onnx':>9} {'artifact':>9} {'qdq/art':>8}"
    )
    for r in results:
        b = r["bytes"]
        print(
            f"{r['model']:<13}{_label(r):>8} {b['fp32_onnx']:>10,} {b['float_slim_onnx']:>11,} "
            f"{b['qdq_onnx']:>9,} {b['artifact']:>9,} {b['qdq_onnx'] / b['artifact']:>7.2f}x"
        )
    size = "full test set" if meta.get("test_size") is None else f"first {meta['test_size']} test images"
    print(f"\ntest accuracy ({size}; target |qdq - artifact| <= 0.1 points)")
    print(
        f"{'model':<13}{'policy':>8} {'fp32 onnx':>10} {'qdq onnx':>9} {'qdq fold':>9} {'artifact':>9} {'diff pt':>8}"
    )
    for r in results:
        a = r["accuracy"]
        print(
            f"{r['model']:<13}{_label(r):>8} {a['fp32_onnx']:>10.4f} {a['qdq_onnx']:>9.4f} "
            f"{a['qdq_onnx_folded']:>9.4f} {a['artifact']:>9.4f} {100 * (a['qdq_onnx'] - a['artifact']):>+8.2f}"
        )
    repeats = meta.get("repeats", 100)
    print(
        f"\nonnxruntime CPU latency, ms (median of {repeats} at batch 1, {max(5, repeats // 4)} at 64; "
        f"{meta.get('threads', 1)} thread(s); shared loaded machine, compare ratios within a row only)"
    )
    print(
        f"{'model':<13}{'policy':>8} {'b1 fp32':>8} {'b1 qdq':>8} {'ratio':>6} {'b1 fold':>8} {'ratio':>6} "
        f"{'b64 fp32':>9} {'b64 qdq':>8} {'ratio':>6} {'b64 fold':>9} {'ratio':>6}"
    )
    for r in results:
        one, many = r["latency_ms"]["batch1"], r["latency_ms"]["batch64"]
        print(
            f"{r['model']:<13}{_label(r):>8} {one['fp32']:>8.3f} {one['qdq']:>8.3f} "
            f"{one['qdq'] / one['fp32']:>5.2f}x {one['qdq_folded']:>8.3f} {one['qdq_folded'] / one['fp32']:>5.2f}x "
            f"{many['fp32']:>9.2f} {many['qdq']:>8.2f} {many['qdq'] / many['fp32']:>5.2f}x "
            f"{many['qdq_folded']:>9.2f} {many['qdq_folded'] / many['fp32']:>5.2f}x"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_deploy.json", help="JSON report to write")
    parser.add_argument("--quick", action="store_true", help="LeNet-5 at 1/16 only, tiny training, 1000 test images")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--rates", default=None, help="comma-separated size rates (default: 16,32)")
    parser.add_argument(
        "--weight-bits", type=int, default=4, help="bits of the kept channels' weights (8: int8 integer kernels)"
    )
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the usual locations)")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="FP32 training steps of 128 images")
    parser.add_argument("--finetune-steps", type=int, default=150, help="fine-tuning steps of 128 images")
    parser.add_argument("--repeats", type=int, default=100, help="timed runs per session at batch 1 (64: a quarter)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for the latency")
    parser.add_argument("--test-size", type=int, default=None, help="first N test images (default: all)")
    parser.add_argument("--tables", nargs="+", default=None, metavar="JSON", help="only print the tables of reports")
    args = parser.parse_args()
    if args.tables:
        reports = [json.loads(Path(path).read_text()) for path in args.tables]
        print_tables([row for report in reports for row in report["results"]], reports[0]["meta"])
        return 0
    os.environ.setdefault("AJPQ_NO_PROGRESS", "1")
    require_onnx()
    models, rates = list(MODELS), list(RATES)
    if args.models:
        models = [m.strip() for m in args.models.split(",")]
    if args.rates:
        rates = [int(r) for r in args.rates.split(",")]
    if args.quick:
        models, rates = models[:1] if args.models else ["lenet5"], [16]
        args.pretrain_steps, args.finetune_steps, args.repeats = 60, 10, 20
        args.test_size = args.test_size or 1000
    folder = Path(args.out).resolve().parent / "bench_deploy_artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    splits = load_dataset("fashion-mnist", data_dir=args.data_dir, progress=False)
    results = []
    for name in models:
        start = time.perf_counter()
        model = reference(name, splits, args.pretrain_steps, folder)
        print(f"{name}: FP32 reference ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        for rate in rates:
            start = time.perf_counter()
            results.append(case(name, rate, model, splits, args, folder))
            atomic_write_json(args.out, {"meta": {"partial": True}, "results": results})  # survives an interruption
            print(f"{name} 1/{rate}: done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    import onnxruntime

    meta = {
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "pretrain_steps": args.pretrain_steps,
        "finetune_steps": args.finetune_steps,
        "quick": args.quick,
        "repeats": args.repeats,
        "test_size": args.test_size,
    }
    atomic_write_json(args.out, {"meta": meta, "results": results})
    print_tables(results, meta)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
