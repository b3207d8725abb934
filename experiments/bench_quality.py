"""Is AJPQ's search the best method? Every method at every budget through `ajpq compare`, medians over seeds.

    python experiments/bench_quality.py --quick                 # digits only, a few minutes: what CI can afford
    python experiments/bench_quality.py --out runs/bench_quality  # the README's numbers (hours on 2 CPU cores)
    python experiments/bench_quality.py --suites digits lenet5 --seeds 3 --episodes 300

Suites (full mode):
* ``lenet5``: LeNet-5 on Fashion-MNIST, size budgets 1/32, 1/64, 1/100 (``--part 0``), a BOPs budget 1/256 (part 1)
  and size 1/100 with BOPs 1/300 together (part 2), activation bits and weight sparsity searched in parts 1 and 2;
  ajpq, local (ajpq without its agents) and random on every seed (equal evaluation counts, the same scorer), the
  one-shot and retraining methods
  (uniform, opq, olmp, admm) on the first seed; every result fine-tuned the same (3 epochs).
* ``resnet20``: ResNet-20 on Fashion-MNIST (BatchNorm, residual coupling), size budgets 1/16 and 1/32, one seed.
* ``digits``: digits_cnn on digits, size budgets 0.1 and 0.05, ajpq against local and random search (best
  validation accuracy of the search itself, no fine-tuning), every seed.
* ``lenet5-search`` (asked for by name): LeNet-5 on Fashion-MNIST at 1/64 and 1/100, the same search-only table, 300
  evaluations; with ``--ablations`` also ajpq with ``skip_known`` off (the search before repeats were skipped).

Writes ``bench_quality.json`` (every row, the medians, the wins and losses of ajpq, the best score of each phase per
seed), ``bench_quality.md`` and one learning-curve figure per suite (``curves_SUITE.png``: best-so-far and windowed
mean score against evaluations for ajpq, local and random) in ``--out``, and prints the JSON on stdout. A loss is a
median test accuracy after fine-tuning more than :data:`TIE` below another method's at the same budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ajpq.backends import BackendOptions
from ajpq.compare import CompareConfig, budget_label, compare_budgets, run_compare
from ajpq.io import atomic_write_json, atomic_write_text
from ajpq.runner import run_search
from ajpq.search_config import SearchConfig

TIE = 0.002
"""Accuracy differences up to 0.2 points count as ties."""
SEARCHES = ("ajpq", "local", "random")
"""The searches run on every seed: ajpq, the same search without its agents (local: what the RL adds) and random."""
OTHERS = ("uniform", "opq", "olmp", "admm")
OLMP_ADMM_OPTIONS = {
    "olmp": {"rounds": 2, "population": 4, "iterations": 3, "retrain_epochs": 1, "eval_limit": 1000},
    "admm": {"steps": 2, "admm_epochs": 1, "retrain_epochs": 1, "quant_epochs": 0.5},
}


def suites(quick: bool, episodes: int | None, proxy_steps: int) -> dict[str, list[dict[str, Any]]]:
    """Compare runs per suite: each is a CompareConfig's keys (without seed and out_dir)."""
    proxy = {"episode_finetune_steps": proxy_steps} if proxy_steps else {}
    if quick:
        return {
            "digits-compare": [
                {
                    "model": "digits_cnn",
                    "dataset": "digits",
                    "budgets": [0.1, 0.05],
                    "episodes": episodes or 16,
                    "finetune_epochs": 1,
                    "method_options": {"olmp": {"rounds": 1, "population": 2, "iterations": 2}},
                }
            ],
        }
    lenet = {
        "model": "lenet5",
        "dataset": "fashion-mnist",
        "val_size": 2000,
        "episodes": episodes or 300,
        "finetune_epochs": 3,
        "method_options": OLMP_ADMM_OPTIONS,
    }
    searched = {"search_activation_bits": True, "search_weight_sparsity": True, **proxy}  # parts 1 and 2
    return {
        "lenet5": [
            {**lenet, "budgets": ["1/32", "1/64", "1/100"], "search": proxy},
            {
                **lenet,
                "budgets": [],
                "bops_budgets": ["1/256"],
                "search": searched,
            },
            {  # the target: 100x smaller and 300x fewer BOPs at once
                **lenet,
                "budgets": [],
                "joint_budgets": [["1/100", "1/300"]],
                "search": searched,
            },
        ],
        "resnet20": [
            {
                "model": "resnet20",
                "dataset": "fashion-mnist",
                "val_size": 1000,
                "budgets": ["1/16", "1/32"],
                "episodes": episodes or 100,
                "finetune_epochs": 3,
                "method_options": OLMP_ADMM_OPTIONS,
                "search": proxy,
                "seeds": 1,
            }
        ],
    }


def median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, budget): the median of every numeric column over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if "note" not in row:
            groups.setdefault((row["method"], row["budget"]), []).append(row)
    out = []
    for (method, budget), members in groups.items():
        merged: dict[str, Any] = {"method": method, "budget": budget, "seeds": len(members)}
        for key in members[0]:
            values = [m[key] for m in members if isinstance(m.get(key), int | float) and not isinstance(m[key], bool)]
            if key not in ("method", "budget", "seed") and len(values) == len(members):
                merged[key] = statistics.median(values)
        out.append(merged)
    return out


def verdicts(medians: list[dict[str, Any]], key: str = "test_after") -> list[dict[str, Any]]:
    """For each budget: ajpq's margin over every other method (win, tie within TIE, or loss)."""
    result = []
    for budget in dict.fromkeys(r["budget"] for r in medians):
        at = {r["method"]: r for r in medians if r["budget"] == budget}
        if "ajpq" not in at:
            continue
        for method, row in at.items():
            if method == "ajpq":
                continue
            margin = at["ajpq"][key] - row[key]
            outcome = "win" if margin > TIE else "loss" if margin < -TIE else "tie"
            result.append({"budget": budget, "against": method, "margin": round(margin, 4), "outcome": outcome})
    return result


def run_compare_suite(
    name: str,
    runs: list[dict[str, Any]],
    seeds: list[int],
    out: Path,
    part: int | None = None,
    backend: BackendOptions | None = None,
    seeds_given: bool = False,
) -> dict[str, Any]:
    """Every compare run of the suite on every seed (the one-shot and retraining methods on seed 0 only).

    A run's ``seeds`` limit (ResNet-20's one seed) applies to the default seeds; seeds the user listed
    (``seeds_given``, from ``--seed-list``) all run. Each finished compare run's rows are also kept in ``rows.json``
    in its folder, so that an interrupted benchmark loses only the run it was in."""
    rows: list[dict[str, Any]] = []
    fp32: dict[str, float] = {}
    reference: dict[str, str] = {}
    for index, spec in enumerate(runs):
        if part is not None and index != part:
            continue
        spec = dict(spec)
        limit = spec.pop("seeds", None)
        for seed in seeds if limit is None or seeds_given else [s for s in seeds if s < limit]:
            methods = [*SEARCHES, *OTHERS] if seed == 0 else list(SEARCHES)
            config = CompareConfig.from_dict({**spec, "methods": methods, "seed": seed, "device": "auto"})
            budgets = "_".join(budget_label(b).replace("/", "_").replace(" ", "") for b in compare_budgets(config))
            config.out_dir = str(out / name / f"{budgets}__seed{seed}")
            print(f"bench_quality: {name} seed {seed} budgets {budgets}", file=sys.stderr, flush=True)
            result = run_compare(config, backend)
            fp32 = result["fp32"]
            reference = result.get("reference", {})
            seed_rows = [{**row, "seed": seed} for row in result["rows"]]
            atomic_write_json(Path(config.out_dir) / "rows.json", {"fp32": fp32, "rows": seed_rows})
            rows += seed_rows
    medians = median_rows(rows)
    return {"fp32": fp32, "reference": reference, "rows": rows, "medians": medians, "verdicts": verdicts(medians)}


SEARCH_SUITES: dict[str, dict[str, Any]] = {
    "digits": {"budgets": [0.1, 0.05], "episodes": 100},
    "lenet5-search": {
        "model": "lenet5",
        "dataset": "fashion-mnist",
        "val_size": 2000,
        "budgets": ["1/64", "1/100"],
        "episodes": 300,
    },
}
"""Search-only suites: the best validation score of each search itself (no fine-tuning), every seed."""
ABLATIONS: dict[str, dict[str, Any]] = {
    "ajpq-repeats": {"method": "ajpq", "skip_known": False},
    "ajpq-screen4": {"method": "ajpq", "screen": 4},
}
"""``--ablations``: ajpq with one setting changed, at the same evaluation count: ``skip_known`` off (RL episodes that
reach a recorded policy are evaluated and counted again, as before it existed), and ``screen`` 4 (four proposals
per evaluation, ranked by the score predictor)."""


def run_search_suite(
    name: str,
    seeds: list[int],
    episodes: int | None,
    out: Path,
    proxy_steps: int = 0,
    ablations: bool = False,
    only: list[str] | None = None,
    budgets: list[str] | None = None,
) -> dict[str, Any]:
    """ajpq against local and random (and the ablations) on one model: best validation score of each search."""
    spec = dict(SEARCH_SUITES[name])
    budgets, episodes = budgets or spec.pop("budgets"), episodes or spec.pop("episodes")
    spec.pop("budgets", None)
    spec.pop("episodes", None)
    variants = {m: {"method": m} for m in SEARCHES} | (ABLATIONS if ablations or only else {})
    if only:
        unknown = sorted(set(only) - set(variants))
        if unknown or not {"ajpq", "local"} <= set(only):
            raise SystemExit(f"--variants must include ajpq and local, from {sorted(variants)}; got {only}")
        variants = {name: options for name, options in variants.items() if name in only}
    rows = []
    for budget in budgets:
        for seed in seeds:
            for variant, options in variants.items():
                label = str(budget).replace("/", "_")
                started = time.perf_counter()
                result = run_search(
                    SearchConfig.from_dict(
                        {
                            **spec,
                            **options,
                            "size_budget": budget,
                            "episodes": episodes,
                            "seed": seed,
                            "episode_finetune_steps": proxy_steps,
                            "progress": False,
                            "run_dir": str(out / name / f"{variant}__{label}__seed{seed}"),
                        }
                    )
                )
                assert result.best is not None
                rows.append(
                    {
                        "method": variant,
                        "budget": str(budget),
                        "seed": seed,
                        "val_accuracy": result.best["accuracy"],
                        "best_episode": result.best["episode"],
                        "evaluations": result.evaluations,
                        "search_wall_time": time.perf_counter() - started,
                        "run_dir": str(result.run_dir),
                    }
                )
                print(
                    f"bench_quality: {name} {variant} {budget} seed {seed}: {result.best['accuracy']:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
    per_seed = []
    for budget in dict.fromkeys(r["budget"] for r in rows):
        for seed in seeds:
            acc = {r["method"]: r["val_accuracy"] for r in rows if r["budget"] == budget and r["seed"] == seed}
            per_seed.append({"budget": budget, "seed": seed, **acc, "ajpq_beats_local": acc["ajpq"] > acc["local"]})
    medians = {
        f"{variant} {budget}": statistics.median(
            r["val_accuracy"] for r in rows if r["method"] == variant and r["budget"] == budget
        )
        for budget in dict.fromkeys(r["budget"] for r in rows)
        for variant in variants
    }
    return {"rows": rows, "per_seed": per_seed, "medians": medians, "variants": list(variants)}


CURVE_WINDOW = 20
"""Episodes per point of a learning curve's mean score."""


def search_curves(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per search row (ajpq, local, random; a budget and a seed): the best score of each phase and the learning
    curve read back from its run folder (best-so-far of the reward, and the mean reward of each window of
    :data:`CURVE_WINDOW` episodes), so a reader sees where each search's best came from and whether the RL learns."""
    from ajpq.runs import RunDir

    curves = []
    for row in rows:
        if (
            row.get("method") not in (*SEARCHES, *ABLATIONS)
            or "run_dir" not in row
            or not Path(row["run_dir"]).is_dir()
        ):
            continue
        records = RunDir(row["run_dir"]).read_episodes()
        rewards = [r["reward"] if r.get("feasible") else float("nan") for r in records]
        best, so_far = float("-inf"), []
        for reward in rewards:
            best = max(best, reward) if reward == reward else best
            so_far.append(best)
        means = []
        for start in range(0, len(rewards), CURVE_WINDOW):
            window = [r for r in rewards[start : start + CURVE_WINDOW] if r == r]
            means.append(statistics.fmean(window) if window else float("nan"))
        for r in records:
            r.setdefault("phase", "random" if row["method"] == "random" else None)
        phases = {
            phase: {
                "best": max(r["accuracy"] for r in records if r.get("phase") == phase and r.get("feasible")),
                "episodes": sum(1 for r in records if r.get("phase") == phase),
            }
            for phase in dict.fromkeys(r.get("phase") for r in records)
            if phase and any(r.get("phase") == phase and r.get("feasible") for r in records)
        }
        curves.append(
            {
                "method": row["method"],
                "budget": row["budget"],
                "seed": row.get("seed", 0),
                "phases": phases,
                "best_so_far": so_far,
                "window_means": means,
            }
        )
    return curves


def curve_figure(name: str, curves: list[dict[str, Any]], path: Path) -> Path | None:
    """``curves_NAME.png``: one panel per budget; per method the median over seeds of the best-so-far reward (solid)
    and of the windowed mean reward (dashed) against evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    budgets = list(dict.fromkeys(c["budget"] for c in curves))
    if not budgets:
        return None
    figure, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 3.6), squeeze=False)
    colours = {
        "ajpq": "tab:blue",
        "local": "tab:orange",
        "random": "tab:grey",
        "ajpq-repeats": "tab:purple",
        "ajpq-screen4": "tab:green",
    }
    for axis, budget in zip(axes[0], budgets, strict=True):
        for method in dict.fromkeys(c["method"] for c in curves):
            members = [c for c in curves if c["budget"] == budget and c["method"] == method]
            if not members:
                continue
            length = min(len(c["best_so_far"]) for c in members)
            best = np.nanmedian(np.array([c["best_so_far"][:length] for c in members], dtype=float), axis=0)
            colour = colours.get(method, "black")
            axis.plot(np.arange(1, length + 1), best, color=colour, label=f"{method} best so far")
            windows = min(len(c["window_means"]) for c in members)
            mean = np.nanmedian(np.array([c["window_means"][:windows] for c in members], dtype=float), axis=0)
            x = np.minimum((np.arange(windows) + 0.5) * CURVE_WINDOW, length)
            axis.plot(x, mean, color=colour, linestyle="--", label=f"{method} mean ({CURVE_WINDOW} episodes)")
        guided = [
            value
            for c in curves
            if c["budget"] == budget and c["method"] != "random"
            for value in (*c["window_means"], *c["best_so_far"])
            if value == value and value > float("-inf")
        ]
        if guided:  # random's scores are far below: show the guided searches' range, random where it reaches it
            axis.set_ylim(min(guided) - 0.01, max(guided) + 0.005)
        axis.set_title(f"{name} {budget} (median of {len({c['seed'] for c in curves})} seeds)")
        axis.set_xlabel("evaluations")
        axis.set_ylabel("reward")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# bench_quality ({report['mode']} mode, {report['wall_time_s']:.0f} s)", ""]
    for name, suite in report["suites"].items():
        if "per_seed" in suite:
            variants = suite.get("variants", list(SEARCHES))
            lines += [f"## {name}: best validation accuracy of the search", ""]
            lines += ["| budget | seed | " + " | ".join(variants) + " |", "|---|---:|" + "---:|" * len(variants)]
            for r in suite["per_seed"]:
                cells = " | ".join(f"{r[v]:.4f}" for v in variants)
                lines.append(f"| {r['budget']} | {r['seed']} | {cells} |")
            for budget in dict.fromkeys(r["budget"] for r in suite["per_seed"]):
                cells = " | ".join(f"{suite['medians'][f'{v} {budget}']:.4f}" for v in variants)
                lines.append(f"| {budget} | median | {cells} |")
            at = suite["per_seed"]
            wins, ties = sum(r["ajpq"] > r["local"] for r in at), sum(r["ajpq"] == r["local"] for r in at)
            lines += ["", f"ajpq against local: {wins} wins, {ties} ties, {len(at) - wins - ties} losses", ""]
            lines += phase_lines(suite)
            continue
        fp32 = suite["fp32"]
        lines += [f"## {name} (FP32 test {fp32.get('test', float('nan')):.4f}); medians over seeds", ""]
        if suite.get("reference"):
            ref = suite["reference"]
            lines += [
                f"Reference weights digest {ref['weights_digest']}, torch {ref['torch']}, on {ref['device']}.",
                "",
            ]
        extra = [k for k in ("file_bytes", "test_artifact") if any(k in r for r in suite["medians"])]
        lines.append(
            "| method | budget | seeds | size x | BOPs x | test before | test after | "
            + "".join(f"{k.replace('_', ' ')} | " for k in extra)
            + "search s | evaluations |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(extra) + "---:|---:|")
        for r in suite["medians"]:
            cells = "".join(f"{r.get(k, float('nan')):.4g} | " for k in extra)
            lines.append(
                f"| {r['method']} | {r['budget']} | {r['seeds']} | {r['size_compression']:.1f} | "
                f"{r['bops_compression']:.1f} | {r['test_before']:.4f} | {r['test_after']:.4f} | {cells}"
                f"{r['search_wall_time']:.0f} | {r['evaluations']:.0f} |"
            )
        for r in suite["rows"]:
            if "note" in r:
                lines.append(f"\n{r['method']} at {r['budget']} (seed {r['seed']}): no result: {r['note']}")
        losses = [v for v in suite["verdicts"] if v["outcome"] == "loss"]
        lines.append("")
        lines.append(
            "ajpq against the others (test accuracy after fine-tuning, ties within 0.2 points): "
            + ", ".join(
                f"{v['budget']} vs {v['against']} {v['outcome']} ({v['margin']:+.4f})" for v in suite["verdicts"]
            )
        )
        lines.append(f"losses: {len(losses)}")
        lines.append("")
        lines += phase_lines(suite)
    return "\n".join(lines) + "\n"


def phase_lines(suite: dict[str, Any]) -> list[str]:
    """The best validation score of each phase, per search, budget and seed (and the learning-curve figure)."""
    curves = suite.get("curves", [])
    if not curves:
        return []
    lines = [
        "Best validation score by phase (episodes in the phase):",
        "",
        "| method | budget | seed | warm start | rl | refine | random | best |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in curves:
        cells = []
        for phase in ("warm_start", "rl", "refine", "random"):
            p = c["phases"].get(phase)
            cells.append(f"{p['best']:.4f} ({p['episodes']})" if p else "-")
        best = max(p["best"] for p in c["phases"].values()) if c["phases"] else float("nan")
        lines.append(f"| {c['method']} | {c['budget']} | {c['seed']} | {' | '.join(cells)} | {best:.4f} |")
    if suite.get("figure"):
        lines += ["", f"Learning curves: {Path(suite['figure']).name}"]
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits only, one seed, a few episodes (CI)")
    parser.add_argument(
        "--suites",
        nargs="*",
        default=None,
        help="lenet5 resnet20 digits lenet5-search (default: all but lenet5-search)",
    )
    parser.add_argument(
        "--ablations", action="store_true", help="search suites: also ajpq with skip_known off, and with screen 4"
    )
    parser.add_argument("--search-budgets", nargs="+", default=None, help="search suites: these size budgets only")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="search suites: run only these (from ajpq local random and the ablations)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds of the searches (default 3; quick 1)")
    parser.add_argument(
        "--episodes", type=int, default=None, help="episodes of ajpq, local and random (default per suite)"
    )
    parser.add_argument("--out", default="runs/bench_quality", help="output folder")
    parser.add_argument(
        "--proxy-steps",
        type=int,
        default=None,
        help="QAT steps of the search score for ajpq, local and random alike (default 10; quick 0)",
    )
    parser.add_argument("--part", type=int, default=None, help="run only this compare run of each suite (0, 1, ...)")
    parser.add_argument(
        "--seed-list",
        type=int,
        nargs="+",
        default=None,
        help="run these seeds only (instead of 0 .. --seeds - 1); ResNet-20 too, which otherwise runs seed 0 only",
    )
    parser.add_argument(
        "--backend", choices=("local", "processes", "ray"), default="local", help="how compare runs its jobs"
    )
    parser.add_argument("--workers", type=int, default=None, help="concurrent compare jobs (processes or ray)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    seeds = args.seed_list or list(range(args.seeds or (1 if args.quick else 3)))
    backend = BackendOptions(backend=args.backend, workers=args.workers)
    started = time.perf_counter()
    report: dict[str, Any] = {"mode": "quick" if args.quick else "full", "seeds": seeds, "suites": {}}
    wanted = set(args.suites or ["lenet5", "resnet20", "digits", "digits-compare"])
    proxy_steps = args.proxy_steps if args.proxy_steps is not None else (0 if args.quick else 10)
    report["proxy_steps"] = proxy_steps
    for name, runs in suites(args.quick, args.episodes, proxy_steps).items():
        if name in wanted:
            report["suites"][name] = run_compare_suite(
                name, runs, seeds, out, args.part, backend, seeds_given=args.seed_list is not None
            )
    for name in SEARCH_SUITES:
        if name in wanted and args.part in (None, 0):
            episodes = args.episodes or (16 if args.quick else None)
            steps = 0 if name == "digits" else proxy_steps
            report["suites"][name] = run_search_suite(
                name, seeds, episodes, out, steps, args.ablations, args.variants, args.search_budgets
            )
    out.mkdir(parents=True, exist_ok=True)
    for name, suite in report["suites"].items():
        suite["curves"] = search_curves(suite["rows"])
        figure = curve_figure(name, suite["curves"], out / f"curves_{name}.png")
        if figure is not None:
            suite["figure"] = str(figure)
    report["wall_time_s"] = time.perf_counter() - started
    atomic_write_json(out / "bench_quality.json", report)
    atomic_write_text(out / "bench_quality.md", markdown(report))
    print(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    from ajpq.logs import setup_logging

    setup_logging()  # ajpq's progress messages on stderr, as the CLI prints them
    raise SystemExit(main())
