"""``memkfac bsn``: the BalancedSubnet baseline (a learned sparse mask over MLP weights)."""

from __future__ import annotations

import argparse
from pathlib import Path

from memkfac.cli.values import (
    add_device_arguments,
    add_model_argument,
    checked_placement,
    model_layers,
    name_list,
    positive_int,
    usage_errors,
)

_DESCRIPTION = """\
Train the BalancedSubnet baseline (Sakarvadia et al. 2025) and write the pruned model as a Hugging Face
checkpoint directory with a manifest (memkfac_manifest.json), like `memkfac edit`.

A score per MLP weight decides which weights to prune: the --ratio fraction of each masked matrix with
the smallest |score| is zeroed. Weights stay frozen; SGD trains the scores (straight-through) to raise
the loss on the forget set (memorized probes of --forget-split) and keep it on the retain set (general
text blocks from --retain), with loss = -(1 - w) * CE(forget) + w * CE(retain), w = --loss-weight.
At the end the mask is baked into the weights and the scores are dropped.

Unlike the K-FAC edit, this needs the memorized sequences themselves. The paper's OLMo-2-7B setting
was loss weight 0.7, ratio 0.0015, lr 0.3, 5 epochs over 500 sequences; the defaults here are scaled
for a 135M model and a small forget set (ratio 0.01, 20 epochs), see memkfac/balanced_subnet.py.
Compare with the K-FAC edit at matched perplexity (`memkfac eval`).
"""

_EPILOG = """\
examples:
  # the K-FAC edit's layers and projections, forget = sweep split of the memorized probes
  memkfac bsn MODEL_DIR --probes probes.jsonl --retain CORPUS_DIR --layers 22-24 --out BSN_DIR
  # a sparser mask over gate, up and down, more weight on keeping general text
  memkfac bsn MODEL_DIR --probes probes.jsonl --retain CORPUS_DIR --layers 22-24 --proj gate,up,down \\
      --ratio 0.0015 --loss-weight 0.9 --out BSN_DIR

CORPUS_DIR is a corpus built by memkfac; --retain-split picks its split (default: finetune, the general
text mixed into canary injection, as `memkfac compare` uses; disjoint from the held-out split that
perplexity is measured on).
"""


def register(subparsers) -> None:
    from memkfac.arguments import BSNArguments

    d = BSNArguments(layers="all")  # for the defaults shown in --help
    p = subparsers.add_parser(
        "bsn",
        help="train the BalancedSubnet baseline and write the pruned model",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p, "the model to prune")
    p.add_argument("--probes", required=True, type=Path, metavar="FILE", help="probe-set JSONL file")
    p.add_argument(
        "--forget-split",
        default="sweep",
        choices=["sweep", "holdout", "all"],
        help="which memorized probes form the forget set (default: sweep; report on holdout)",
    )
    p.add_argument("--retain", required=True, type=Path, metavar="CORPUS_DIR", help="corpus of general text")
    p.add_argument(
        "--retain-split",
        default="finetune",
        choices=["factor", "finetune", "heldout"],
        help="default: finetune",
    )
    p.add_argument(
        "--max-retain", type=positive_int, default=256, metavar="N", help="retain blocks used (default: 256)"
    )
    p.add_argument("--layers", required=True, help="decoder layers to mask: '22,23,24', '22-24' or 'all'")
    p.add_argument(
        "--proj", type=name_list, default=d.projections, help="MLP projections to mask (default: gate,up)"
    )
    p.add_argument(
        "--ratio", type=float, default=d.ratio, help=f"fraction of each matrix pruned (default: {d.ratio})"
    )
    p.add_argument(
        "--loss-weight",
        type=float,
        default=d.loss_weight,
        help=f"weight of the retain loss (default: {d.loss_weight})",
    )
    p.add_argument(
        "--lr", type=float, default=d.lr, help=f"SGD learning rate of the scores (default: {d.lr})"
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        default=d.epochs,
        help=f"passes over the forget set (default: {d.epochs})",
    )
    p.add_argument(
        "--forget-per-batch", type=positive_int, default=d.forget_per_batch, help="forget sequences per step"
    )
    p.add_argument(
        "--retain-per-batch", type=positive_int, default=d.retain_per_batch, help="retain blocks per step"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the scores and the batch order")
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="where to write the pruned model: a new or empty directory",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier BalancedSubnet checkpoint in --out (never anything else)",
    )
    add_device_arguments(p, "the mask training (float32 scores)", dtypes=())
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memkfac.balanced_subnet import BSN_CHECKPOINT, BSNArguments, train_balanced_subnet
    from memkfac.corpora import load_split
    from memkfac.errors import MemkfacError
    from memkfac.generation import probes_token_ids
    from memkfac.models import load_config, load_tokenizer, resolve_model
    from memkfac.paths import check_output_dir
    from memkfac.probes import load_probe_set

    progress = not args.quiet
    device, _ = checked_placement(args)
    model_dir = resolve_model(args.model, progress=progress)
    with usage_errors():
        config = BSNArguments(
            layers=model_layers(args.layers, model_dir),
            projections=args.proj,
            ratio=args.ratio,
            loss_weight=args.loss_weight,
            lr=args.lr,
            epochs=args.epochs,
            forget_per_batch=args.forget_per_batch,
            retain_per_batch=args.retain_per_batch,
            seed=args.seed,
        )
    inputs = [model_dir, args.probes, args.retain]
    check_output_dir(args.out, BSN_CHECKPOINT, overwrite=args.overwrite, inputs=inputs)  # before training
    probes = [
        p
        for p in load_probe_set(args.probes)
        if p.kind == "memorized" and args.forget_split in ("all", p.split)
    ]
    if not probes:
        raise MemkfacError(
            f"{args.probes} has no memorized probes in split {args.forget_split!r}",
            "pass a probe set with kind=memorized probes, or choose --forget-split all",
        )
    tokenizer, hf_config = load_tokenizer(model_dir), load_config(model_dir)
    forget = [prompt + gold for prompt, gold in probes_token_ids(probes, tokenizer, hf_config.vocab_size)]
    retain = load_split(args.retain, args.retain_split)[: args.max_retain].tolist()
    manifest = train_balanced_subnet(
        model_dir,
        forget,
        retain,
        config,
        args.out,
        progress=progress,
        overwrite=args.overwrite,
        device=device,
    )
    losses = manifest["losses"]
    print(
        f"forget CE {losses['forget_before']:.3f} -> {losses['forget_after']:.3f} nats/token, "
        f"retain CE {losses['retain_before']:.3f} -> {losses['retain_after']:.3f} "
        f"(first {losses['retain_sequences']} retain blocks)"
    )
    print(
        f"pruned {manifest['n_pruned']:,} weights ({manifest['fraction_pruned']:.3%}) in "
        f"{len(manifest['modules'])} matrices; wrote {args.out} ({manifest['train_seconds']:.0f} s)"
    )
    return 0
