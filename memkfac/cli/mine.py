"""`memkfac mine`: find sequences a model has memorized (teacher-forced argmax criterion) in any text."""

from __future__ import annotations

import argparse
from itertools import islice
from pathlib import Path

from memkfac.arguments import MineArguments
from memkfac.cli.values import add_device_arguments, add_model_argument, checked_placement, positive_int
from memkfac.models import DEFAULT_MODEL
from memkfac.paths import memkfac_home


def register(subparsers) -> None:
    d = MineArguments()
    parser = subparsers.add_parser(
        "mine",
        help="find memorized sequences in text and write them as a probe set",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Cut texts into candidate windows (a prefix of --prefix-len tokens, then a suffix of\n"
        "--suffix-len tokens) and keep a window when the model's teacher-forced argmax equals the gold\n"
        "token at every suffix position (the paper's criterion; the same as greedy decoding reproducing\n"
        "the suffix). With --quotes each text is one candidate whose last 8 tokens are the suffix.\n"
        "Near-duplicates (Jaccard of suffix token n-grams >= --dedup-threshold) are dropped, the rest\n"
        "split into sweep/holdout halves and written as a token-exact probe set.",
        epilog="examples:\n"
        "  memkfac mine --text stdlib --max-texts 2000           # natural memorization (licences...)\n"
        "  memkfac mine .memkfac/injected/smollm2-135m --probes .memkfac/probes/canaries.jsonl \\\n"
        "               --prefix-len 8 --suffix-len 16 --stride 4\n"
        "  memkfac mine --text quotes.jsonl --quotes --out quotes-probes.jsonl",
    )
    add_model_argument(parser, "the model to search", default=DEFAULT_MODEL)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--text",
        metavar="SPEC",
        help="texts to search: 'stdlib', 'hf:NAME[:CONFIG[:SPLIT]]', or .txt/.jsonl/.parquet files/directory",
    )
    src.add_argument("--probes", type=Path, help="search the texts (prefix + suffix) of a probe-set file")
    parser.add_argument("--text-column", default="text", help="column/field holding the text (default: text)")
    parser.add_argument("--max-texts", type=positive_int, help="search at most this many texts")
    parser.add_argument(
        "--prefix-len", type=positive_int, default=d.prefix_len, help="(default: %(default)s)"
    )
    parser.add_argument(
        "--suffix-len", type=positive_int, default=d.suffix_len, help="(default: %(default)s)"
    )
    parser.add_argument(
        "--stride", type=positive_int, help="tokens between window starts (default: prefix + suffix)"
    )
    parser.add_argument(
        "--quotes", action="store_true", help="one candidate per text: last 8 tokens as suffix"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=d.batch_size,
        help="windows per forward (default: %(default)s)",
    )
    parser.add_argument(
        "--dedup-threshold", type=float, default=d.dedup_threshold, help="(default: %(default)s)"
    )
    parser.add_argument(
        "--dedup-ngram", type=positive_int, default=d.dedup_ngram, help="(default: %(default)s)"
    )
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    add_device_arguments(parser)
    parser.add_argument(
        "--out", type=Path, help="output probe set (default: $MEMKFAC_HOME/probes/mined.jsonl)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, different --out file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from memkfac.corpora import iter_documents
    from memkfac.generation import model_vocab_size, probes_token_ids
    from memkfac.mining import mine
    from memkfac.models import load_model, resolve_model
    from memkfac.paths import check_output_file
    from memkfac.probes import load_probe_set, write_probe_set

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = checked_placement(args)
    model_dir = resolve_model(args.model, progress=not args.quiet)
    out = args.out or memkfac_home() / "probes" / "mined.jsonl"
    text_path = args.text if args.text and Path(args.text).exists() else None
    inputs = [model_dir, args.probes, text_path]
    check_output_file(out, overwrite=args.overwrite, inputs=inputs)  # before the search, not after
    model, tokenizer = load_model(model_dir, dtype=dtype, device=device)
    if args.probes:
        probes = load_probe_set(args.probes)
        ids = probes_token_ids(
            probes, tokenizer, model_vocab_size(model)
        )  # ids the model cannot read: refused
        texts = [
            p.prefix + p.suffix or tokenizer.decode(a + b) for p, (a, b) in zip(probes, ids, strict=True)
        ]
        source = str(args.probes)
    else:
        texts, source = iter_documents(args.text, args.text_column), args.text
    config = MineArguments(
        prefix_len=args.prefix_len,
        suffix_len=args.suffix_len,
        stride=args.stride,
        quotes=args.quotes,
        batch_size=args.batch_size,
        dedup_threshold=args.dedup_threshold,
        dedup_ngram=args.dedup_ngram,
    )
    probes, counts = mine(model, tokenizer, islice(texts, args.max_texts), config, source, not args.quiet)
    print(
        f"{counts['texts']} texts, {counts['candidates']} candidates, {counts['memorized']} memorized, "
        f"{counts['kept']} after de-duplication"
    )
    if not probes:
        print("nothing memorized found; no file written")
        return 0
    out = write_probe_set(probes, out, overwrite=args.overwrite, inputs=inputs)
    print(f"wrote {out}")
    return 0
