"""``vllm-plugins``: the package's command line.

Each subcommand lives in its own module, which provides
``add_parser(subparsers)`` returning the parser it added, with
``set_defaults(func=...)`` pointing at a function that takes the parsed
namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from quant.errors import CLIError, run_command  # noqa: F401  (CLIError re-exported: the shared user-error type)

# Modules that contribute subcommands, in help order.
SUBCOMMAND_MODULES: list[str] = [
    "models.convert",
    "models.demo",
    "quant.cli",
    "vllm_plugins.evaluation.cli",
    "eagle.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-plugins",
        description="Tools of the vllm-plugins package: quantize, convert, evaluate, train drafters.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    return run_command(f"vllm-plugins {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
