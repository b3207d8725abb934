"""Timing of the warm start's greedy allocation (``ajpq.allocation.warm_start_policies``), JSON lines on stdout.

The sensitivity table is synthetic (seeded random curves of the measured shape: pruning damage rising with the
fraction removed, weight and activation damage falling with the bits), so no data or training is needed: the
allocation's cost depends on the model's structure and the number of greedy moves, not on the damages' values.
Models are untrained (``build_model`` under ``torch.manual_seed(0)``); only ``analyze_model`` and ``CostModel``
run on them. Each line names the model and budget, the seconds of every run, their median, and a digest of the
returned policies (sha256 over ``policy_key`` of each, in order), so two builds can be compared for identical output.

    python experiments/bench_allocation.py                    # ResNet-20 and MobileNetV2 at 3x32x32
    python experiments/bench_allocation.py --models mobilenet_v2-224   # MobileNetV2 at 3x224x224, 1000 classes
    python experiments/bench_allocation.py --quick            # CI size: digits_cnn (1x8x8) and LeNet-5 (1x28x28)
    python experiments/bench_allocation.py --baseline a483fc8 # also time allocation.py as of that git revision,
                                                              # interleaved with the current one, and their ratio

Run it on one thread (``OMP_NUM_THREADS=1``) for comparable numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ajpq import allocation
from ajpq.analysis import ModelAnalysis, analyze_model
from ajpq.budget import Budget
from ajpq.cost import CostModel
from ajpq.envs.core import policy_key
from ajpq.models import build_model
from ajpq.sensitivity import ACT_BITS, PRUNE_FRACTIONS, QUANT_BITS, SensitivityTable, step_groups

MODELS = {
    "digits_cnn": ("digits_cnn", (1, 8, 8), 10),
    "lenet5": ("lenet5", (1, 28, 28), 10),
    "resnet20": ("resnet20", (3, 32, 32), 10),
    "mobilenet_v2": ("mobilenet_v2", (3, 32, 32), 10),
    "mobilenet_v2-224": ("mobilenet_v2", (3, 224, 224), 1000),
}
"""Benchmark name: (model name, input shape, classes)."""
FULL_MODELS = ("resnet20", "mobilenet_v2")
QUICK_MODELS = ("digits_cnn", "lenet5")
SETTINGS = {
    "size-1/32": {"budget": Budget(size=1 / 32), "search_activation_bits": False},
    "bops-1/256": {"budget": Budget(bops=1 / 256), "search_activation_bits": True},
}
MAX_SPARSITY = 0.8
"""The search's default ``max_sparsity``."""


def synthetic_table(analysis: ModelAnalysis, seed: int = 0) -> SensitivityTable:
    """Seeded damages of the measured shape (see the module docstring); 0 pruning damage where pruning is off."""
    rng = np.random.default_rng(seed)
    groups = step_groups(analysis)
    n = len(groups)
    scale = rng.lognormal(0.0, 1.0, size=(n, 1)) * 0.05
    prune = np.cumsum(rng.uniform(0.2, 1.0, size=(n, len(PRUNE_FRACTIONS))), axis=1) * scale
    prune[[not analysis.groups[g].prunable for g in groups]] = 0.0
    quant = np.cumsum(rng.uniform(0.1, 1.0, size=(n, len(QUANT_BITS))), axis=1)[:, ::-1] * scale
    act = np.cumsum(rng.uniform(0.1, 1.0, size=(n, len(ACT_BITS))), axis=1)[:, ::-1] * scale
    return SensitivityTable(tuple(groups), prune, quant, act, 0.0)


def baseline_module(revision: str) -> types.ModuleType:
    """``ajpq/allocation.py`` as of a git revision of this repository, loaded as a separate module."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{revision}:ajpq/allocation.py"], cwd=root, check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType("ajpq_allocation_baseline")
    module.__file__ = f"{revision}:ajpq/allocation.py"
    sys.modules[module.__name__] = module  # dataclasses look their module up while the class is created
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def run_once(impl: types.ModuleType, analysis: ModelAnalysis, table: SensitivityTable, setting: dict) -> tuple:
    """Seconds of one ``warm_start_policies`` call on a fresh cost model, and the digest of its policies."""
    cost_model = CostModel(analysis)
    start = time.perf_counter()
    policies = impl.warm_start_policies(
        analysis,
        cost_model,
        table,
        setting["budget"],
        max_sparsity=MAX_SPARSITY,
        activation_bits=8,
        search_activation_bits=setting["search_activation_bits"],
    )
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for policy in policies:
        digest.update(policy_key(policy))
    return seconds, digest.hexdigest()[:16], len(policies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-size models")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", help="git revision whose allocation.py is timed beside the current one")
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), help="models to run instead")
    parser.add_argument("--settings", nargs="*", choices=sorted(SETTINGS), help="subset of the budgets")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = QUICK_MODELS if args.quick else FULL_MODELS
    impls: dict[str, types.ModuleType] = {}
    if args.baseline:
        impls[f"baseline@{args.baseline}"] = baseline_module(args.baseline)
    impls["current"] = allocation
    for name in args.models or models:
        model_name, shape, classes = MODELS[name]
        torch.manual_seed(0)
        model = build_model(model_name, shape, classes).eval()
        analysis = analyze_model(model, shape, model_name=model_name)
        table = synthetic_table(analysis)
        for setting_name in args.settings or list(SETTINGS):
            row: dict[str, Any] = {
                "model": name,
                "input_shape": list(shape),
                "setting": setting_name,
                "layers": len(analysis.layers),
                "steps": len(table.groups),
            }
            seconds: dict[str, list[float]] = {label: [] for label in impls}
            for _ in range(args.repeats):
                for label, impl in impls.items():
                    elapsed, digest, count = run_once(impl, analysis, table, SETTINGS[setting_name])
                    seconds[label].append(round(elapsed, 3))
                    row[f"{label}/digest"] = digest
                    row[f"{label}/policies"] = count
            for label in impls:
                row[f"{label}/seconds"] = seconds[label]
                row[f"{label}/median_s"] = statistics.median(seconds[label])
            if args.baseline:
                base = f"baseline@{args.baseline}"
                row["speedup"] = round(row[f"{base}/median_s"] / row["current/median_s"], 1)
                row["same_policies"] = row[f"{base}/digest"] == row["current/digest"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
