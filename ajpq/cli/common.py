"""What the command modules share: output helpers, options generated from configuration dataclasses, and the
workspace of the model/data options.

Options are generated from a dataclass's fields (:func:`add_field_options`): the flag is the field name with dashes,
the help text is the docstring under the field, the default is the field's default, and the type follows the
annotation (``bool`` fields become ``--x/--no-x``). A field that needs its own parser (a ratio such as ``1/32``) or
choices gets them through ``special``.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

from ajpq.analysis import CRITERIA
from ajpq.backends import BACKENDS
from ajpq.checkpoint import load_checkpoint
from ajpq.config import field_docs
from ajpq.errors import ConfigError, ModelError
from ajpq.logs import log
from ajpq.models import is_builtin_model, model_names_help
from ajpq.search_config import SearchConfig
from ajpq.workspace import SPEC_KEYS, Workspace, WorkspaceSpec, open_workspace

NONE = "none"
"""What a ratio flag given as ``none`` parses to (the setting is then None, not left to --config)."""
SPEC_DEFAULTS = WorkspaceSpec()
"""The model/data defaults: a flag left at its default counts as not given (--config and checkpoints may set it)."""


def print_json(obj: Any) -> None:
    """Machine-readable output: stdout, nothing else on it."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def one_line(message: str) -> str:
    """A message on one line: multi-line texts from libraries (YAML marks, download errors) joined with '; '."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of errors"
    )


def check_out(path: str, example: str) -> Path:
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path such as {out / example}")
    return out


# ---------------------------------------------------------------------------------------------- option parsers
def fraction(text: str) -> float:
    """A ratio flag: a number (0.0625) or a fraction (1/16)."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a ratio such as 0.05 or 1/16, but got {text!r}") from None


def ratio_or_none(text: str) -> float | str:
    if text.lower() in ("none", "null", "off"):
        return NONE
    try:
        return fraction(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a ratio such as 0.05, 1/16 or 'none', but got {text!r}") from None


def optional_int(text: str) -> int | None:
    if text.lower() in ("none", "auto"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', but got {text!r}") from None


# ------------------------------------------------------------------------------------ options from dataclasses
def _default(item: Field[Any]) -> Any:
    if item.default is not MISSING:
        return item.default
    if item.default_factory is not MISSING:
        return item.default_factory()
    return None


def _scalar_type(annotation: Any) -> Callable[[str], Any] | None:
    """``int``, ``float`` or ``str`` of an annotation such as ``int | None``; None for ``bool`` (a switch)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = kinds[0] if len(kinds) == 1 else str
    if annotation is bool:
        return None
    return annotation if annotation in (int, float, str) else str


_ROLE = re.compile(r":(?:py:)?[a-z]+:`(~?)([^`]+)`")
"""A Sphinx cross-reference such as :mod:`ajpq.methods` or :class:`~ajpq.runner.SearchResult`."""


def plain_text(text: str) -> str:
    """Docstring text as ``--help`` shows it: Sphinx roles become their target (``~`` keeps the last name) and
    double backticks go, since argparse prints the markup verbatim."""

    def target(match: re.Match[str]) -> str:
        name = match.group(2)
        return name.rsplit(".", 1)[-1] if match.group(1) else name

    return _ROLE.sub(target, text).replace("``", "")


def help_text(cls: type, name: str, default: Any) -> str:
    """A field's docstring as help, with its default unless the docstring already says it."""
    text = plain_text(field_docs(cls).get(name, "")).rstrip(".")
    if text[:2] != text[:2].upper():  # "Seed of ..." reads "seed of ..." among argparse's texts; "FP32 ..." stays
        text = text[0].lower() + text[1:]
    if default is not None and "default" not in text.lower():
        shown = default if not isinstance(default, bool) else ("on" if default else "off")
        text += f" (default {shown})"
    return text.replace("%", "%%")


def add_field_options(
    parser: Any,
    cls: type,
    names: Iterable[str],
    *,
    with_defaults: bool,
    special: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Add ``--name`` for each field of dataclass ``cls`` in ``names``, typed and documented by the field.

    With ``with_defaults`` the parser holds the field's default; without, it holds None (not given), so that a
    ``--config`` file can fill the setting in.
    """
    hints = typing.get_type_hints(cls)
    by_name = {item.name: item for item in fields(cls)}
    for name in names:
        default = _default(by_name[name])
        kwargs: dict[str, Any] = {"default": default if with_defaults else None}
        scalar = _scalar_type(hints[name])
        if scalar is None:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = scalar
        kwargs["help"] = help_text(cls, name, default)
        kwargs.update((special or {}).get(name, {}))
        parser.add_argument(f"--{name.replace('_', '-')}", **kwargs)


# ------------------------------------------------------------------------------------------- model and data
def workspace_parser() -> argparse.ArgumentParser:
    """The parent parser of the model/data options every command that loads a model shares (no --weights: each
    command says what its weights are)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("model and data")
    names = [name for name in SPEC_KEYS if name != "weights"]
    special: dict[str, dict[str, Any]] = {
        "model": {"help": f"model to compress: {model_names_help()}"},
        "importance": {"choices": CRITERIA},
    }
    add_field_options(group, WorkspaceSpec, names, with_defaults=True, special=special)
    add_debug(common)
    return common


def add_weights(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--weights`` (a checkpoint), with the command's own help text when it reads weights its own way."""
    special = {"weights": {"help": help}} if help else None
    add_field_options(parser, WorkspaceSpec, ["weights"], with_defaults=True, special=special)


def given_spec_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The model/data settings given on the command line (a flag at its default counts as not given)."""
    values = {}
    for key in SPEC_KEYS:
        value = getattr(args, key, None)
        if value is not None and value != getattr(SPEC_DEFAULTS, key):
            values[key] = value
    return values


ADOPTED: tuple[tuple[str, str], ...] = (
    ("model", "--model"),
    ("dataset", "--dataset"),
    ("split_seed", "--split-seed"),
    ("val_size", "--val-size"),
)
"""The settings a checkpoint records that a command given it adopts (the data it was trained on: another dataset,
split seed or validation size would score it on other data, or on images it was trained on)."""


def adopt_checkpoint(values: dict[str, Any], weights: str | Path) -> dict[str, Any]:
    """``values`` (the settings given, not defaults) with the model and data settings the checkpoint records.

    A setting not given takes the checkpoint's value; one given with another value is refused. A model name the
    checkpoint records is adopted only if it is a zoo or torchvision name (a file never names code to import).
    """
    checkpoint = load_checkpoint(weights)
    adopted = dict(values)
    contradictions = []
    for key, flag in ADOPTED:
        recorded = checkpoint.get(key)
        if recorded is None or values.get(key, getattr(SPEC_DEFAULTS, key)) == recorded:
            continue
        if key in values:
            contradictions.append(f"{flag} {values[key]} (the checkpoint records {recorded})")
        elif key == "model" and not is_builtin_model(str(recorded)):
            raise ModelError(
                f"{weights} was trained on model {recorded!r}; pass --model {recorded} yourself (a model named "
                "in a file is never imported on its own)"
            )
        else:
            adopted[key] = recorded
            log(f"{flag} {recorded} (from {weights})")
    if contradictions:
        raise ModelError(
            f"{weights} contradicts {', '.join(contradictions)}; drop those flags to use the checkpoint's, "
            "or give other weights"
        )
    return adopted


def adopt_checkpoint_settings(args: argparse.Namespace) -> None:
    """Given ``--weights``, take the model and data settings the checkpoint records unless told otherwise
    (:func:`adopt_checkpoint`)."""
    if not getattr(args, "weights", None):
        return
    given = given_spec_settings(args)
    for key, value in adopt_checkpoint(given, args.weights).items():
        setattr(args, key, value)


def workspace_flags(settings: Mapping[str, Any], **override: Any) -> str:
    """The model/data flags that reopen the workspace ``settings`` describe (a run's ``config.yaml``), for the
    commands a command suggests next: ``--model`` and ``--dataset`` always, the others when not at their default.
    ``override`` replaces settings (``weights="finetuned.pt"``)."""
    values = {**{key: settings.get(key) for key in SPEC_KEYS}, **override}
    parts = []
    for key in SPEC_KEYS:
        value = values[key]
        if value is None or (key not in ("model", "dataset") and value == getattr(SPEC_DEFAULTS, key)):
            continue
        parts.append(f"--{key.replace('_', '-')} {shlex.quote(str(value))}")
    return " ".join(parts)


def spec_from_args(args: argparse.Namespace) -> WorkspaceSpec:
    """The workspace spec of the model/data flags (after the checkpoint's settings are adopted)."""
    adopt_checkpoint_settings(args)
    return WorkspaceSpec.from_dict({key: getattr(args, key) for key in SPEC_KEYS if hasattr(args, key)})


def open_from_args(args: argparse.Namespace, *, need_weights: bool = True) -> Workspace:
    return open_workspace(spec_from_args(args), need_weights=need_weights)


# -------------------------------------------------------------------------------------------------- backends
def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """``--backend``, ``--workers``, ``--ray-address`` (search and compare); None when not given."""
    special = {"backend": {"choices": BACKENDS}}
    names = ["backend", "workers", "ray_address"]
    add_field_options(parser, SearchConfig, names, with_defaults=False, special=special)
