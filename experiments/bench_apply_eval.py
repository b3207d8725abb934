"""Benchmark: applying a mixed-precision policy and evaluating it, against plain FP32 evaluation.

Target (foundation issue): apply + evaluate LeNet-5 on 2,000 Fashion-MNIST validation images in at most 1.2x the time
of the FP32 evaluation of the same images. Runs interleave both measurements and report medians, so background load
affects both sides alike.

    python experiments/bench_apply_eval.py [--model lenet5 --dataset fashion-mnist --val-size 2000 --repeats 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from ajpq.policy import Policy, validate_policy
from ajpq.train import evaluate_accuracy
from ajpq.workspace import WorkspaceSpec, open_workspace


def random_policy(workspace, rng: np.random.Generator) -> Policy:
    """Mixed 1..8 bits with about 30% of each prunable group's channels removed (coupled channels agree)."""
    analysis = workspace.analysis
    policy = Policy.uniform(analysis)
    for group in analysis.groups:
        removed = np.zeros(group.size, dtype=bool)
        if group.prunable:
            removed[group.order[int(0.7 * group.size) :]] = True
        for member in group.members:
            bits = rng.integers(1, 9, size=analysis.layer(member).out_channels)
            bits[removed[analysis.out_root[member]]] = 0
            policy.layers[member].weight_bits = bits
    for layer in policy.layers.values():
        layer.activation_bits = int(rng.choice([4, 6, 8]))
    return validate_policy(policy, analysis)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--val-size", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    workspace = open_workspace(
        WorkspaceSpec(model=args.model, dataset=args.dataset, val_size=args.val_size, device=args.device)
    )
    val = workspace.splits.val
    start = time.perf_counter()
    simulated = workspace.simulated
    setup_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    policies = [random_policy(workspace, rng) for _ in range(args.repeats)]
    evaluate_accuracy(workspace.model, val, workspace.device)  # warm-up
    evaluate_accuracy(simulated.apply(policies[0]), val, workspace.device)

    fp32_times, policy_times, apply_times = [], [], []
    for policy in policies:
        start = time.perf_counter()
        evaluate_accuracy(workspace.model, val, workspace.device)
        fp32_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        module = simulated.apply(policy)
        applied = time.perf_counter()
        evaluate_accuracy(module, val, workspace.device)
        policy_times.append(time.perf_counter() - start)
        apply_times.append(applied - start)

    fp32 = statistics.median(fp32_times)
    with_policy = statistics.median(policy_times)
    result = {
        "model": args.model,
        "dataset": args.dataset,
        "images": len(val),
        "device": str(workspace.device),
        "threads": torch.get_num_threads(),
        "fp32_eval_ms": fp32 * 1e3,
        "apply_ms": statistics.median(apply_times) * 1e3,
        "apply_plus_eval_ms": with_policy * 1e3,
        "ratio": with_policy / fp32,
        "one_time_setup_ms": setup_s * 1e3,
        "target_ratio": 1.2,
    }
    print(
        f"{args.model}/{args.dataset}, {len(val)} validation images, {result['device']}, "
        f"{result['threads']} threads, median of {args.repeats}:\n"
        f"  FP32 evaluation            {result['fp32_eval_ms']:8.1f} ms\n"
        f"  apply policy               {result['apply_ms']:8.1f} ms\n"
        f"  apply policy + evaluation  {result['apply_plus_eval_ms']:8.1f} ms\n"
        f"  ratio                      {result['ratio']:8.3f}  (target <= 1.2)\n"
        f"  one-time set-up (fold BN, calibrate) {result['one_time_setup_ms']:.1f} ms"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    from ajpq.logs import setup_logging

    setup_logging()  # ajpq's progress messages on stderr, as the CLI prints them
    main()
