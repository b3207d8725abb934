"""Proxy fidelity: does the search's score rank policies as `ajpq finetune` will?

A random search (AJPQ's own action space, projected onto the budget, as ``--method random``) evaluates a pool of
policies with the plain score; ``--policies`` of them are picked at evenly spaced quantiles of that score, so they
span its range. Each picked policy is scored by every proxy (:class:`ajpq.proxy.ProxyOptions`: plain, BatchNorm
re-estimation on B batches, K steps of quantization-aware fine-tuning, both) and then fine-tuned with
:func:`ajpq.qat.finetune` (its defaults: the OPQ recipe, ``--finetune-epochs`` 3) to get its test accuracy.
Reported per proxy: the Spearman rank correlation between score and test accuracy after fine-tuning, the test
same among the better half of the policies (by
accuracy after fine-tuning: the region where a search chooses), the test accuracy after fine-tuning of the policy
the proxy ranks first (what a search would keep), and the proxy's cost per
candidate (seconds and relative to the plain score). The Spearman between validation and test accuracy *after*
fine-tuning is the ceiling a validation-set proxy can reach on these splits (small splits make it low).

    python experiments/proxy_fidelity.py --quick                  # digits_cnn/digits, 8 policies, 1 epoch
    python experiments/proxy_fidelity.py                           # digits_cnn/digits (BatchNorm), 24 policies
    python experiments/proxy_fidelity.py --setting lenet5-fmnist   # LeNet-5/Fashion-MNIST (no BatchNorm)
    python experiments/proxy_fidelity.py --setting resnet20-fmnist --weights resnet20.pt --train-size 10000

JSON on stdout; the markdown table on stderr and in ``--markdown`` when given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ajpq.budget import Budget
from ajpq.data import TensorSplit
from ajpq.envs import CompressionProblem, Episode
from ajpq.predictor import spearman
from ajpq.proxy import ProxyOptions, make_evaluator
from ajpq.qat import finetune, finetune_config
from ajpq.train import evaluate_accuracy, seed_everything
from ajpq.workspace import Workspace, WorkspaceSpec, open_workspace

SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {"model": "digits_cnn", "dataset": "digits", "size_budget": 0.1, "qat_steps": [5, 20]},
    "lenet5-fmnist": {
        "model": "lenet5",
        "dataset": "fashion-mnist",
        "val_size": 2000,
        "size_budget": 1 / 32,
        "qat_steps": [20, 100],
    },
    "resnet20-fmnist": {
        "model": "resnet20",
        "dataset": "fashion-mnist",
        "val_size": 1000,
        "size_budget": 1 / 16,
        "qat_steps": [20],
    },
}


def limit_train(workspace: Workspace, size: int | None) -> Workspace:
    """The workspace with its training split cut to its first ``size`` images (proxies and fine-tuning alike)."""
    train = workspace.splits.train
    if size is None or size >= len(train):
        return workspace
    assert isinstance(train, TensorSplit)
    cut = TensorSplit(train.x[:size], train.y[:size], train.augment_fn)
    return dataclasses.replace(workspace, splits=dataclasses.replace(workspace.splits, train=cut))


def sample_policies(workspace: Workspace, budget: Budget, pool: int, count: int, seed: int) -> list[Any]:
    """``count`` policies at evenly spaced quantiles of the plain score among ``pool`` random-search episodes."""
    fp32 = evaluate_accuracy(workspace.model, workspace.splits.val, workspace.device)
    problem = CompressionProblem(workspace.analysis, make_evaluator(workspace), fp32, budget=budget)
    rng = np.random.default_rng(seed)
    episode = Episode(problem)
    results = []
    for _ in range(pool):
        episode.reset()
        while episode.next_unit is not None:
            episode.begin_unit(rng.uniform(-1.0, 1.0, problem.layer_action_dim))
            while not episode.unit_done:
                episode.assign(int(rng.integers(1, 9)))
        result = episode.finish()
        if result.feasible:
            results.append(result)
    results.sort(key=lambda r: r.accuracy)
    picks = sorted({round(q * (len(results) - 1)) for q in np.linspace(0, 1, count)})
    return [results[i].policy for i in picks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="digits", choices=list(SETTINGS))
    parser.add_argument("--quick", action="store_true", help="digits, 8 policies from 40, 1 fine-tuning epoch")
    parser.add_argument("--weights", default=None, help="FP32 checkpoint (default: the cached reference)")
    parser.add_argument("--policies", type=int, default=24)
    parser.add_argument("--pool", type=int, default=150, help="random-search episodes the policies are drawn from")
    parser.add_argument("--size-budget", type=float, default=None)
    parser.add_argument("--bn-batches", type=int, nargs="+", default=[8])
    parser.add_argument("--qat-steps", type=int, nargs="+", default=None)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=None, help="cut the training split (slow models on CPU)")
    parser.add_argument("--val-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args()
    setting = dict(SETTINGS["digits" if args.quick else args.setting])
    if args.quick:
        args.policies, args.pool, args.finetune_epochs = 8, 40, 1
        setting["qat_steps"] = [5]
        args.bn_batches = [4]
    qat_steps = args.qat_steps if args.qat_steps is not None else setting["qat_steps"]
    size_budget = args.size_budget if args.size_budget is not None else setting["size_budget"]
    val_size = args.val_size if args.val_size is not None else setting.get("val_size")

    spec = WorkspaceSpec(
        model=setting["model"], dataset=setting["dataset"], weights=args.weights, device=args.device, val_size=val_size
    )
    workspace = open_workspace(spec, progress=False)
    workspace = limit_train(workspace, args.train_size)
    has_bn = any(layer.bn_name for layer in workspace.analysis.layers)
    seed_everything(args.seed)
    policies = sample_policies(workspace, Budget(size_budget, None), args.pool, args.policies, args.seed)
    proxies = [ProxyOptions(seed=args.seed)]
    proxies += [ProxyOptions(bn_batches=b, seed=args.seed) for b in args.bn_batches]
    proxies += [ProxyOptions(finetune_steps=k, seed=args.seed) for k in qat_steps]
    proxies += [ProxyOptions(finetune_steps=k, bn_batches=args.bn_batches[0], seed=args.seed) for k in qat_steps[:1]]
    evaluators = {p.describe(): make_evaluator(workspace, p) for p in proxies}
    for evaluate in evaluators.values():
        evaluate(policies[0])  # warm up (first-use set-up is not a per-candidate cost)
    calibration = workspace.calibration_images()
    rows = []
    for index, policy in enumerate(policies):
        row: dict[str, Any] = {"policy": index, "size_ratio": workspace.cost(policy).size_ratio, "scores": {}}
        row["seconds"] = {}
        for name, evaluate in evaluators.items():
            started = time.perf_counter()
            row["scores"][name] = evaluate(policy)
            row["seconds"][name] = time.perf_counter() - started
        started = time.perf_counter()
        tuned = finetune(
            workspace.model,
            workspace.analysis,
            policy,
            workspace.splits.train,
            calibration,
            finetune_config(epochs=args.finetune_epochs),
            report={"test": workspace.splits.test, "val": workspace.splits.val},
            device=workspace.device,
            generator=seed_everything(args.seed),
            progress=False,
        )
        row["test_before"] = tuned.accuracy_before["test"]
        row["test_after"] = tuned.accuracy_after["test"]
        row["val_after"] = tuned.accuracy_after["val"]
        row["finetune_seconds"] = time.perf_counter() - started
        rows.append(row)
        print(f"[{index + 1}/{len(policies)}] {json.dumps(row)}", file=sys.stderr, flush=True)

    after = [r["test_after"] for r in rows]
    plain_cost = float(np.mean([r["seconds"]["plain"] for r in rows]))
    top = [i for i, value in enumerate(after) if value >= float(np.median(after))]
    summary = []
    for name in evaluators:
        scores = [r["scores"][name] for r in rows]
        cost = float(np.mean([r["seconds"][name] for r in rows]))
        summary.append(
            {
                "proxy": name,
                "spearman": spearman(scores, after),
                "spearman_top_half": spearman([scores[i] for i in top], [after[i] for i in top]),
                "picked_test_after": after[int(np.argmax(scores))],
                "seconds_per_candidate": cost,
                "cost_vs_plain": cost / plain_cost,
            }
        )
    ceiling = spearman([r["val_after"] for r in rows], after)
    result = {
        "setting": args.setting if not args.quick else "digits (quick)",
        "model": setting["model"],
        "dataset": setting["dataset"],
        "has_batchnorm": has_bn,
        "size_budget": size_budget,
        "policies": len(rows),
        "pool": args.pool,
        "finetune_epochs": args.finetune_epochs,
        "train_images": len(workspace.splits.train),
        "val_images": len(workspace.splits.val),
        "test_images": len(workspace.splits.test),
        "best_test_after": max(after),
        "spearman_val_after_vs_test_after": ceiling,
        "mean_finetune_seconds": float(np.mean([r["finetune_seconds"] for r in rows])),
        "summary": summary,
        "rows": rows,
    }
    table = [
        f"{result['model']} / {result['dataset']} (BatchNorm: {'yes' if has_bn else 'no'}), size budget "
        f"{size_budget:.4g}, {len(rows)} policies, fine-tuned {args.finetune_epochs} epochs on "
        f"{result['train_images']} images; best test accuracy after fine-tuning {max(after):.4f}; Spearman of "
        f"validation vs test accuracy after fine-tuning (the noise ceiling of any validation proxy): {ceiling:.3f}",
        "",
        "| proxy | Spearman vs test after FT | Spearman, better half | test after FT of its top pick | s / candidate "
        "| x plain |",
        "|---|---|---|---|---|---|",
    ]
    table += [
        f"| {s['proxy']} | {s['spearman']:.3f} | {s['spearman_top_half']:.3f} | {s['picked_test_after']:.4f} | "
        f"{s['seconds_per_candidate']:.3f} | "
        f"{s['cost_vs_plain']:.1f} |"
        for s in summary
    ]
    markdown = "\n".join(table) + "\n"
    print(markdown, file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(markdown, encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from ajpq.logs import setup_logging

    setup_logging()  # ajpq's progress messages on stderr, as the CLI prints them
    torch.set_num_threads(1)
    main()
