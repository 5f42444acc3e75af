"""``memkfac compare``: the Table-1 comparison on a memorizing model."""

from __future__ import annotations

import argparse
from pathlib import Path

from memkfac.cli.values import (
    add_device_arguments,
    add_model_argument,
    checked_placement,
    float_list,
    int_at_least,
    name,
    name_list,
    positive_int,
    probe_set_name,
    usage_errors,
)

_COMPARE_DESCRIPTION = """\
The paper's Table 1 on a memorizing model, in one command: the unedited model, the K-FAC edit, its
per-side, SVD and random-basis controls, the forget-set baselines (BalancedSubnet, GA+GD, NPO) and the
label-free baselines (identity basis, flattest-block deletion, matched-norm noise), each evaluated on
trained probes it never saw, control probes, membership inference, held-out perplexity, nDCG@10 and the
downstream suite; then a relearning table for K-FAC, GA+GD and NPO, and a recall-vs-perplexity figure.

How it is chosen: K-FAC factors are collected on the corpus's factor split. For each --layers set the
rho grid is walked from the gentlest edit down until strict recall on the probe set's *sweep* split is
<= --max-sweep-recall; of those, the edit with the lowest perplexity is the K-FAC row. Every other row
(but BalancedSubnet, at its configured strength) edits the same layers at the strength that matches
that perplexity: bisection for controls and label-free baselines, the closest of the --forget-steps grid
for GA+GD and NPO (trained on the sweep split; the --forget-lrs rates tried in increasing order until a
run reaches that perplexity). A row whose perplexity increase over the base is not within
--match-tolerance of the K-FAC edit's is marked in the report. Rows report the *holdout* split.

Factors, sweep measurements, chosen edits, BalancedSubnet and downstream scores are cached under
$MEMKFAC_HOME/cache by content, so a rerun only computes what changed. Results: Parquet tables under
$MEMKFAC_HOME/evals, a Markdown report (--report) and the same table printed.
"""

_COMPARE_EPILOG = """\
examples:
  # the embedded default: the canary-injected SmolLM2-135M and its canary probe set
  memkfac compare MEMORIZING_MODEL_DIR --probes canaries.jsonl --corpus CORPUS_DIR
  # a quick look: two layer sets, three rhos, the SVD control and NPO only, no relearning or downstream
  memkfac compare MODEL_DIR --probes probes.jsonl --corpus CORPUS_DIR --layers 22-24 26-28 \\
      --rhos 0.99,0.95,0.9 --methods svd,npo --no-relearn --no-downstream

PROBES needs trained probes (kind memorized) in both splits, sweep and holdout, and ideally control
probes (kind control) the model never saw. CORPUS_DIR is built by `memkfac corpus build` (factor,
finetune and heldout splits). Expect hours on a 2-core CPU for a 135M model with every row enabled.
"""


def register(subparsers) -> None:
    from memkfac.arguments import COMPARE_METHODS, CompareArguments
    from memkfac.downstream import MIN_ITEMS

    d = CompareArguments()
    p = subparsers.add_parser(
        "compare",
        help="the Table-1 comparison: K-FAC edit vs controls, forget-set and label-free baselines",
        description=_COMPARE_DESCRIPTION,
        epilog=_COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p, "the memorizing model")
    p.add_argument("--probes", required=True, type=Path, metavar="FILE", help="probe-set JSONL file")
    p.add_argument(
        "--corpus", required=True, type=Path, metavar="DIR", help="corpus built by `memkfac corpus build`"
    )
    p.add_argument(
        "--probe-set", type=name, help="name of the probe set in the tables (default: the file name stem)"
    )
    default_layers = " ".join(f"{s[0]}-{s[-1]}" for s in d.layer_sets)
    p.add_argument(
        "--layers",
        nargs="+",
        metavar="SET",
        help=f"layer sets to sweep, each like 22-24 or 22,23,24 (default: {default_layers})",
    )
    p.add_argument(
        "--rhos",
        type=float_list,
        metavar="LIST",
        help=f"keep-mass grid, comma-separated (default: {','.join(map(str, d.rhos))})",
    )
    p.add_argument(
        "--proj", type=name_list, default=d.projections, help="projections to edit (default: gate,up)"
    )
    p.add_argument(
        "--max-sweep-recall",
        type=float,
        default=d.max_sweep_recall,
        metavar="PCT",
        help=f"strict recall on the sweep split that counts as removed (default: {d.max_sweep_recall})",
    )
    p.add_argument(
        "--factor-tokens",
        type=positive_int,
        default=d.factor_tokens,
        metavar="N",
        help=f"factor-split tokens for the K-FAC factors (default: {d.factor_tokens})",
    )
    p.add_argument(
        "--sweep-blocks",
        type=positive_int,
        default=d.sweep_blocks,
        metavar="N",
        help="held-out blocks for sweep perplexity",
    )
    p.add_argument(
        "--eval-blocks",
        type=positive_int,
        default=d.eval_blocks,
        metavar="N",
        help=f"the first N held-out blocks (never the sweep's), for the reported perplexity and nDCG "
        f"(default: {d.eval_blocks})",
    )
    p.add_argument(
        "--methods",
        type=name_list,
        metavar="LIST",
        default=d.methods,
        help=f"rows besides base and K-FAC, comma-separated from {','.join(COMPARE_METHODS)} (default: all)",
    )
    p.add_argument(
        "--forget-steps",
        type=float_list,
        metavar="LIST",
        help="GA+GD and NPO: the steps grid matched to the K-FAC perplexity "
        f"(default: {','.join(map(str, d.forget_steps))})",
    )
    p.add_argument(
        "--forget-lrs",
        type=float_list,
        default=d.forget_lrs,
        metavar="LIST",
        help="GA+GD and NPO: AdamW rates, tried in increasing order until a run reaches the K-FAC "
        f"perplexity (default: {','.join(map(str, d.forget_lrs))})",
    )
    p.add_argument(
        "--match-tolerance",
        type=float,
        default=d.match_tolerance,
        metavar="FRAC",
        help="a row is matched when its perplexity increase is within this share of the K-FAC edit's "
        f"(default: {d.match_tolerance})",
    )
    p.add_argument(
        "--npo-beta",
        type=float,
        default=d.npo_beta,
        metavar="BETA",
        help=f"NPO's beta (default: {d.npo_beta})",
    )
    p.add_argument(
        "--bsn-ratio", type=float, metavar="FRAC", help="BalancedSubnet: fraction of each matrix pruned"
    )
    p.add_argument(
        "--bsn-epochs", type=positive_int, metavar="N", help="BalancedSubnet: passes over the sweep split"
    )
    p.add_argument(
        "--no-relearn",
        action="store_true",
        help="skip the relearning table (K-FAC, GA+GD, NPO fine-tuned back)",
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log the comparison to MLflow")
    p.add_argument("--no-downstream", action="store_true", help="skip the downstream task suite")
    p.add_argument(
        "--tasks", type=name_list, help="downstream tasks, comma-separated (default: the generated suite)"
    )
    p.add_argument(
        "--items",
        type=int_at_least(MIN_ITEMS),
        default=d.downstream_items,
        metavar="N",
        help=f"items per generated task (>= {MIN_ITEMS})",
    )
    p.add_argument("--report", type=Path, metavar="FILE", help="Markdown report path")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --report file that is not an earlier report",
    )
    add_device_arguments(p, "every model of the comparison", dtypes=("float32", "bfloat16"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_compare)


def compare_arguments(args: argparse.Namespace, num_layers: int):
    """The ``CompareArguments`` the command line asks for (layer specs resolved for ``num_layers``)."""
    from memkfac.arguments import CompareArguments
    from memkfac.errors import MemkfacError
    from memkfac.targets import parse_layers

    compare_args = CompareArguments(
        projections=args.proj,
        max_sweep_recall=args.max_sweep_recall,
        factor_tokens=args.factor_tokens,
        sweep_blocks=args.sweep_blocks,
        eval_blocks=args.eval_blocks,
        methods=args.methods,
        forget_lrs=tuple(args.forget_lrs),
        match_tolerance=args.match_tolerance,
        npo_beta=args.npo_beta,
        relearn=not args.no_relearn,
        mlflow=not args.no_mlflow,
        bsn_ratio=args.bsn_ratio,
        bsn_epochs=args.bsn_epochs,
        downstream=not args.no_downstream,
        downstream_tasks=args.tasks,
        downstream_items=args.items,
    )
    with usage_errors():
        if args.layers:
            compare_args.layer_sets = tuple(tuple(parse_layers(s, num_layers)) for s in args.layers)
        if args.rhos:
            compare_args.rhos = args.rhos
        if args.forget_steps:
            if any(s != int(s) for s in args.forget_steps):
                raise MemkfacError(
                    f"--forget-steps {list(args.forget_steps)} are not whole numbers", "e.g. 10,20,40"
                )
            compare_args.forget_steps = tuple(int(s) for s in args.forget_steps)
        compare_args.check()
    return compare_args


def run_compare(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from memkfac.compare import run_comparison
    from memkfac.models import resolve_model
    from memkfac.probes import load_probe_set

    progress = not args.quiet
    device, dtype = checked_placement(args)
    probe_set = probe_set_name(args.probe_set, args.probes)
    model_dir = resolve_model(args.model, progress=progress)
    compare_args = compare_arguments(args, AutoConfig.from_pretrained(model_dir).num_hidden_layers)
    probes = load_probe_set(args.probes)
    run_comparison(
        model_dir,
        probes,
        args.corpus,
        compare_args,
        probe_set=probe_set,
        report_path=args.report,
        progress=progress,
        overwrite=args.overwrite,
        device=device,
        dtype=dtype,
    )
    return 0
