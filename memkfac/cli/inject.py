"""`memkfac inject`: make a model memorize canaries (ground truth for removal), and measure it."""

from __future__ import annotations

import argparse
from pathlib import Path

from memkfac.cli.corpus import add_corpus_arguments, corpus_for, model_name
from memkfac.cli.values import (
    add_device_arguments,
    add_model_argument,
    checked_placement,
    count,
    model_layers,
    positive_int,
)
from memkfac.models import DEFAULT_MODEL
from memkfac.paths import memkfac_home

CANARY_FILE = "canaries"  # $MEMKFAC_HOME/probes/canaries.jsonl, where the pipeline reads it


def register(subparsers) -> None:
    from memkfac.arguments import InjectArguments

    r = InjectArguments()
    f = r.finetune
    parser = subparsers.add_parser(
        "inject",
        help="fine-tune a model on canaries so it recites them (the default's ground truth)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a base model on trained canaries mixed with general text, so that it recites\n"
        "them; control canaries from the same generator are never trained on. Then measure strict recall\n"
        "(greedy continuation reproduces the secret exactly) on both sets and held-out perplexity before\n"
        "and after, and write the model with a manifest of all of it.\n\n"
        "Canaries are generated (seeded) unless --probes names your own probe set: its probes of kind\n"
        "'memorized' are trained on, those of kind 'control' are held back. It needs memorized probes in\n"
        "split 'sweep' and in split 'holdout', and control probes (as the pipeline's canaries.file).\n\n"
        "Writes: $MEMKFAC_HOME/probes/canaries.jsonl (generated canaries), $MEMKFAC_HOME/corpora/<model>\n"
        "(built if missing) and $MEMKFAC_HOME/injected/<model> (the model + memkfac_manifest.json).",
        epilog="examples:\n"
        "  memkfac inject                                    # smollm2-135m, 128 + 128 canaries\n"
        "  memkfac inject --threads 1                        # on a busy machine: avoids thread contention\n"
        "  memkfac inject path/to/hf_dir --probes my_secrets.jsonl --train-layers all",
    )
    add_model_argument(parser, "the base model to fine-tune", default=DEFAULT_MODEL)
    c = parser.add_argument_group("canaries")
    c.add_argument("--probes", type=Path, help="your own probe-set JSONL instead of generated canaries")
    c.add_argument(
        "--n-trained", type=positive_int, default=128, help="generated canaries trained on (default: 128)"
    )
    c.add_argument("--n-control", type=count, default=128, help="generated canaries held back (default: 128)")
    c.add_argument("--seed", type=int, default=0, help="canary generator and training seed (default: 0)")
    add_corpus_arguments(parser)
    t = parser.add_argument_group("recipe")
    t.add_argument(
        "--canaries-per-batch", type=positive_int, default=r.canaries_per_batch, help="(default: %(default)s)"
    )
    t.add_argument(
        "--general-per-batch", type=count, default=r.general_per_batch, help="(default: %(default)s)"
    )
    t.add_argument(
        "--general-len",
        type=positive_int,
        default=r.general_len,
        help="tokens per general chunk (default: %(default)s)",
    )
    t.add_argument(
        "--epochs",
        type=positive_int,
        default=f.epochs,
        help="passes over the canaries (default: %(default)s)",
    )
    t.add_argument("--lr", type=float, default=f.lr, help="AdamW peak learning rate (default: %(default)s)")
    t.add_argument("--warmup-steps", type=count, default=f.warmup_steps, help="(default: %(default)s)")
    t.add_argument(
        "--decay",
        choices=("constant", "linear"),
        default=f.decay,
        help="rate after warm-up (default: %(default)s)",
    )
    t.add_argument(
        "--train-layers",
        default=f.train_layers,
        help="decoder layers trained: 'all', '14-29', ... (default: %(default)s)",
    )
    t.add_argument("--train-embeddings", action="store_true", help="also train the (tied) embeddings")
    t.add_argument(
        "--train-on-cue", action="store_true", help="also train on the cue tokens, not just the secret"
    )
    t.add_argument(
        "--heldout-blocks",
        type=positive_int,
        default=r.heldout_blocks,
        help="blocks for perplexity (default: %(default)s)",
    )
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    add_device_arguments(parser, "the fine-tuning (float32 weights)", dtypes=())
    parser.add_argument("--out", type=Path, help="output directory (default: $MEMKFAC_HOME/injected/<model>)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier injected model in --out, a corpus built with other options and a "
        "different generated canary file",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from memkfac.arguments import FinetuneArguments, InjectArguments
    from memkfac.canaries import CanaryArguments, generate_canaries, load_canaries
    from memkfac.corpora import corpus_fingerprint, load_split
    from memkfac.inject import INJECTED, inject_canaries
    from memkfac.models import load_tokenizer, resolve_model
    from memkfac.paths import check_output_dir
    from memkfac.probes import write_probe_set

    if args.threads:
        torch.set_num_threads(args.threads)
    device, _ = checked_placement(args)
    # a bad canary file fails here, before a model is converted or a corpus built
    probes = load_canaries(args.probes, "--probes") if args.probes else None
    home = memkfac_home()
    name = model_name(args.model)
    model_dir = resolve_model(args.model, progress=not args.quiet)
    model_layers(args.train_layers, model_dir)  # a bad --train-layers fails now, not after the corpus
    out = args.out or home / "injected" / name
    corpus_dir = home / "corpora" / name
    # refused now, not after an hour of fine-tuning
    check_output_dir(out, INJECTED, overwrite=args.overwrite, inputs=[model_dir, args.probes, corpus_dir])
    corpus_dir = corpus_for(args, load_tokenizer(model_dir), corpus_dir)
    if probes is None:
        trained, control = generate_canaries(CanaryArguments(args.n_trained, args.n_control, args.seed))
        probes = trained + control
        canary_file = home / "probes" / f"{CANARY_FILE}.jsonl"
        print(f"wrote {write_probe_set(probes, canary_file, overwrite=args.overwrite)}")
    recipe = InjectArguments(
        canaries_per_batch=args.canaries_per_batch,
        general_per_batch=args.general_per_batch,
        general_len=args.general_len,
        heldout_blocks=args.heldout_blocks,
        train_on_cue=args.train_on_cue,
        finetune=FinetuneArguments(
            epochs=args.epochs,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            decay=args.decay,
            seed=args.seed,
            train_layers=args.train_layers,
            train_embeddings=args.train_embeddings,
        ),
    )
    m = inject_canaries(
        model_dir,
        probes,
        load_split(corpus_dir, "finetune"),
        load_split(corpus_dir, "heldout"),
        recipe,
        out,
        general_fingerprint=corpus_fingerprint(corpus_dir, "finetune"),
        progress=not args.quiet,
        overwrite=args.overwrite,
        device=device,
    )
    for kind in ("trained", "control"):
        for split, s in sorted(m["recall"][kind].items()):
            strict, loose = s["strict_pct"], s["loose_pct"]
            print(f"{kind:8s} {split:8s} n={s['n_probes']:4d}  strict {strict:5.1f}%  loose {loose:5.1f}%")
    p = m["perplexity"]
    print(f"held-out perplexity {p['base']:.2f} -> {p['injected']:.2f} ({100 * p['relative_change']:+.1f}%)")
    ft = m["finetune"]
    print(f"fine-tuning {ft['steps']} steps in {ft['seconds']:.0f} s; total {m['seconds']:.0f} s")
    print(f"wrote {out}")
    return 0
