"""``memkfac eval``: one model on one probe set."""

from __future__ import annotations

import argparse
from pathlib import Path

from memkfac.cli.values import (
    UsageError,
    add_device_arguments,
    add_model_argument,
    checked_placement,
    name,
    positive_int,
    probe_set_name,
)

_EVAL_DESCRIPTION = """\
Measure what a model still recites and how well it still works, and write the results as Parquet
tables under OUT/evals/<table>/variant=<VARIANT>/probe_set=<SET>/part.parquet.

Memorization: for every probe the model greedily continues the prefix for exactly |suffix| tokens;
strict = exact match, loose = 1 - d/L >= 0.75 (d = token edit distance, L = |suffix|), avgLev = mean
d/L. Membership inference: loss, zlib ratio, Min-K% and Min-K%++ of the suffix, and their AUC between
kind=memorized and kind=control probes. With --heldout: perplexity on the corpus's held-out blocks;
with --reference too: nDCG@10 of this model's top-10 next tokens against the reference model's.
"""

_EVAL_EPILOG = """\
examples:
  # the base model and an edit of it, on the same probes and held-out text
  memkfac eval MODEL_DIR --probes probes.jsonl --variant base --heldout CORPUS_DIR
  memkfac eval EDIT_DIR --probes probes.jsonl --variant kfac-r0.9 --heldout CORPUS_DIR \\
      --reference MODEL_DIR
  # add the positional stress test (about 60 generations per probe: use a small probe set)
  memkfac eval EDIT_DIR --probes suppressed.jsonl --variant kfac-r0.9 --stress

PROBES is a probe-set JSONL file (see `memkfac probes validate --help`). CORPUS_DIR is a corpus built
by `memkfac corpus build`. Tables of the same variant and probe set are replaced by the new run.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="measure memorization, membership inference, perplexity and nDCG of one model",
        description=_EVAL_DESCRIPTION,
        epilog=_EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p, "the model to evaluate")
    p.add_argument("--probes", required=True, type=Path, metavar="FILE", help="probe-set JSONL file")
    p.add_argument(
        "--variant", required=True, type=name, help="name of this model in the tables, e.g. base or kfac-r0.9"
    )
    p.add_argument(
        "--probe-set", type=name, help="name of the probe set in the tables (default: the file name stem)"
    )
    p.add_argument(
        "--heldout", type=Path, metavar="CORPUS_DIR", help="corpus whose held-out split gives perplexity"
    )
    p.add_argument(
        "--max-blocks", type=positive_int, metavar="N", help="use only the first N held-out blocks"
    )
    p.add_argument(
        "--reference", metavar="MODEL", help="unedited model for nDCG@10 (needs --heldout); usually the base"
    )
    p.add_argument("--stress", action="store_true", help="also run the positional stress test (slow)")
    p.add_argument("--no-mia", action="store_true", help="skip the membership-inference scores")
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="prompts per generation batch (default: 32)"
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="data root for the tables (default: $MEMKFAC_HOME or .memkfac)",
    )
    add_device_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from memkfac.evaluate import EvalArguments, HeldOut, evaluate_model, reference_topk, write_tables
    from memkfac.models import load_model, resolve_model
    from memkfac.probes import load_probe_set

    progress = not args.quiet
    if args.reference and not args.heldout:
        raise UsageError("--reference needs --heldout", "pass the corpus whose held-out text nDCG runs on")
    device, dtype = checked_placement(args)
    probe_set = probe_set_name(args.probe_set, args.probes)
    probes = load_probe_set(args.probes)
    model_dir = resolve_model(args.model, progress=progress)
    heldout = HeldOut.from_corpus(args.heldout, args.max_blocks) if args.heldout else None
    eval_args = EvalArguments(batch_size=args.batch_size, mia=not args.no_mia, stress=args.stress)
    reference = None
    if args.reference:
        reference_dir = resolve_model(args.reference, progress=progress)
        reference = reference_topk(
            reference_dir, heldout, eval_args.ndcg_k, eval_args.ppl_batch_size, progress, device, dtype
        )
    model, tokenizer = load_model(model_dir, dtype=dtype, device=device)
    tables = evaluate_model(
        model,
        tokenizer,
        probes,
        variant=args.variant,
        probe_set=probe_set,
        args=eval_args,
        heldout=heldout,
        reference=reference,
        reference_name=Path(args.reference).name if args.reference else "",
        progress=progress,
    )
    paths = write_tables(tables, args.out)
    print(format_eval(tables))
    print(f"wrote {len(paths)} tables under {next(iter(paths.values())).parents[3]}")
    return 0


def format_eval(tables) -> str:
    """A short text report of ``evaluate_model``'s tables."""
    lines = [f"{'kind':<12} {'split':<8} {'n':>5} {'strict %':>9} {'loose %':>8} {'avgLev':>7}"]
    for r in tables["memorization_summary"].to_pylist():
        lines.append(
            f"{r['kind']:<12} {r['split']:<8} {r['n_probes']:>5} {r['strict_pct']:>9.1f} "
            f"{r['loose_pct']:>8.1f} {r['avg_lev']:>7.3f}"
        )
    for r in tables["mia_auc"].to_pylist() if "mia_auc" in tables else []:
        lines.append(f"MIA AUC {r['score']:<10} {r['auc']:.3f} ({r['n_members']} vs {r['n_nonmembers']})")
    if "positional_stress" in tables:
        from memkfac.memorization import stress_summary

        s = stress_summary(tables["positional_stress"].to_pylist())
        lines.append(
            f"stress: exact-match length {s['original_mean']:.2f} +- {s['original_std']:.2f} original, "
            f"{s['perturbed_mean']:.2f} +- {s['perturbed_std']:.2f} perturbed (tokens)"
        )
    if "perplexity" in tables:
        r = tables["perplexity"].to_pylist()[0]
        lines.append(
            f"perplexity {r['perplexity']:.3f} over {r['n_tokens']:,} tokens "
            f"(official batch-mean variant {r['perplexity_batch_mean']:.3f})"
        )
    if "ndcg" in tables:
        r = tables["ndcg"].to_pylist()[0]
        lines.append(f"nDCG@{r['k']} {r['ndcg']:.4f} (official variant {r['ndcg_official']:.4f})")
    return "\n".join(lines)
