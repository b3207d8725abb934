"""``ajpq search`` (with ``--config`` YAML and ``--resume``) and ``ajpq export``."""

from __future__ import annotations

import argparse
import difflib
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from ajpq.cli import print_json
from ajpq.errors import ConfigError
from ajpq.runs import RunDir

_COMMON_KEYS = ("model", "dataset", "data_dir", "split_seed", "val_size", "device", "importance")


_NONE = "none"
_COMMON_DEFAULTS: dict[str, Any] = {
    "model": "digits_cnn",
    "dataset": "digits",
    "device": "auto",
    "importance": "l1",
    "split_seed": 0,
}
"""Defaults of the shared flags: such a flag counts as given only when it differs from its default."""


def _fraction(text: str) -> float:
    """A ratio flag: a number (0.0625) or a fraction (1/16)."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a ratio such as 0.05 or 1/16, but got {text!r}") from None


def _ratio_or_none(text: str) -> float | str:
    if text.lower() in ("none", "null", "off"):
        return _NONE
    try:
        return _fraction(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a ratio such as 0.05, 1/16 or 'none', but got {text!r}") from None


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
    add("--max-sparsity", type=_fraction, default=None, help="largest pruned fraction per layer (default 0.8)")
    add("--activation-bits", type=int, default=None, help="activation bits when not searched (default 8)")
    add(
        "--search-activation-bits",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let the layer agent pick activation bits 2..8",
    )
    add("--channel-group-size", type=_optional_int, default=None, help="channels per channel step (default auto)")
    add("--episodes-per-update", type=int, default=None, help="PPO episodes per update (default 4)")
    add(
        "--episode-finetune-steps",
        type=int,
        default=None,
        help="steps of quantization-aware fine-tuning before each evaluation (default 0)",
    )
    add(
        "--proxy-bn-batches",
        type=int,
        default=None,
        help="re-estimate each candidate's BatchNorm statistics on this many training batches (default 0)",
    )
    add(
        "--sensitivity",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure each layer step's sensitivity once (cached) and observe it (default on)",
    )
    add(
        "--warm-start",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start from the sensitivity allocation and uniform policies (default on)",
    )
    add("--refine-episodes", type=int, default=None, help="local-search episodes at the end (default episodes/5)")
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
    for key in CONFIG_KEYS:
        if not hasattr(args, key):
            continue
        value = getattr(args, key)
        if value is None:
            continue
        if key in _COMMON_KEYS and key in values and value == _COMMON_DEFAULTS.get(key, None):
            continue
        values[key] = None if value is _NONE else value
    if args.no_progress:
        values["progress"] = False
    return SearchConfig(**values)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave on the command line or in ``--config`` (not the defaults)."""
    from ajpq.search import CONFIG_KEYS

    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    for key in CONFIG_KEYS:
        value = getattr(args, key, None)
        if value is None or (key in _COMMON_KEYS and value == _COMMON_DEFAULTS.get(key)):
            continue
        values[key] = None if value is _NONE else value
    return values


def resume_config(args: argparse.Namespace, run_dir: RunDir) -> Any:
    """The run's own config; any setting given that differs from it is refused (only a higher --episodes is not)."""
    from ajpq.models import is_builtin_model
    from ajpq.search import SearchConfig

    values = run_dir.read_config()
    given = given_settings(args)
    differences = []
    for key, value in given.items():
        stored = values.get(key)
        if key == "episodes" and isinstance(value, int) and value >= int(stored or 0):
            values["episodes"] = value
        elif key == "progress":
            continue
        elif key in ("backend", "workers", "ray_address"):  # where evaluations run does not change the results
            values[key] = value
        elif value != stored:
            differences.append(f"{key} {stored!r} -> {value!r}")
    if differences:
        raise ConfigError(
            f"--resume {run_dir.path}: a resumed run keeps the settings of its config.yaml, but these differ: "
            f"{', '.join(differences)} (only a higher --episodes is allowed, and --backend, --workers, "
            "--ray-address may change); start a new run for other settings"
        )
    model = values.get("model")
    if isinstance(model, str) and not is_builtin_model(model) and given.get("model") != model:
        raise ConfigError(
            f"--resume {run_dir.path}: the run was made with model {model!r}, code named in a run folder is never "
            f"imported on its own; pass --model {model} yourself to resume it"
        )
    if args.no_progress:
        values["progress"] = False
    values["run_dir"] = str(run_dir.path)
    return SearchConfig(**values)


def run_search_command(args: argparse.Namespace) -> int:
    from ajpq.search import run_search

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
            f"run {result.run_dir} already finished its {result.episodes} episodes; nothing changed "
            f"(give a higher --episodes to continue it)"
        )
        return 0
    best = result.best
    if best is None:
        print(f"no feasible policy in {result.episodes} episodes; run folder {result.run_dir}")
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
    model, dataset = config.get("model", "MODEL"), config.get("dataset", "DATASET")
    data = f"--model {model} --dataset {dataset}"
    penalty = ", minus the soft-budget penalty" if config.get("budget_mode") == "soft" else ""
    return "\n".join(
        [
            f"best reward {best['reward']:+.4f} at episode {best['episode']} of {result.episodes}: val accuracy "
            f"{best['accuracy']:.4f}{against} (reward = val accuracy change against FP32{penalty}); size ratio "
            f"{best['size_ratio']:.4f} = {best['compression_rate']:.1f}x smaller, BOPs ratio "
            f"{best['bops_ratio']:.4f}; {result.episodes_per_s:.1f} episodes/s",
            f"best policy: {best_policy}",
            "next:",
            f"  tensorboard --logdir {result.run_dir / 'tb'}",
            f"  ajpq finetune {data} --policy {best_policy} --out finetuned.pt",
            f"  ajpq export-model {data} --weights finetuned.pt --out model.ajpq",
        ]
    )


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
