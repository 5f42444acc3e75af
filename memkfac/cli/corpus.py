"""`memkfac corpus build`: tokenize general text into packed, disjoint factor/finetune/heldout splits."""

from __future__ import annotations

import argparse
from pathlib import Path

from memkfac.cli.values import add_model_argument, count, int_at_least
from memkfac.corpora import DEFAULT_CORPUS, SPLITS, CorpusArguments, build_corpus, load_corpus_meta
from memkfac.models import DEFAULT_MODEL
from memkfac.paths import memkfac_home, safe_name

DEFAULT_SPLIT_TOKENS = {"factor": 102400, "finetune": 65536, "heldout": 16384}


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    """The corpus options shared by `corpus build` and `inject`."""
    g = parser.add_argument_group("general text corpus")
    g.add_argument(
        "--corpus",
        default=DEFAULT_CORPUS,
        metavar="SPEC",
        help="where the text comes from: 'stdlib' (the running Python's standard library, no download; "
        "default), 'hf:NAME[:CONFIG[:SPLIT]]' (a datasets dataset, streamed), or a .txt/.jsonl/.parquet "
        "file or a directory of them",
    )
    g.add_argument("--text-column", default="text", help="column/field holding the text (default: text)")
    g.add_argument(
        "--block-len", type=int_at_least(2), default=128, help="tokens per packed block (default: 128)"
    )
    for split in SPLITS:
        g.add_argument(
            f"--{split}-tokens",
            type=count,
            default=DEFAULT_SPLIT_TOKENS[split],
            metavar="N",
            help=f"tokens in the {split} split (default: {DEFAULT_SPLIT_TOKENS[split]})",
        )


def corpus_for(args: argparse.Namespace, tokenizer, out_dir: Path, rebuild: bool = False) -> Path:
    """Build the corpus the arguments describe into ``out_dir``, or reuse it when already built alike."""
    caps = {s: getattr(args, f"{s}_tokens") for s in SPLITS}
    if not rebuild and (out_dir / "meta.json").is_file():
        meta = load_corpus_meta(out_dir)
        wanted = {"spec": args.corpus, "block_len": args.block_len, "text_column": args.text_column}
        capped = {s: c - c % args.block_len for s, c in caps.items()}
        if {k: meta[k] for k in wanted} == wanted and meta["max_tokens"] == capped:
            print(f"reusing corpus {out_dir}")
            return out_dir
    corpus = CorpusArguments(args.corpus, args.block_len, caps, text_column=args.text_column)
    return build_corpus(corpus, tokenizer, out_dir, progress=not args.quiet, overwrite=args.overwrite)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "corpus",
        help="build general-text corpora (factors, fine-tuning mix, perplexity)",
        description="Work with general-text corpora.",
    )
    sub = parser.add_subparsers(dest="corpus_command", metavar="SUBCOMMAND", required=True)
    build = sub.add_parser(
        "build",
        help="tokenize text into packed blocks and disjoint splits",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenize general text with a model's tokenizer, pack it into fixed-length blocks and\n"
        "split it into three disjoint splits: factor (K-FAC statistics), finetune (the injection mix,\n"
        "resurgence) and heldout (perplexity). Each document goes to one split by the hash of its text.\n"
        "Writes <split>.safetensors and meta.json (counts and fingerprints) into the output directory.",
        epilog="examples:\n"
        "  memkfac corpus build                                  # stdlib text, smollm2-135m tokenizer\n"
        "  memkfac corpus build allenai/OLMo-2-0425-1B --corpus hf:NeelNanda/pile-10k\n"
        "  memkfac corpus build --corpus my_docs/ --text-column body --out corpora/mine",
    )
    add_model_argument(build, "the model whose tokenizer cuts the text", default=DEFAULT_MODEL)
    add_corpus_arguments(build)
    build.add_argument(
        "--out", type=Path, help="output directory (default: $MEMKFAC_HOME/corpora/<model name>)"
    )
    build.add_argument("--overwrite", action="store_true", help="replace an earlier corpus in --out")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=_build)


def model_name(spec: str) -> str:
    """A file-safe name for a model spec: the builtin name, or the directory / hub repo name."""
    return safe_name(Path(spec.rstrip("/")).name, "model name")


def _build(args: argparse.Namespace) -> int:
    from memkfac.models import load_tokenizer, resolve_model

    model_dir = resolve_model(args.model, progress=not args.quiet)
    out = args.out or memkfac_home() / "corpora" / model_name(args.model)
    corpus_for(args, load_tokenizer(model_dir), out, rebuild=True)
    for split, info in load_corpus_meta(out)["splits"].items():
        blocks, tokens, docs = info["n_blocks"], info["tokens"], info["n_documents"]
        print(f"{split:9s} {blocks:6d} blocks  {tokens:8d} tokens  {docs:6d} documents")
    print(f"wrote {out}")
    return 0
