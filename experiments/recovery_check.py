"""Does a recovery setting help or hurt a method's fine-tuning? Re-tunes finished ``ajpq compare`` folders.

Every result of each compare folder (``compare.csv`` and one run folder per method and budget) is fine-tuned again
with the compare's own recipe (epochs, learning rate, seed, the method's own weights for OLMP and ADMM, one thread, as
``ajpq compare --backend processes`` runs it on 2 cores) with one setting switched the other way: ``distill``
(soft targets from the FP32 model) or ``learn_ranges`` (activation ranges trained with the weights, ``ajpq
finetune``'s default, or calibrated after every epoch; a compare folder records which it used); ``none`` re-runs the
recipe unchanged, to see the re-run's own noise. The searches are not re-run. Both test accuracies are reported side
by side, and with several folders (one per seed) the median per method and budget. JSON on stdout, markdown tables
on stderr.

    python experiments/recovery_check.py --compare runs/bench_quality/lenet5/1_32_1_64_1_100__seed0
    python experiments/recovery_check.py --switch learn_ranges --compare runs/bench_quality/lenet5/BOPs1_256__seed*
    python experiments/recovery_check.py --compare DIR --methods opq admm --budgets 1/64
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ajpq.compare import CompareConfig, finetune_result, run_folder_name, run_result
from ajpq.errors import AJPQError
from ajpq.workspace import open_workspace

SWITCHES = ("distill", "learn_ranges", "none")


def recipe_name(config: CompareConfig) -> str:
    """The recovery settings of ``config`` in words, e.g. ``distilled, learned ranges``."""
    return ", ".join(
        ["distilled" if config.distill else "labels only"] + (["learned ranges"] if config.learn_ranges else [])
    )


def switched(config: CompareConfig, switch: str) -> CompareConfig:
    """``config`` with the recovery setting ``switch`` turned the other way (``none``: unchanged)."""
    if switch == "distill":
        return dataclasses.replace(config, distill=not config.distill)
    if switch == "learn_ranges":
        return dataclasses.replace(config, learn_ranges=not config.learn_ranges)
    return config


def read_compare(folder: Path) -> tuple[CompareConfig, list[dict[str, str]]]:
    """A finished compare's configuration and its rows that have a result, or an :class:`AJPQError` saying what is
    missing."""
    config_path, table_path = folder / "compare_config.yaml", folder / "compare.csv"
    for path in (config_path, table_path):
        if not path.is_file():
            raise AJPQError(f"{folder} is not a finished ajpq compare folder: {path.name} is missing")
    values = yaml.safe_load(config_path.read_text())
    if not isinstance(values, dict) or not isinstance(values.get("default"), dict):
        raise AJPQError(f"{config_path} has no `default:` block; is it a compare folder's config?")
    # compare writes every setting; a folder without learn_ranges predates it and calibrated its ranges
    config = CompareConfig.from_dict({"learn_ranges": False, **values["default"]})
    with table_path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("test_after")]
    return config, rows


def retune(config: CompareConfig, workspace: Any, run: Path, switch: str) -> dict[str, Any]:
    """Accuracy after the compare's fine-tuning of ``run``'s best policy with ``switch`` turned, and both recipes."""
    policy, model = run_result(workspace, run)
    own, other = config, switched(config, switch)
    tuned = finetune_result(other, workspace, policy, model, workspace.calibration_images())
    return {
        "compare_recipe": recipe_name(own),
        "other_recipe": recipe_name(other),
        "val": tuned.accuracy_after["val"],
        "test": tuned.accuracy_after["test"],
    }


def check_folder(
    folder: Path, switch: str, methods: list[str] | None, budgets: list[str] | None
) -> list[dict[str, Any]]:
    """One compare folder's rows, each re-tuned with ``switch`` turned."""
    config, rows = read_compare(folder)
    workspace = open_workspace(config.workspace, progress=False)
    results = []
    for row in rows:
        method, budget = row["method"], row["budget"]
        if (methods and method not in methods) or (budgets and budget not in budgets):
            continue
        started = time.perf_counter()
        tuned = retune(config, workspace, folder / run_folder_name(method, budget), switch)
        results.append(
            {
                "compare": str(folder),
                "method": method,
                "budget": budget,
                "compare_recipe": tuned["compare_recipe"],
                "other_recipe": tuned["other_recipe"],
                "test_compare": float(row["test_after"]),
                "test_other": tuned["test"],
                "val_compare": float(row["val_after"]),
                "val_other": tuned["val"],
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(
            f"recovery_check: {folder.name} {method} {budget}: {float(row['test_after']):.4f} -> "
            f"{tuned['test']:.4f} ({tuned['other_recipe']})",
            file=sys.stderr,
        )
    return results


def medians(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and budget (in first-seen order): the median test accuracy of both recipes over the folders."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    return [
        {
            "method": method,
            "budget": budget,
            "runs": len(group),
            "test_compare": statistics.median(r["test_compare"] for r in group),
            "test_other": statistics.median(r["test_other"] for r in group),
            "changes": [round(100 * (r["test_other"] - r["test_compare"]), 2) for r in group],
        }
        for (method, budget), group in groups.items()
    ]


def markdown(results: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
    if not results:
        return "no rows matched\n"
    lines = [
        "| compare | method | budget | compare's recipe | test after | other recipe | test after | change (points) |",
        "|---|---|---|---|---:|---|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {Path(r['compare']).name} | {r['method']} | {r['budget']} | {r['compare_recipe']} | "
            f"{r['test_compare']:.4f} | {r['other_recipe']} | {r['test_other']:.4f} | "
            f"{100 * (r['test_other'] - r['test_compare']):+.2f} |"
        )
    if len({r["compare"] for r in results}) > 1:
        lines += ["", "| method | budget | runs | median, compare's recipe | median, other | per run (points) |"]
        lines.append("|---|---|---:|---:|---:|---|")
        for m in summary:
            changes = ", ".join(f"{c:+.2f}" for c in m["changes"])
            lines.append(
                f"| {m['method']} | {m['budget']} | {m['runs']} | {m['test_compare']:.4f} | {m['test_other']:.4f} | "
                f"{changes} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--compare", nargs="+", required=True, help="finished ajpq compare folders (compare.csv)")
    parser.add_argument("--switch", choices=SWITCHES, default="distill", help="the setting to turn (default distill)")
    parser.add_argument("--methods", nargs="*", default=None, help="only these methods (default: every row)")
    parser.add_argument("--budgets", nargs="*", default=None, help="only these budgets, as compare.csv labels them")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (compare's workers use 1 on 2 cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        for folder in args.compare:  # every folder is checked before hours of fine-tuning start
            read_compare(Path(folder))
        results = [r for f in args.compare for r in check_folder(Path(f), args.switch, args.methods, args.budgets)]
    except AJPQError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = medians(results)
    print(markdown(results, summary), end="", file=sys.stderr)
    print(json.dumps({"switch": args.switch, "rows": results, "medians": summary}, indent=2))
    return 0


if __name__ == "__main__":
    from ajpq.logs import setup_logging

    setup_logging()
    raise SystemExit(main())
