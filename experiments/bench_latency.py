"""Validate the latency predictor: predicted against measured latency of exported models.

For ``--policies`` policies spread over the search space (every prunable group keeps a fraction drawn around an
overall level running from ``1 - max_sparsity`` to 1, random weight bits per layer), each policy is exported as an
artifact (``build_artifact``), rebuilt with ``load_compressed`` as a user would, and timed on the target at the
batch size alone (as the table times its layers) and alternately with the FP32 model (for the measured ratio); its
latency predicted by the table (:mod:`ajpq.latency`) is set beside.
Reported: the table's measurement time, the Spearman rank correlation and the median relative error of predicted
against measured milliseconds (targets: >= 0.9 and <= 15%), and every policy's numbers.

    python experiments/bench_latency.py --model lenet5 --dataset fashion-mnist --val-size 2000 --batch 64
    python experiments/bench_latency.py --quick          # digits_cnn, 8 policies, for CI

Writes ``latency_validation.json`` and ``latency_validation.md`` under ``--out``. Timings come from a shared
machine: the predictor is judged by rank and median error, both robust to a few disturbed timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ajpq.analysis import analyze_model
from ajpq.artifact import build_artifact, load_compressed
from ajpq.cost import CostModel
from ajpq.io import atomic_write_json, atomic_write_text
from ajpq.latency import LATENCY_TARGETS, measure_latency, measure_table, paired_latency
from ajpq.models import build_model
from ajpq.policy import Policy
from ajpq.predictor import spearman
from ajpq.workspace import WorkspaceSpec, open_workspace


def spread_policies(analysis, count: int, max_sparsity: float, seed: int) -> list[Policy]:
    """``count`` policies from dense to ``max_sparsity`` pruned, each group jittered around the overall level."""
    rng = np.random.default_rng(seed)
    levels = np.linspace(1.0 - max_sparsity, 1.0, count)
    policies = []
    for level in levels:
        policy = Policy.uniform(analysis, 8, 8)
        for layer in analysis.layers:
            policy.layers[layer.name].weight_bits[:] = rng.integers(1, 9)
        for group in analysis.groups:
            if not group.prunable:
                continue
            keep = float(np.clip(level + rng.uniform(-0.15, 0.15), 1.0 - max_sparsity, 1.0))
            removed = group.size - max(1, round(keep * group.size))
            if removed > 0:
                policy.prune_group(analysis, group.id, group.order[group.size - removed :])
        policies.append(policy)
    return policies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--val-size", type=int, default=None)
    parser.add_argument("--target", default="torch-cpu", choices=LATENCY_TARGETS)
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--policies", type=int, default=30)
    parser.add_argument("--max-sparsity", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8 policies, 10 repeats (CI)")
    parser.add_argument(
        "--random-weights",
        nargs=3,
        type=int,
        metavar=("C", "H", "W"),
        help="time an untrained model of this input shape (latency depends on the shapes only), with random "
        "calibration images: no reference to train (ResNet-20, torchvision's mobilenet_v2)",
    )
    parser.add_argument("--out", default="runs/bench_latency")
    args = parser.parse_args()
    if args.quick:
        args.policies, args.repeats = 8, 10
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.random_weights:
        torch.manual_seed(args.seed)
        shape = tuple(args.random_weights)
        model = build_model(args.model, shape, 10).eval()
        analysis = analyze_model(model, shape, model_name=args.model)
        calibration, num_classes = torch.randn(64, *shape), 10
    else:
        spec = WorkspaceSpec(model=args.model, dataset=args.dataset, val_size=args.val_size, device="cpu")
        workspace = open_workspace(spec, progress=False)
        model, analysis, shape = workspace.model, workspace.analysis, workspace.splits.input_shape
        calibration, num_classes = workspace.calibration_images(), workspace.splits.num_classes
    policies = spread_policies(analysis, args.policies, args.max_sparsity, args.seed)
    results = []
    for batch in args.batch:
        started = time.perf_counter()
        table = measure_table(
            model, analysis, shape, target=args.target, batch=batch, model_name=args.model, progress=False
        )
        table_seconds = time.perf_counter() - started
        cost = CostModel(analysis, latency=table)
        rows = []
        for index, policy in enumerate(policies):
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "model.ajpq"
                build_artifact(
                    model,
                    analysis,
                    policy,
                    calibration,
                    model_name=args.model,
                    input_shape=shape,
                    num_classes=num_classes,
                ).write(path)
                slim = load_compressed(path, model=model)
            # alone, as the table times its layers (alternating two models evicts each other's caches), and paired
            # with FP32 for the ratio (a load spike hits both alike)
            measured = measure_latency(slim, shape, batch, target=args.target, repeats=args.repeats)
            paired, fp32 = paired_latency(slim, model, shape, batch, args.target, args.repeats)
            report = cost.evaluate(policy)
            assert report.latency_ms is not None
            kept = np.mean([(policy.layers[layer.name].weight_bits > 0).mean() for layer in analysis.layers])
            rows.append(
                {
                    "policy": index,
                    "kept_fraction": float(kept),
                    "predicted_ms": report.latency_ms,
                    "measured_ms": measured,
                    "fp32_ms": fp32,
                    "predicted_ratio": report.latency_ms / table.reference_ms,
                    "paired_ms": paired,
                    "measured_ratio": paired / fp32,
                }
            )
            print(
                f"batch {batch} policy {index}: kept {kept:.2f}, predicted {report.latency_ms:.3f} ms, measured "
                f"{measured:.3f} ms (FP32 {fp32:.3f})",
                flush=True,
            )
        errors = [abs(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] for r in rows]
        ratio_errors = [abs(r["predicted_ratio"] - r["measured_ratio"]) / r["measured_ratio"] for r in rows]
        results.append(
            {
                "batch": batch,
                "table_seconds": table_seconds,
                "reference_ms": table.reference_ms,
                "full_slim_ms": table.full_slim_ms,
                "spearman": spearman([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows]),
                "median_relative_error": statistics.median(errors),
                "max_relative_error": max(errors),
                "median_ratio_error": statistics.median(ratio_errors),
                "rows": rows,
            }
        )
    summary = {"model": args.model, "dataset": args.dataset, "target": args.target, "results": results}
    atomic_write_json(out / "latency_validation.json", summary)
    lines = [
        f"# Latency predictor validation: {args.model}, {args.target}, {args.policies} policies",
        "",
        "| batch | table measured in (s) | FP32 ms | unpruned slim ms | Spearman | median rel. error | max rel. error "
        "| median error of the ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['batch']} | {r['table_seconds']:.1f} | {r['reference_ms']:.3f} | {r['full_slim_ms']:.3f} | "
            f"{r['spearman']:.3f} | {r['median_relative_error']:.1%} | {r['max_relative_error']:.1%} | "
            f"{r['median_ratio_error']:.1%} |"
        )
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "latency_validation.md", text)
    print(text)
    print(json.dumps({r["batch"]: round(r["spearman"], 3) for r in results}))


if __name__ == "__main__":
    main()
