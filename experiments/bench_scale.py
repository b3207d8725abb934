"""Scaling benchmark of the search's evaluation backends (issue 9), JSON on stdout.

* episodes/s and overhead ratio (episode wall time / evaluation time alone) of an AJPQ search on digits_cnn/digits
  and LeNet-5/Fashion-MNIST (2,000 validation images): local, processes with 1 and 2 workers, a local Ray with 2 CPUs;
  whether every backend wrote the same episodes.jsonl (time columns aside) and the same best policy;
* peak RSS of the driver and its worker processes (processes backend, 2 workers) after a short and a long search;
* time per episode (rollout, projection and one evaluation) against model size: digits_cnn, LeNet-5, ResNet-20 and
  MobileNetV2 at 32x32 (untrained weights and synthetic images: the cost does not depend on the values).

    python experiments/bench_scale.py            # 100-episode searches, RSS after 100 and 1,000 episodes
    python experiments/bench_scale.py --quick    # CI size: 16 episodes, digits only, RSS after 16 and 64
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ajpq.runner import run_search
from ajpq.runs import TIME_KEYS
from ajpq.search_config import SearchConfig

SETTINGS = {
    "digits_cnn": {"model": "digits_cnn", "dataset": "digits", "size_budget": 0.1},
    "lenet5-fmnist": {"model": "lenet5", "dataset": "fashion-mnist", "val_size": 2000, "size_budget": 0.05},
}
BACKENDS = {
    "local": {"backend": "local"},
    "processes-1": {"backend": "processes", "workers": 1},
    "processes-2": {"backend": "processes", "workers": 2},
    "ray-2": {"backend": "ray", "workers": 2},
}
SIZE_MODELS = {"digits_cnn": (1, 8, 8), "lenet5": (1, 28, 28), "resnet20": (3, 32, 32), "mobilenet_v2": (3, 32, 32)}


def _episodes(run: Path) -> list[dict[str, Any]]:
    lines = (run / "episodes.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS} for line in lines]


def _rl_overhead(run: Path) -> float:
    """Overhead ratio of the RL episodes alone (wall / evaluation time of the ``phase: rl`` lines): the steady state,
    without the one-time costs of the start (agent construction, warm-start allocation and behaviour cloning)."""
    records = [json.loads(line) for line in (run / "episodes.jsonl").read_text().splitlines()]
    rl = [r for r in records if r.get("phase") == "rl"]
    return sum(r["wall_time"] for r in rl) / max(sum(r["eval_time"] for r in rl), 1e-9)


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and its descendants (from /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        parents[int(entry)] = int(fields.get("PPid", "0").strip())
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(p, 0) for p in tree)


def backends(
    episodes: int, settings: list[str], names: list[str], tmp: Path, proxy_steps: int = 0
) -> list[dict[str, Any]]:
    rows = []
    for setting in settings:
        reference: list[dict[str, Any]] | None = None
        for name in names:
            config = SearchConfig.from_dict(
                {
                    **SETTINGS[setting],
                    **BACKENDS[name],
                    "episodes": episodes,
                    "episode_finetune_steps": proxy_steps,
                    "device": "cpu",
                    "progress": False,
                    "run_dir": str(tmp / f"{setting}-{name}"),
                }
            )
            result = run_search(config)
            rows_written = _episodes(result.run_dir)
            reference = reference if reference is not None else rows_written
            best = json.loads((result.run_dir / "best_policy.json").read_text())
            rows.append(
                {
                    "setting": setting,
                    "backend": name,
                    "episodes": result.episode_count,
                    "episodes_per_s": round(result.episodes_per_s, 3),
                    "overhead_ratio": round(result.eval_time_fraction, 3),
                    "rl_overhead_ratio": round(_rl_overhead(result.run_dir), 3),
                    "same_episodes_as_first": rows_written == reference,
                    "best_episode": result.best["episode"] if result.best else None,
                    "best_layers": best["layers"],
                }
            )
        first = rows[-len(names)]["best_layers"]
        for row in rows[-len(names) :]:
            row["same_best_policy_as_first"] = row.pop("best_layers") == first
        if "local" in names and "processes-1" in names:
            local = next(r for r in rows if r["setting"] == setting and r["backend"] == "local")
            for row in rows[-len(names) :]:
                row["speedup_vs_local"] = round(row["episodes_per_s"] / local["episodes_per_s"], 3)
    return rows


def _sample_rss(stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], _tree_rss(os.getpid()))
        time.sleep(0.2)


def memory(points: list[int], tmp: Path) -> list[dict[str, Any]]:
    """Peak RSS of driver + 2 worker processes, sampled every 0.2 s, for searches of growing length."""
    rows = []
    for episodes in points:
        peak = [0]
        stop = threading.Event()
        thread = threading.Thread(target=_sample_rss, args=(stop, peak), daemon=True)
        thread.start()
        config = SearchConfig.from_dict(
            {
                **SETTINGS["digits_cnn"],
                "backend": "processes",
                "workers": 2,
                "episodes": episodes,
                "checkpoint_every": max(4, episodes // 4 // 4 * 4),
                "device": "cpu",
                "progress": False,
                "run_dir": str(tmp / f"memory-{episodes}"),
            }
        )
        run_search(config)
        stop.set()
        thread.join()
        rows.append({"episodes": episodes, "peak_rss_mib": round(peak[0] / 2**20, 1)})
    return rows


def model_size(episodes: int) -> list[dict[str, Any]]:
    """Seconds per episode (random actions: rollout, projection, evaluation on 512 images) against model size."""
    import numpy as np

    from ajpq.analysis import analyze_model
    from ajpq.budget import Budget
    from ajpq.data import DataSplits, TensorSplit
    from ajpq.envs import CompressionProblem
    from ajpq.methods.random_search import _random_policy
    from ajpq.models import build_model
    from ajpq.proxy import make_evaluator
    from ajpq.workspace import Workspace

    rows = []
    for name, shape in SIZE_MODELS.items():
        generator = torch.Generator().manual_seed(0)
        split = TensorSplit(torch.randn(512, *shape, generator=generator), torch.randint(0, 10, (512,)))
        splits = DataSplits("synthetic", split, split, split, shape, 10, 0)
        model = build_model(name, shape, 10).eval()
        analysis = analyze_model(model, shape, model_name=name)
        workspace = Workspace(name, splits, model, analysis, torch.device("cpu"))
        problem = CompressionProblem(analysis, make_evaluator(workspace), 0.1, budget=Budget(size=0.25))
        rng = np.random.default_rng(0)
        problem.finish_many([_random_policy(problem, rng)])  # builds the simulated model
        start = time.perf_counter()
        problem.finish_many([_random_policy(problem, rng) for _ in range(episodes)])
        seconds = (time.perf_counter() - start) / episodes
        channels = sum(layer.out_channels for layer in analysis.layers)
        rows.append(
            {
                "model": name,
                "params": sum(p.numel() for p in model.parameters()),
                "channels": channels,
                "layer_steps": len(problem.units),
                "s_per_episode": round(seconds, 4),
                "ms_per_episode_per_channel": round(1000 * seconds / channels, 4),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI size: 16 episodes, digits only")
    parser.add_argument("--episodes", type=int, default=None, help="episodes per backend search")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS), help="backend-run models")
    parser.add_argument("--lenet5-weights", default=None, help="LeNet-5/Fashion-MNIST weights (default: cached)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["backends", "memory", "model_size"])
    parser.add_argument(
        "--proxy-steps",
        type=int,
        default=0,
        help="QAT fine-tuning steps per candidate (episode_finetune_steps; the LeNet-5 benchmark's proxy uses 10)",
    )
    args = parser.parse_args()
    episodes = args.episodes or (16 if args.quick else 100)
    if args.lenet5_weights:
        SETTINGS["lenet5-fmnist"]["weights"] = args.lenet5_weights
    settings = args.settings or (["digits_cnn"] if args.quick else list(SETTINGS))
    report: dict[str, Any] = {"cpu_count": os.cpu_count(), "episodes": episodes, "quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp:
        if "backends" not in args.skip:
            report["backends"] = backends(episodes, settings, args.backends, Path(tmp), args.proxy_steps)
            report["proxy_steps"] = args.proxy_steps
        if "memory" not in args.skip:
            report["memory"] = memory([16, 64] if args.quick else [100, 1000], Path(tmp))
        if "model_size" not in args.skip:
            report["model_size"] = model_size(4 if args.quick else 20)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    from ajpq.logs import setup_logging

    setup_logging()  # ajpq's progress messages on stderr, as the CLI prints them
    main()
