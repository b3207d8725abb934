"""Settings in one place: the workspace spec, flat configs, options generated from the dataclasses, the CLI apart."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from ajpq.cli import build_parser
from ajpq.cli.search import config_from_args, resume_config
from ajpq.compare import CompareConfig, load_compare_config
from ajpq.config import field_docs
from ajpq.errors import ConfigError
from ajpq.runs import RunDir
from ajpq.search_config import CONFIG_KEYS, SearchConfig
from ajpq.workspace import WorkspaceSpec

ROOT = Path(__file__).resolve().parents[1]


def test_flat_config_round_trips_and_keeps_the_flat_keys() -> None:
    values = {"model": "lenet5", "dataset": "fashion-mnist", "val_size": 2000, "episodes": 12, "size_budget": "1/32"}
    config = SearchConfig.from_dict(values)
    assert config.workspace == WorkspaceSpec(model="lenet5", dataset="fashion-mnist", val_size=2000)
    flat = config.to_dict()
    assert list(flat)[:8] == [
        "model",
        "dataset",
        "data_dir",
        "weights",
        "split_seed",
        "val_size",
        "device",
        "importance",
    ]
    assert "workspace" not in flat and tuple(flat) == CONFIG_KEYS
    assert flat["size_budget"] == 1 / 32 and flat["episodes"] == 12
    assert SearchConfig.from_dict(flat) == config


def test_a_run_folder_written_before_the_spec_resumes(tmp_path: Path) -> None:
    """A config.yaml of the flat form written by an older build: the same keys, read back into the same settings."""
    run = RunDir.create(tmp_path, "digits_cnn", "digits", 0, path=tmp_path / "run")
    old = {**SearchConfig(episodes=8).to_dict(), "val_size": 100, "split_seed": 2}
    (run.path / "config.yaml").write_text(yaml.safe_dump({"default": old}, sort_keys=False))
    args = build_parser().parse_args(["search", "--resume", str(run.path), "--episodes", "10", "--workers", "2"])
    config = resume_config(args, run)
    assert config.workspace.val_size == 100 and config.workspace.split_seed == 2
    assert (config.episodes, config.workers, config.run_dir) == (10, 2, str(run.path))
    args = build_parser().parse_args(["search", "--resume", str(run.path), "--val-size", "50"])
    with pytest.raises(ConfigError, match=r"these differ: val_size 100 -> 50"):
        resume_config(args, run)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"split_seed": -1}, "split_seed must be an integer >= 0, but got -1"),
        ({"val_size": 0}, "val_size must be an integer >= 1, but got 0"),
        ({"weights": 3}, "weights must be a path (a string) or null, but got 3"),
        ({"importance": "l3"}, "importance must be one of l1, l2, but got 'l3'"),
    ],
)
def test_each_workspace_field_is_checked_once_for_search_and_compare(values: dict, message: str) -> None:
    for config in (SearchConfig, CompareConfig):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            config.from_dict(values)


def test_compare_yaml_stays_flat(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("default:\n  model: lenet5\n  dataset: fashion-mnist\n  budgets: [1/16]\n  episodes: 4\n")
    config = load_compare_config(path, device="cpu")
    assert config.workspace == WorkspaceSpec(model="lenet5", dataset="fashion-mnist", device="cpu")
    assert CompareConfig.from_dict(config.to_dict()) == config


def _actions(command: str) -> dict[str, object]:
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return {action.dest: action for action in subparsers.choices[command]._actions}


def test_search_options_come_from_the_dataclass() -> None:
    """With no flags, the parsed search is the dataclass's defaults; each option's help is the field's docstring."""
    assert config_from_args(build_parser().parse_args(["search"])) == SearchConfig()
    actions = _actions("search")
    assert actions["episodes"].help == "evaluated episodes (warm-up included) (default 300)"
    assert field_docs(SearchConfig)["episodes"] == "Evaluated episodes (warm-up included)."
    assert actions["split_seed"].default == 0 and actions["importance"].choices == ("l1", "l2")
    assert {f.name for f in fields(SearchConfig)} - set(actions) == {"workspace", "method_options", "progress"}
    assert {f.name for f in fields(WorkspaceSpec)} <= set(actions)
    parsed = build_parser().parse_args(
        ["search", "--size-budget", "1/32", "--no-warm-start", "--channel-group-size", "auto"]
    )
    config = config_from_args(parsed)
    assert (config.size_budget, config.warm_start, config.channel_group_size) == (1 / 32, False, None)


def test_no_library_module_imports_the_cli() -> None:
    for path in [*ROOT.joinpath("ajpq").rglob("*.py"), *ROOT.joinpath("envs").rglob("*.py")]:
        if "cli" in path.relative_to(ROOT).parts[1:2] or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            assert not any(name == "ajpq.cli" or name.startswith("ajpq.cli.") for name in names), path
