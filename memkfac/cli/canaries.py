"""`memkfac canaries`: write seeded synthetic canaries (trained + control) as a probe set."""

from __future__ import annotations

import argparse
from pathlib import Path

from memkfac.cli.values import count, positive_int
from memkfac.paths import memkfac_home


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "canaries",
        help="generate seeded synthetic canaries (records and secrets) as a probe set",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate synthetic personal-data-like records (name, email, phone, address, account,\n"
        "IBAN, date of birth) and secrets (API keys, passwords), each a cue (the prefix, e.g.\n"
        "'Customer record for Norma Fisher:') and a secret continuation (the suffix). Two sets from one\n"
        "seeded generator: trained (kind memorized, half sweep / half holdout) and control (never\n"
        "trained on). Same seed and counts give the same file. `memkfac inject` trains on them.",
        epilog="example:\n  memkfac canaries --n-trained 256 --n-control 256 --out my_canaries.jsonl",
    )
    parser.add_argument(
        "--n-trained", type=positive_int, default=128, help="canaries to train on (default: 128)"
    )
    parser.add_argument("--n-control", type=count, default=128, help="canaries held back (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    parser.add_argument(
        "--out", type=Path, help="output JSONL (default: $MEMKFAC_HOME/probes/canaries.jsonl)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, different --out file")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from memkfac.canaries import CanaryArguments, generate_canaries
    from memkfac.probes import write_probe_set

    trained, control = generate_canaries(CanaryArguments(args.n_trained, args.n_control, args.seed))
    out = args.out or memkfac_home() / "probes" / "canaries.jsonl"
    path = write_probe_set(trained + control, out, overwrite=args.overwrite)
    print(f"example: {trained[0].prefix!r} -> {trained[0].suffix!r}")
    print(f"wrote {len(trained)} trained + {len(control)} control canaries to {path}")
    return 0
