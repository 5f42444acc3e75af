"""The ``memkfac`` command line. Each command group lives in its own module with a ``register``.

Registering imports no torch: the modules import the engine inside their commands, so ``--help``
answers at once. Exit status: 0 success, 1 runtime error, 2 usage error (a bad option or value).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from memkfac.cli.values import UsageError
from memkfac.errors import MemkfacError

# Each module defines register(subparsers); the parser it adds sets `func` (args -> int | None).
COMMAND_MODULES: tuple[str, ...] = (
    *("edit", "eval", "compare", "factors", "downstream", "bands", "bsn"),
    *("model", "corpus", "probes", "canaries", "inject", "mine", "register"),
)


def _version() -> str:
    try:
        return version("memkfac")
    except PackageNotFoundError:  # imported from a source tree that pip never installed
        import memkfac

        return f"{memkfac.__version__} (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memkfac",
        description="Remove memorized text from causal LMs by K-FAC curvature editing.",
        epilog="Run `memkfac COMMAND --help` for each command. "
        "Data lives under $MEMKFAC_HOME (default .memkfac). "
        "Exit status: 0 done, 1 runtime error, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"memkfac {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"memkfac.cli.{name}").register(sub)
    for command in sub.choices.values():
        command.set_defaults(usage=command.format_usage)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (argparse has printed help, version or usage errors)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"{args.usage()}memkfac {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MemkfacError as e:
        print(f"memkfac {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
