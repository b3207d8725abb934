"""``ajpq search`` (with ``--config`` YAML and ``--resume``) and ``ajpq export`` (a run's policy as a file).

The search's options are generated from :class:`~ajpq.search_config.SearchConfig` (help from each field's
docstring); they default to None here, so that a setting left out comes from ``--config``, then from the dataclass.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from ajpq.agents import AGENT_KINDS
from ajpq.budget import BUDGET_MODES
from ajpq.cli.common import (
    NONE,
    add_backend_arguments,
    add_field_options,
    adopt_checkpoint,
    fraction,
    given_spec_settings,
    optional_int,
    print_json,
    ratio_or_none,
    workspace_flags,
)
from ajpq.config import load_config_file, resume_values
from ajpq.errors import ConfigError
from ajpq.latency import LATENCY_TARGETS
from ajpq.methods import METHODS
from ajpq.runner import run_search
from ajpq.runs import RunDir
from ajpq.search_config import CONFIG_KEYS, SearchConfig
from ajpq.workspace import WorkspaceSpec

NOT_OPTIONS = ("workspace", "progress", "backend", "workers", "ray_address", "method_options")
"""Fields of SearchConfig without an option of their own here (--no-progress and the backend options are added
apart; method_options only come from --config)."""
SEARCH_OPTIONS: tuple[str, ...] = tuple(
    name for name in CONFIG_KEYS if name in SearchConfig.__dataclass_fields__ and name not in NOT_OPTIONS
)
SPECIAL: dict[str, dict[str, Any]] = {
    "method": {"choices": sorted(METHODS)},
    "size_budget": {"type": ratio_or_none},
    "bops_budget": {"type": ratio_or_none},
    "latency_budget": {"type": ratio_or_none},
    "latency_target": {"choices": LATENCY_TARGETS},
    "budget_mode": {"choices": BUDGET_MODES},
    "layer_agent": {"choices": AGENT_KINDS},
    "channel_agent": {"choices": AGENT_KINDS},
    "max_sparsity": {"type": fraction},
    "channel_group_size": {"type": optional_int},
}
"""Options that need their own parser or choices (ratios such as 1/32, "auto")."""


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    search = subparsers.add_parser(
        "search",
        parents=[common],
        help="search a per-channel pruning + quantization policy (hierarchical RL)",
        description="Search a policy within a size/BOPs budget. Writes a run folder (config.yaml, episodes.jsonl, "
        "best_policy.json, checkpoints, TensorBoard events under tb/). Options left out come from --config's "
        "`default:` block, then from the built-in defaults.",
    )
    add = search.add_argument
    add("--config", default=None, help="YAML file with a `default:` block of these options (flags override it)")
    add_field_options(search, WorkspaceSpec, ["weights"], with_defaults=False)
    add_field_options(search, SearchConfig, SEARCH_OPTIONS, with_defaults=False, special=SPECIAL)
    add("--resume", default=None, metavar="RUN_DIR", help="continue a run from its last checkpoint")
    add_backend_arguments(search)
    add("--no-progress", action="store_true", help="no progress bar")
    add("--json", action="store_true", help="print the summary as JSON on stdout")
    search.set_defaults(handler=run_search_command)

    export = subparsers.add_parser(
        "export",
        help="write the best (or one episode's) policy of a run as a policy file",
        description="Write a run's best feasible policy (or episode N's) as a policy JSON file.",
    )
    export.add_argument("--run", required=True, metavar="RUN_DIR", help="run folder written by `ajpq search`")
    export.add_argument("--episode", type=int, default=None, help="episode to export (default: the best)")
    export.add_argument("--out", required=True, help="policy file to write")
    export.add_argument("--json", action="store_true", help="print the policy's metrics as JSON on stdout")
    export.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    export.set_defaults(handler=run_export_policy)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave on the command line or in ``--config`` (not the defaults).

    A search flag counts as given when it is not None, a model/data flag when it differs from its default.
    """
    values: dict[str, Any] = load_config_file(args.config, CONFIG_KEYS) if args.config else {}
    values.update(given_spec_settings(args))
    for key in ("weights", *SEARCH_OPTIONS, "backend", "workers", "ray_address"):
        value = getattr(args, key, None)
        if value is not None:
            values[key] = None if value is NONE else value
    return values


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    """CLI flags over ``--config`` over the defaults; given weights bring the model and data they were trained on
    (:func:`~ajpq.cli.common.adopt_checkpoint`)."""
    values = given_settings(args)
    if values.get("weights"):
        values = adopt_checkpoint(values, values["weights"])
    if args.no_progress:
        values["progress"] = False
    return SearchConfig.from_dict(values)


def resume_config(args: argparse.Namespace, run_dir: RunDir) -> SearchConfig:
    """The run's own config; any setting given that differs from it is refused (only a higher --episodes is not)."""
    values = resume_values(run_dir.read_config(), given_settings(args), run_dir.path)
    if args.no_progress:
        values["progress"] = False
    values["run_dir"] = str(run_dir.path)
    return SearchConfig.from_dict(values)


def run_search_command(args: argparse.Namespace) -> int:
    if args.resume is not None:
        run_dir = RunDir.open(args.resume)
        result = run_search(resume_config(args, run_dir), resume=run_dir.path)
    else:
        result = run_search(config_from_args(args))
    summary = result.as_dict()
    if args.json:
        print_json({**summary, "already_finished": result.finished})
        return 0
    if result.finished:
        print(
            f"run {result.run_dir} already finished its {result.episode_count} episodes; nothing changed "
            f"(give a higher --episodes to continue it)"
        )
        return 0
    best = result.best
    if best is None:
        print(f"no feasible policy in {result.episode_count} episodes; run folder {result.run_dir}")
        return 0
    print(summary_text(result, summary["best_policy"], config_of(result.run_dir)))
    return 0


def config_of(run: Path) -> dict[str, Any]:
    try:
        return RunDir(run).read_config()
    except ConfigError:
        return {}


def summary_text(result: Any, best_policy: str, config: dict[str, Any]) -> str:
    """The end-of-search summary: the best policy next to FP32, what the reward means, and the next commands."""
    best = result.best
    fp32 = result.fp32_accuracy
    against = f" against FP32 {fp32:.4f}" if fp32 is not None else ""
    searched = workspace_flags({"model": "MODEL", "dataset": "DATASET", **config})
    tuned = workspace_flags({"model": "MODEL", "dataset": "DATASET", **config}, weights="finetuned.pt")
    penalty = ", minus the soft-budget penalty" if config.get("budget_mode") == "soft" else ""
    latency = ""
    if best.get("latency_ratio") is not None:
        target = f"{config.get('latency_target', 'torch-cpu')}, batch {config.get('latency_batch', 1)}"
        latency = f", predicted latency ratio {best['latency_ratio']:.4f} ({target})"
    return "\n".join(
        [
            f"best reward {best['reward']:+.4f} at episode {best['episode']} of {result.episode_count}: val accuracy "
            f"{best['accuracy']:.4f}{against} (reward = val accuracy change against FP32{penalty}); size ratio "
            f"{best['size_ratio']:.4f} = {best['compression_rate']:.1f}x smaller, BOPs ratio "
            f"{best['bops_ratio']:.4f}{latency}; {result.episodes_per_s:.1f} episodes/s",
            *phase_lines(result.best_by_phase, best["episode"]),
            f"best policy: {best_policy}",
            "next:",
            f"  tensorboard --logdir {result.run_dir / 'tb'}",
            f"  ajpq finetune {searched} --policy {shlex.quote(best_policy)} --out finetuned.pt",
            f"  ajpq export-model {tuned} --out model.ajpq",
        ]
    )


PHASE_NAMES = {"warm_start": "warm start", "rl": "RL episodes", "refine": "refinement"}


def phase_lines(phases: dict[str, dict[str, Any]], best_episode: int) -> list[str]:
    """One line naming each phase's best val accuracy, and the phase the best policy came from (none for a method
    without phases)."""
    if not phases:
        return []
    parts = [
        f"{PHASE_NAMES.get(phase, phase)} {found['accuracy']:.4f} (episode {found['episode']})"
        for phase, found in phases.items()
    ]
    source = next((phase for phase, found in phases.items() if found["episode"] == best_episode), None)
    came = f"; the best policy came from the {PHASE_NAMES.get(source, source)}" if source else ""
    return [f"best val accuracy by phase: {', '.join(parts)}{came}"]


def run_export_policy(args: argparse.Namespace) -> int:
    """``ajpq export``: a run's best policy (or episode N's) as a policy file."""
    out = Path(args.out)
    policy = RunDir.open(args.run, what="--run").export_policy(args.episode)
    policy.save(out)
    if args.json:
        print_json({"out": str(out), "metrics": policy.metrics})
    else:
        print(f"wrote {out}: {json.dumps(policy.metrics)}")
    return 0
