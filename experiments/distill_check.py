"""Does distilling from the FP32 model help or hurt a method's fine-tuning? Re-tunes a finished ``ajpq compare``.

Every result of the compare folder (``compare.csv`` and one run folder per method and budget) is fine-tuned again with
the compare's own recipe (epochs, learning rate, seed, the method's own weights for OLMP and ADMM, one thread, as
``ajpq compare --backend processes`` runs it on 2 cores) with distillation switched the other way, and both test
accuracies are reported side by side. JSON on stdout, a markdown table on stderr.

    python experiments/distill_check.py --compare runs/bench_quality/lenet5/1_32_1_64_1_100__seed0
    python experiments/distill_check.py --compare DIR --methods opq admm --budgets 1/64
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ajpq.compare import CompareConfig, finetune_result, run_folder_name, run_result
from ajpq.workspace import open_workspace


def retune(config: CompareConfig, workspace: Any, run: Path, distill: bool) -> dict[str, float]:
    """Test and validation accuracy after the compare's fine-tuning of ``run``'s best policy, with ``distill``."""
    policy, model = run_result(workspace, run)
    tuned = finetune_result(config, workspace, policy, model, workspace.calibration_images(), distill)
    return {"val": tuned.accuracy_after["val"], "test": tuned.accuracy_after["test"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", required=True, help="a finished ajpq compare folder (with compare.csv)")
    parser.add_argument("--methods", nargs="*", default=None, help="only these methods (default: every row)")
    parser.add_argument("--budgets", nargs="*", default=None, help="only these budgets, as compare.csv labels them")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (compare's workers use 1 on 2 cores)")
    args = parser.parse_args(argv)
    folder = Path(args.compare)
    torch.set_num_threads(args.threads)
    values = yaml.safe_load((folder / "compare_config.yaml").read_text())["default"]
    config = CompareConfig.from_dict(values)
    workspace = open_workspace(config.workspace, progress=False)
    with (folder / "compare.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("test_after")]
    results = []
    for row in rows:
        method, budget = row["method"], row["budget"]
        if (args.methods and method not in args.methods) or (args.budgets and budget not in args.budgets):
            continue
        run = folder / run_folder_name(method, budget)
        started = time.perf_counter()
        other = retune(config, workspace, run, not config.distill)
        label = "labels only" if config.distill else "distilled"
        results.append(
            {
                "method": method,
                "budget": budget,
                "compare_recipe": "distilled" if config.distill else "labels only",
                "test_compare": float(row["test_after"]),
                "test_other": other["test"],
                "other_recipe": label,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(
            f"distill_check: {method} {budget}: {float(row['test_after']):.4f} -> {other['test']:.4f}", file=sys.stderr
        )
    print("| method | budget | test after, distilled | test after, labels only |", file=sys.stderr)
    print("|---|---|---:|---:|", file=sys.stderr)
    for r in results:
        distilled, labels = (
            (r["test_compare"], r["test_other"]) if config.distill else (r["test_other"], r["test_compare"])
        )
        print(f"| {r['method']} | {r['budget']} | {distilled:.4f} | {labels:.4f} |", file=sys.stderr)
    print(json.dumps({"compare": str(folder), "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    from ajpq.logs import setup_logging

    setup_logging()
    raise SystemExit(main())
