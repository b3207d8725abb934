"""Benchmark of the compressed artifact: bytes on disk and CPU latency of the slim model next to FP32.

Two cases, each at a policy that removes the less important half of every prunable channel group and gives the
kept channels 4-bit weights and 8-bit activations:

* LeNet-5 on Fashion-MNIST: short FP32 pretraining, short quantization-aware fine-tuning, export; accuracies are
  on the Fashion-MNIST test split.
* ResNet-20 on CIFAR-shaped random tensors (3x32x32, 10 classes, untrained weights with randomized BatchNorm
  statistics): sizes, latency and the slim-vs-simulated logit match only (no accuracy).

Latency: CPU, ``torch.inference_mode``, warm-up, the two models timed alternately, median of the repeats.

    python experiments/bench_export.py --out bench_export.json
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ajpq.analysis import analyze_model
from ajpq.artifact import build_artifact, load_compressed, read_artifact
from ajpq.data import load_dataset
from ajpq.io import atomic_write_json
from ajpq.latency import latency_report
from ajpq.models import build_model
from ajpq.policy import Policy, validate_policy
from ajpq.qat import finetune, finetune_config
from ajpq.train import TrainConfig, evaluate_accuracy, seed_everything, train_model


def half_policy(analysis, weight_bits: int = 4, activation_bits: int = 8) -> Policy:
    """Remove the less important half of each prunable group; ``weight_bits`` on the kept channels."""
    policy = Policy.uniform(analysis, weight_bits, activation_bits)
    for group in analysis.groups:
        if not group.prunable:
            continue
        removed = group.order[group.size // 2 :]
        for member in group.members:
            bits = np.full(group.size, weight_bits)
            bits[np.isin(analysis.out_root[member], removed)] = 0
            policy.layers[member].weight_bits = bits
    return validate_policy(policy, analysis)


def state_dict_bytes(model: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def case_report(name, model, analysis, policy, calibration, input_shape, tmp: Path, extra=None, activation_ranges=None):
    artifact = build_artifact(
        model,
        analysis,
        policy,
        calibration,
        model_name=name,
        input_shape=input_shape,
        num_classes=10,
        activation_ranges=activation_ranges,  # fine-tuning's learned ranges, so the artifact is the model it scored
    )
    path = tmp / f"{name}.ajpq"
    artifact.write(path)
    read = read_artifact(path)
    fp32_params = sum(p.numel() for p in model.parameters())
    slim_params = sum(p.numel() for p in artifact.slim.parameters())
    metrics = artifact.header["metrics"]
    return {
        "model": name,
        "fp32_state_dict_bytes": state_dict_bytes(model),
        "fp32_params": fp32_params,
        "slim_params": slim_params,
        "artifact_file_bytes": read.file_bytes,
        "artifact_payload_bytes": read.payload_bytes,
        "artifact_header_bytes": read.header_bytes,
        "cost_model_bytes": metrics["size_bits"] / 8,
        "compression_rate_cost_model": metrics["compression_rate"],
        "max_abs_logit_diff_relative": metrics["max_abs_logit_diff"]["relative"],
        **(extra or {}),
    }


def lenet5_case(args, tmp: Path) -> dict:
    splits = load_dataset("fashion-mnist", data_dir=args.data_dir)
    generator = seed_everything(0)
    model = build_model("lenet5", splits.input_shape, splits.num_classes)
    start = time.perf_counter()
    train_model(
        model, splits.train, TrainConfig(epochs=args.pretrain_epochs, lr=0.02), generator=generator, progress=False
    )
    analysis = analyze_model(model, splits.input_shape, model_name="lenet5")
    policy = half_policy(analysis)
    calibration = next(splits.train.batches(256))[0]
    tuned = finetune(
        model,
        analysis,
        policy,
        splits.train,
        calibration,
        finetune_config(epochs=args.finetune_epochs),
        report={"test": splits.test},
        progress=False,
    )
    train_seconds = time.perf_counter() - start
    report = case_report(
        "lenet5",
        tuned.model,
        analysis,
        policy,
        calibration,
        splits.input_shape,
        tmp,
        extra={
            "data": "fashion-mnist (test split)",
            "fp32_test_accuracy": evaluate_accuracy(model, splits.test),
            "compressed_test_accuracy_before_finetune": tuned.accuracy_before["test"],
            "compressed_test_accuracy_after_finetune": tuned.accuracy_after["test"],
            "pretrain_epochs": args.pretrain_epochs,
            "finetune_epochs": args.finetune_epochs,
            "train_seconds": train_seconds,
        },
        activation_ranges=tuned.activation_ranges,
    )
    slim = load_compressed(tmp / "lenet5.ajpq")
    report["artifact_test_accuracy"] = evaluate_accuracy(slim, splits.test)
    return report


def resnet20_case(args, tmp: Path) -> dict:
    torch.manual_seed(0)
    input_shape = (3, 32, 32)
    model = build_model("resnet20", input_shape, 10).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    analysis = analyze_model(model, input_shape, model_name="resnet20")
    policy = half_policy(analysis)
    calibration = torch.randn(256, *input_shape)
    return case_report(
        "resnet20",
        model,
        analysis,
        policy,
        calibration,
        input_shape,
        tmp,
        extra={"data": "CIFAR-shaped random tensors (3x32x32), untrained weights; no accuracy"},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_export.json", help="JSON report to write")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the usual locations)")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50, help="timed passes per model and batch size")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the latency measurement")
    args = parser.parse_args()
    os.environ.setdefault("AJPQ_NO_PROGRESS", "1")
    tmp = Path(args.out).resolve().parent / "bench_export_artifacts"
    tmp.mkdir(parents=True, exist_ok=True)
    results = [lenet5_case(args, tmp), resnet20_case(args, tmp)]
    torch.set_num_threads(args.threads)
    for report in results:
        case = report["model"]
        slim = load_compressed(tmp / f"{case}.ajpq")
        shape = tuple(slim.ajpq_header["model"]["input_shape"])
        fp32 = build_model(case, shape, 10)
        report["latency_ms"] = latency_report(slim, fp32, shape, repeats=args.repeats)
        report["speedup_batch1"] = report["latency_ms"]["fp32_batch1"] / report["latency_ms"]["batch1"]
        report["speedup_batch64"] = report["latency_ms"]["fp32_batch64"] / report["latency_ms"]["batch64"]
    meta = {"threads": args.threads, "torch": torch.__version__, "cpu_count": os.cpu_count()}
    atomic_write_json(args.out, {"meta": meta, "results": results})
    print(f"CPU latency with {args.threads} thread(s), median of {args.repeats} (torch {torch.__version__})")
    print(
        f"{'model':<9} {'fp32 sd bytes':>13} {'artifact':>9} {'payload':>8} {'header':>7} {'ratio':>6} "
        f"{'b1 ms':>7} {'fp32 b1':>8} {'b64 ms':>7} {'fp32 b64':>8} {'acc':>7}"
    )
    for r in results:
        lat = r["latency_ms"]
        acc = r.get("artifact_test_accuracy")
        print(
            f"{r['model']:<9} {r['fp32_state_dict_bytes']:>13,} {r['artifact_file_bytes']:>9,} "
            f"{r['artifact_payload_bytes']:>8,} {r['artifact_header_bytes']:>7,} "
            f"{r['fp32_state_dict_bytes'] / r['artifact_file_bytes']:>5.1f}x {lat['batch1']:>7.3f} "
            f"{lat['fp32_batch1']:>8.3f} {lat['batch64']:>7.2f} {lat['fp32_batch64']:>8.2f} "
            f"{'-' if acc is None else f'{acc:.4f}':>7}"
        )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from ajpq.logs import setup_logging

    setup_logging()  # ajpq's progress messages on stderr, as the CLI prints them
    raise SystemExit(main())
