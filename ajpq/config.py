"""Configuration files and settings shared by ``ajpq search`` and ``ajpq compare``.

* :func:`load_config_file` reads the ``default:`` block of an experiment YAML, checking every key;
* :func:`field_docs` reads the attribute docstrings of a configuration dataclass (the line under each field), so that
  the CLI's help texts and defaults come from the dataclass itself;
* ``check_int``, ``check_fraction``, ``check_non_negative`` and ``check_bits`` check one setting each, with the
  message every configuration class uses;
* :func:`resume_values` merges the settings given to ``--resume`` with a run's own ``config.yaml``.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import itertools
import math
import textwrap
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from ajpq.errors import ConfigError
from ajpq.io import parse_yaml, read_text
from ajpq.models import is_builtin_model

RESUME_MAY_CHANGE: tuple[str, ...] = ("backend", "workers", "ray_address")
"""Settings a resumed run may change: where evaluations run does not change the results."""


def load_config_file(path: str | Path, keys: Iterable[str], what: str = "search") -> dict[str, Any]:
    """The ``default:`` block of an experiment YAML, with keys checked against ``keys``.

    Dashes in keys are read as underscores; an unknown key is refused with the closest known one.
    """
    keys = list(keys)
    path = Path(path)
    source = f"--config {path}"
    data = parse_yaml(read_text(path, source, ConfigError), source, ConfigError)
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


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (whitespace folded), read from its source once."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def resume_values(stored: Mapping[str, Any], given: Mapping[str, Any], run: str | Path) -> dict[str, Any]:
    """A resumed run's settings: its own ``stored`` ones; any ``given`` setting that differs is refused.

    Only a higher ``episodes`` and the settings of :data:`RESUME_MAY_CHANGE` are taken from ``given``. A model
    named by code (``pkg.mod:factory``) must be given again: a run folder never names code to import on its own.
    """
    values = dict(stored)
    differences = []
    for key, value in given.items():
        old = values.get(key)
        if key == "episodes" and isinstance(value, int) and value >= int(old or 0):
            values["episodes"] = value
        elif key == "progress":
            continue
        elif key in RESUME_MAY_CHANGE:
            values[key] = value
        elif value != old:
            differences.append(f"{key} {old!r} -> {value!r}")
    if differences:
        raise ConfigError(
            f"--resume {run}: a resumed run keeps the settings of its config.yaml, but these differ: "
            f"{', '.join(differences)} (only a higher --episodes is allowed, and --backend, --workers, "
            "--ray-address may change); start a new run for other settings"
        )
    model = values.get("model")
    if isinstance(model, str) and model.startswith("python:") and given.get("model") != model:
        raise ConfigError(
            f"--resume {run}: the run was started from Python on a model object ({model[7:]}); resume it from Python "
            "with the same model and data: ajpq.search(model, train, val, ..., resume=run_dir)"
        )
    if isinstance(model, str) and not is_builtin_model(model) and given.get("model") != model:
        raise ConfigError(
            f"--resume {run}: the run was made with model {model!r}, code named in a run folder is never "
            f"imported on its own; pass --model {model} yourself to resume it"
        )
    return values


def check_fraction(name: str, value: Any, *, high: float = 1.0, closed: bool = False) -> float:
    """A number in ``[0, high)`` (``[0, high]`` when ``closed``), or a :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number in [0, {high:g}{']' if closed else ')'}, but got {value!r}")
    if not (0.0 <= value <= high if closed else 0.0 <= value < high):
        raise ConfigError(f"{name} must be in [0, {high:g}{']' if closed else ')'}, but got {value:g}")
    return float(value)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """An integer (not a bool) >= ``minimum``, or a :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, but got {value!r}")
    return int(value)


def check_non_negative(name: str, value: Any) -> float:
    """A finite number >= 0, or a :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a number >= 0, but got {value!r}")
    return float(value)


def check_bits(name: str, value: Any) -> int:
    """A bit width 1..8, or a :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        raise ConfigError(f"{name} must be an integer from 1 to 8, but got {value!r}")
    return int(value)
