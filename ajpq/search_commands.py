"""``ajpq search`` (with ``--config`` YAML and ``--resume``) and ``ajpq export``."""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any

import yaml

from ajpq.cli import print_json
from ajpq.errors import ConfigError
from ajpq.runs import RunDir

_COMMON_KEYS = ("model", "dataset", "data_dir", "split_seed", "val_size", "device", "importance")


_NONE = "none"


def _ratio_or_none(text: str) -> float | str:
    if text.lower() in ("none", "null", "off"):
        return _NONE
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio such as 0.05 or 'none', but got {text!r}") from None


def _optional_int(text: str) -> int | None:
    if text.lower() in ("none", "auto"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', but got {text!r}") from None


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from ajpq.agents import AGENT_KINDS
    from ajpq.search import METHODS

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
    add("--method", default=None, choices=sorted(METHODS), help="search method (default ajpq)")
    add("--weights", default=None, help="FP32 checkpoint (default: the cached reference, pretrained on first use)")
    add("--size-budget", type=_ratio_or_none, default=None, help="size as a ratio of FP32 in (0, 1] (default 0.1)")
    add("--bops-budget", type=_ratio_or_none, default=None, help="BOPs as a ratio of FP32 in (0, 1] (default none)")
    add("--budget-mode", default=None, choices=("hard", "soft"), help="hard (project, default) or soft (penalty)")
    add("--soft-penalty", type=float, default=None, help="soft mode penalty weight (default 1.0)")
    add("--episodes", type=int, default=None, help="evaluated episodes (default 300)")
    add("--warmup-episodes", type=int, default=None, help="random-action episodes first (default 20)")
    add("--seed", type=int, default=None, help="search seed (default 0)")
    add("--layer-agent", default=None, choices=AGENT_KINDS, help="layer controller (default ppo)")
    add("--channel-agent", default=None, choices=AGENT_KINDS, help="channel controller (default ppo)")
    add("--max-sparsity", type=float, default=None, help="largest pruned fraction per layer (default 0.8)")
    add("--activation-bits", type=int, default=None, help="activation bits when not searched (default 8)")
    add(
        "--search-activation-bits",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let the layer agent pick activation bits 2..8",
    )
    add("--channel-group-size", type=_optional_int, default=None, help="channels per channel step (default auto)")
    add("--episodes-per-update", type=int, default=None, help="PPO episodes per update (default 4)")
    add("--episode-finetune-steps", type=int, default=None, help="fine-tune steps before each evaluation (default 0)")
    add("--checkpoint-every", type=int, default=None, help="checkpoint period in episodes (default 20)")
    add("--run-root", default=None, help="parent folder of run folders (default runs)")
    add("--run-dir", default=None, help="exact run folder to create")
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
    export.set_defaults(handler=run_export)


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """``--backend``, ``--workers``, ``--ray-address`` (search and compare)."""
    from ajpq.backends import BACKENDS

    parser.add_argument("--backend", default=None, choices=BACKENDS, help="where candidates are evaluated (local)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes or Ray actors (default: cores)")
    parser.add_argument(
        "--ray-address", default=None, help="Ray cluster to join: auto or HOST:PORT (default: a local Ray)"
    )


def load_config_file(path: str | Path, keys: tuple[str, ...] | None = None, what: str = "search") -> dict[str, Any]:
    """The ``default:`` block of an experiment YAML, with keys checked against ``keys`` (default: the search's).

    Dashes in keys are read as underscores; an unknown key is refused with the closest known one.
    """
    if keys is None:
        from ajpq.search import CONFIG_KEYS as keys

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("default"), dict):
        raise ConfigError(f"--config {path}: expected a mapping with a `default:` block of {what} options")
    values: dict[str, Any] = {}
    for key, value in data["default"].items():
        name = str(key).replace("-", "_")
        if name not in keys:
            close = difflib.get_close_matches(name, keys, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"--config {path}: unknown option '{key}'{hint}")
        values[name] = value
    return values


def config_from_args(args: argparse.Namespace) -> Any:
    """CLI flags over ``--config`` over the defaults (a common flag counts as given when it differs from its
    default)."""
    from ajpq.search import CONFIG_KEYS, SearchConfig

    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    common_defaults = {
        "model": "digits_cnn",
        "dataset": "digits",
        "device": "auto",
        "importance": "l1",
        "split_seed": 0,
    }
    for key in CONFIG_KEYS:
        if not hasattr(args, key):
            continue
        value = getattr(args, key)
        if value is None:
            continue
        if key in _COMMON_KEYS and key in values and value == common_defaults.get(key, None):
            continue
        values[key] = None if value is _NONE else value
    if args.no_progress:
        values["progress"] = False
    return SearchConfig(**values)


def run_search_command(args: argparse.Namespace) -> int:
    from ajpq.search import SearchConfig, run_search

    if args.resume is not None:
        run_dir = RunDir.open(args.resume)
        values = run_dir.read_config()
        if args.episodes is not None:
            values["episodes"] = args.episodes
        if args.no_progress:
            values["progress"] = False
        for key in ("backend", "workers", "ray_address"):
            if getattr(args, key) is not None:
                values[key] = getattr(args, key)
        values["run_dir"] = str(run_dir.path)
        config = SearchConfig(**values)
        result = run_search(config, resume=run_dir.path)
    else:
        result = run_search(config_from_args(args))
    summary = result.as_dict()
    if args.json:
        print_json(summary)
        return 0
    best = result.best
    if best is None:
        print(f"no feasible policy in {result.episodes} episodes; run folder {result.run_dir}")
        return 0
    print(
        f"best reward {best['reward']:+.4f} (val accuracy {best['accuracy']:.4f}, size ratio {best['size_ratio']:.4f}"
        f" = {best['compression_rate']:.1f}x smaller, BOPs ratio {best['bops_ratio']:.4f}) at episode "
        f"{best['episode']} of {result.episodes}; {result.episodes_per_s:.1f} episodes/s; "
        f"best policy {summary['best_policy']}"
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    import json

    from ajpq.policy import load_policy

    run_dir = RunDir.open(args.run, what="--run")
    out = Path(args.out)
    if args.episode is None:
        if not run_dir.best_policy_path.is_file():
            raise ConfigError(f"run {run_dir.path} has no best_policy.json yet (no feasible episode recorded)")
        policy = load_policy(run_dir.best_policy_path)
    else:
        info = run_dir.read_info()
        config = run_dir.read_config()
        policy = run_dir.read_policy(args.episode, config.get("model"), info.get("fingerprint"))
        record = next((r for r in run_dir.read_episodes() if r.get("episode") == args.episode), {})
        policy.metrics = {k: v for k, v in record.items() if k not in ("wall_time", "eval_time")}
        policy = policy.with_meta(str(config.get("method", "ajpq")), config.get("seed"), run=str(run_dir.path))
    policy.save(out)
    if args.json:
        print_json({"out": str(out), "metrics": policy.metrics})
    else:
        print(f"wrote {out}: {json.dumps(policy.metrics)}")
    return 0
