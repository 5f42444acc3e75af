"""The ``memkfac`` command line. Each command group lives in its own module with a ``register``."""

from __future__ import annotations

import argparse
import importlib
import sys

from memkfac.errors import MemkfacError

# Each module defines register(subparsers); the parser it adds sets `func` (args -> int | None).
COMMAND_MODULES: tuple[str, ...] = (
    *("edit", "eval", "compare", "factors", "downstream", "bands", "bsn"),
    *("model", "corpus", "probes", "canaries", "inject", "mine"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memkfac",
        description="Remove memorized text from causal LMs by K-FAC curvature editing.",
        epilog="Run `memkfac COMMAND --help` for each command. "
        "Data lives under $MEMKFAC_HOME (default .memkfac).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"memkfac.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MemkfacError as e:
        print(f"memkfac {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
