"""The ``ajpq`` console script: one command with subcommands.

Each subcommand lives in a module that exposes ``register(subparsers, common)``; ``common`` is the parent parser
with the options every command shares (model, data, device, ``--debug``). Bad input raises an
:class:`~ajpq.errors.AJPQError`, which is printed as one line and exits with code 2 (a traceback only with
``--debug``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from ajpq import __version__
from ajpq.errors import AJPQError

COMMAND_MODULES: tuple[str, ...] = (
    "ajpq.commands",
    "ajpq.search_commands",
    "ajpq.export_commands",
    "ajpq.compare_commands",
)
"""Modules that register subcommands, in the order they appear in ``ajpq --help``."""
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with errors that also say where to look for help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def common_parser() -> argparse.ArgumentParser:
    """Options shared by the commands that load a model and its data."""
    from ajpq.models import DEFAULT_DATASET, DEFAULT_MODEL, model_names_help

    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("model and data")
    group.add_argument("--model", default=DEFAULT_MODEL, help=f"model to compress: {model_names_help()}")
    group.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help="digits (embedded, default), mnist, fashion-mnist, cifar10, cifar100, imagefolder",
    )
    group.add_argument(
        "--data-dir",
        default=None,
        help="folder with the dataset files (idx .gz, CIFAR batches, "
        "or an ImageNet-style train/ val/ tree); default $AJPQ_DATA_DIR or ~/.cache/ajpq/data",
    )
    group.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split (default 0)")
    group.add_argument(
        "--val-size",
        type=int,
        default=None,
        help="validation images taken from the training data (default: per dataset)",
    )
    group.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")
    group.add_argument(
        "--importance",
        default="l1",
        choices=("l1", "l2"),
        help="channel-importance criterion: norm of each output channel's weights (default l1)",
    )
    add_debug(common)
    return common


def add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of errors"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ajpq",
        description="Automated joint pruning and quantization: find per-channel 0-8 bit policies for a PyTorch "
        "model and turn them into a really smaller model.",
    )
    parser.add_argument("--version", action="version", version=f"ajpq {__version__}")
    add_debug(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    common = common_parser()
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers, common)
    return parser


def print_json(obj: Any) -> None:
    """Machine-readable output: stdout, nothing else on it."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def one_line(message: str) -> str:
    """A message on one line: multi-line texts from libraries (YAML marks, download errors) joined with '; '."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        result = args.handler(args)
    except AJPQError as exc:
        if debug:
            raise
        print(f"ajpq {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"ajpq {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
