"""Search benchmark: episodes/s, overhead ratio (episode wall time / evaluation time), RL vs random search.

Random search is the same search with every episode a warm-up episode (uniform random actions over the same action
spaces), so both evaluate the same number of episodes under the same budget and projection.

    python experiments/bench_search.py                 # digits and LeNet-5/Fashion-MNIST, 3 seeds, 300 episodes
    python experiments/bench_search.py --quick         # 60 episodes, digits only
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from ajpq.runner import run_search
from ajpq.search_config import SearchConfig

SETTINGS = {
    "digits": {"model": "digits_cnn", "dataset": "digits", "size_budget": 0.1},
    "lenet5-fmnist": {"model": "lenet5", "dataset": "fashion-mnist", "val_size": 2000, "size_budget": 0.05},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--quick", action="store_true", help="60 episodes on digits only")
    parser.add_argument("--out", default="bench_search.json")
    parser.add_argument("--device", default="cpu", help="cpu (default, the timings the README quotes) or cuda")
    args = parser.parse_args()
    if args.quick:
        args.episodes, args.settings = 60, ["digits"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            for seed in args.seeds:
                for method in ("rl", "random"):
                    warmup = args.episodes if method == "random" else 20
                    config = SearchConfig.from_dict(
                        {
                            **SETTINGS[setting],
                            "episodes": args.episodes,
                            "warmup_episodes": min(warmup, args.episodes),
                            "seed": seed,
                            "run_root": tmp,
                            "device": args.device,
                            "progress": False,
                        }
                    )
                    result = run_search(config)
                    rows.append(
                        {
                            "setting": setting,
                            "method": method,
                            "seed": seed,
                            "best_reward": result.best["reward"] if result.best else None,
                            "episodes_per_s": result.episodes_per_s,
                            "overhead_ratio": result.eval_time_fraction,
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'setting':<15} {'method':<7} {'median best reward':>19} {'episodes/s':>11} {'overhead':>9}")
    summary = {}
    for setting in args.settings:
        for method in ("rl", "random"):
            sel = [r for r in rows if r["setting"] == setting and r["method"] == method]
            med = statistics.median(r["best_reward"] for r in sel)
            eps = statistics.median(r["episodes_per_s"] for r in sel)
            over = statistics.median(r["overhead_ratio"] for r in sel)
            summary[f"{setting}/{method}"] = {"median_best_reward": med, "episodes_per_s": eps, "overhead_ratio": over}
            print(f"{setting:<15} {method:<7} {med:>19.4f} {eps:>11.2f} {over:>9.2f}")
    Path(args.out).write_text(json.dumps({"episodes": args.episodes, "runs": rows, "summary": summary}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from ajpq.logs import setup_logging

    setup_logging()  # ajpq's progress messages on stderr, as the CLI prints them
    main()
