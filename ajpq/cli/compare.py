"""``ajpq compare``: several methods at several budgets (see :mod:`ajpq.compare`)."""

from __future__ import annotations

import argparse

from ajpq.backends import BackendOptions
from ajpq.cli.common import add_backend_arguments, add_debug, print_json
from ajpq.compare import load_compare_config, markdown_table, run_compare


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    compare = subparsers.add_parser(
        "compare",
        help="run several methods at several budgets, fine-tune alike, write a table and a Pareto plot",
        description="Run the methods of --config (ajpq, local, random, uniform, opq, olmp, admm) at each size budget, "
        "fine-tune every result for the same epochs, and write compare.csv, compare.md and compare_pareto.png "
        "(test accuracy against compression rate) in the config's out_dir.",
    )
    compare.add_argument("--config", required=True, help="experiments/compare_<name>.yaml (a `default:` block)")
    compare.add_argument("--out-dir", default=None, help="output folder (default: the config's out_dir)")
    compare.add_argument("--device", default=None, help="cpu, cuda or auto (default: the config's device)")
    compare.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    add_backend_arguments(compare)
    add_debug(compare)
    compare.set_defaults(handler=run_compare_command)


def run_compare_command(args: argparse.Namespace) -> int:
    config = load_compare_config(args.config, out_dir=args.out_dir, device=args.device)
    backend = BackendOptions(args.backend or "local", args.workers, args.ray_address)
    result = run_compare(config, backend)
    if args.json:
        print_json(result)
        return 0
    print(markdown_table(result["rows"], result["fp32"], result["reference"]), end="")
    print(f"wrote {result['csv']}, {result['table']} and {result['plot']}")
    return 0
