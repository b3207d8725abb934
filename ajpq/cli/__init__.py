"""The ``ajpq`` console script: one command with subcommands, one module per command family.

* :mod:`ajpq.cli.model`: ``inspect``, ``pretrain``, ``evaluate`` (of the FP32 model, a policy or an artifact);
* :mod:`ajpq.cli.search`: ``search`` (with ``--config`` YAML and ``--resume``) and ``export`` (a run's policy);
* :mod:`ajpq.cli.finetune`: ``finetune``;
* :mod:`ajpq.cli.export`: ``export-model`` (the compressed artifact);
* :mod:`ajpq.cli.compare`: ``compare``;
* :mod:`ajpq.cli.common`: what they share (options generated from the configuration dataclasses, output helpers).

Each command module exposes ``register(subparsers, common)``; ``common`` is the parent parser with the model/data
options every command shares. The modules only parse, call the library and print; nothing outside ``ajpq.cli``
imports them. Bad input raises an :class:`~ajpq.errors.AJPQError`, which is printed as one line and exits with code 2
(a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ajpq._version import __version__
from ajpq.cli import compare, export, finetune, model, search
from ajpq.cli.common import add_debug, one_line, workspace_parser
from ajpq.errors import AJPQError
from ajpq.logs import setup_logging

COMMAND_MODULES = (model, search, finetune, export, compare)
"""Modules that register subcommands, in the order they appear in ``ajpq --help``."""
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with errors that also say where to look for help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


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
    common = workspace_parser()
    for module in COMMAND_MODULES:
        module.register(subparsers, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    setup_logging()
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


__all__ = ["EXIT_USAGE", "build_parser", "main"]
