"""`memkfac probes validate`: check a probe-set file and list every error with its line number."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from memkfac.cli.values import positive_int
from memkfac.probes import MIN_SUFFIX_CHARS, TEXT_SUFFIX_WORDS


def register(subparsers) -> None:
    parser = subparsers.add_parser("probes", help="validate probe sets", description="Work with probe sets.")
    sub = parser.add_subparsers(dest="probes_command", metavar="SUBCOMMAND", required=True)
    validate = sub.add_parser(
        "validate",
        help="check a probe-set JSONL file; list every error with its line",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Validate a probe set: one JSON object a line, for example\n"
        '  {"id": "p1", "prefix": "Customer record for Ann Lee:", "suffix": " email ann@x.org",\n'
        '   "kind": "memorized", "source": "crm", "split": "sweep"}\n\n'
        "fields:\n"
        "  id              required, unique (string or integer)\n"
        "  prefix, suffix  the prompt and the text the model must not continue with; or instead\n"
        f"  text            the whole sequence; its last {TEXT_SUFFIX_WORDS} words are the suffix\n"
        "  prefix_ids, suffix_ids  optional token ids for token-exact probes (then texts may be empty)\n"
        "  kind            memorized (default), control, quote, ...\n"
        "  split           sweep (tune layers and rho on it) or holdout (report on it; default)\n"
        "  source          free text\n\n"
        "The official repository's formats also load: prefix_text/suffix_text/prefix_ids/suffix_ids\n"
        "(Dolma memorization sets) and id/prefix/target_suffix (quotes).\n"
        f"Errors: bad JSON, invalid UTF-8, over-long lines, missing fields, duplicate ids, empty or short\n"
        f"suffixes (under {MIN_SUFFIX_CHARS} characters, or under 2 suffix_ids), unknown split values.\n"
        "A file with any error is rejected whole; exit status 1.",
    )
    validate.add_argument("file", type=Path, help="the probe-set .jsonl file")
    validate.add_argument(
        "--text-suffix-words",
        type=positive_int,
        default=TEXT_SUFFIX_WORDS,
        help="suffix words of text-only probes",
    )
    validate.set_defaults(func=_validate)


def _validate(args: argparse.Namespace) -> int:
    from memkfac.probes import load_probe_set

    probes = load_probe_set(args.file, text_suffix_words=args.text_suffix_words)
    counts = Counter((p.kind, p.split) for p in probes)
    print(f"{args.file}: {len(probes)} probes, valid")
    for (kind, split), n in sorted(counts.items()):
        print(f"  {kind:12s} {split:8s} {n:6d}")
    return 0
