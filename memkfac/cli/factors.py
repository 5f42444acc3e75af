"""``memkfac factors`` (collect K-FAC factors, then their eigenbasis) and ``memkfac eigen``."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

from memkfac.cli.values import (
    add_device_arguments,
    add_model_argument,
    checked_placement,
    int_at_least,
    model_layers,
    name_list,
    positive_int,
)
from memkfac.errors import MemkfacError

_DESCRIPTION = """\
Collect the K-FAC factors of a model's MLP projections over general text (Merullo et al. 2025):
A = E[a a^T] over each tracked map's inputs and G = E[g g^T] over the loss gradients at its outputs,
every position except the last of each block, labels sampled from the model itself (the paper's true
Fisher; --fisher empirical uses the gold next tokens instead). Then decompose them into the eigenbasis
that `memkfac edit` uses (written to OUT/eigenbasis).

The factors are written as shards (OUT/shard-*.safetensors) listed in OUT/index.json. Rerunning the
same command after a crash resumes from the completed shards; a different model, corpus or option
set is refused unless --overwrite. Run under torchrun to spread the work over processes or GPUs.
"""

_EPILOG = """\
examples:
  # the default model, general text from Python's standard library, layers 22-24, 100k tokens
  memkfac factors smollm2-135m --layers 22-24 --tokens 100000 --out factors/smollm2
  # a local model in bf16 on a GPU, gate and up only, a local text corpus
  memkfac factors MODEL_DIR --corpus notes.txt --layers 23-25 --proj gate,up --dtype bfloat16 \\
      --device cuda --tokens 20000000 --block-len 512 --batch-size 32 --out FACTOR_DIR
  # 2 processes on one CPU machine (gloo), or one per GPU (NCCL) with --device cuda
  torchrun --nproc-per-node 2 --no-python memkfac factors MODEL_DIR --layers 22-24 --out FACTOR_DIR
  # recompute only the eigenbasis of finished factors
  memkfac eigen FACTOR_DIR

--corpus takes `stdlib` (default), `hf:NAME[:CONFIG[:SPLIT]]`, a local .txt/.jsonl/.parquet file or
directory (tokenized with the model's tokenizer into MEMKFAC_HOME/corpora/, reused next time), or a
corpus directory already built by memkfac (its `factor` split is used).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "factors",
        help="collect K-FAC factors of MLP projections over general text, and their eigenbasis",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p, "the model whose MLP factors are collected")
    p.add_argument(
        "--corpus", default="stdlib", metavar="SPEC", help="general text to collect over (default: stdlib)"
    )
    p.add_argument("--layers", default="all", help="decoder layers: '22-24', '22,23,24' or 'all' (default)")
    p.add_argument(
        "--proj", type=name_list, default="gate,up,down", help="projections to track (default: gate,up,down)"
    )
    p.add_argument(
        "--modules",
        metavar="PATTERN",
        nargs="+",
        help="track these modules instead: fnmatch globs over module names, or 're:REGEX'",
    )
    p.add_argument(
        "--tokens",
        type=positive_int,
        default=100_000,
        help="contributing tokens to collect over (default 100000; the paper used about 20M)",
    )
    p.add_argument(
        "--block-len", type=int_at_least(2), default=128, help="tokens per packed block (default 128)"
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="blocks per forward pass (default 8)")
    p.add_argument(
        "--fisher",
        choices=("sampled", "empirical"),
        default="sampled",
        help="labels sampled from the model (true Fisher, default) or the gold next tokens",
    )
    p.add_argument("--seed", type=int, default=0, help="label-sampling seed (default 0)")
    p.add_argument(
        "--shard-tokens",
        type=positive_int,
        default=None,
        help="tokens per shard, the unit of resumption (default: at least 65536, and one token per 512 "
        "factor entries so that writing shards stays cheap at 7B scale)",
    )
    # factor sums are always float32
    add_device_arguments(p, dtypes=("float32", "bfloat16"))
    p.add_argument("--out", type=Path, required=True, help="output directory of the factors")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace factors of another model, corpus or option set found in --out",
    )
    p.add_argument(
        "--no-eigen", action="store_true", help="skip the eigenbasis (compute it later: memkfac eigen)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_factors)

    e = subparsers.add_parser(
        "eigen",
        help="eigenbasis of collected factors (memkfac factors computes it unless --no-eigen)",
        description="Decompose merged K-FAC factors: symmetrise, fp64 eigh, clamp tiny negative "
        "eigenvalues to 0, sort descending, store fp32 in OUT/eigenbasis.safetensors + OUT/meta.json.",
    )
    e.add_argument("factors", type=Path, metavar="FACTOR_DIR", help="the --out directory of memkfac factors")
    e.add_argument("--out", type=Path, help="eigenbasis directory (default FACTOR_DIR/eigenbasis)")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier eigenbasis in --out")
    add_device_arguments(e, "the fp64 eigh (cuda is much faster for large d)", dtypes=())
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=run_eigen)


def _corpus_dir(spec: str, tokenizer, block_len: int, tokens: int, progress: bool) -> Path:
    """A built corpus directory for ``spec``: the spec itself if it is one, else built under the data root."""
    from memkfac.corpora import SPLITS, CorpusArguments, build_corpus
    from memkfac.paths import memkfac_home

    if (Path(spec) / "meta.json").is_file():
        return Path(spec)
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    key = hashlib.sha256(f"{spec}|{block_len}|{tokens}|{vocab}".encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(spec).name or spec).strip("-.")[:48] or "corpus"
    out = memkfac_home() / "corpora" / f"{slug}-{key}"
    if not (out / "meta.json").is_file():
        blocks = -(-tokens // (block_len - 1))  # each block gives block_len - 1 contributing tokens
        caps = {s: blocks * block_len if s == "factor" else 0 for s in SPLITS}
        build_corpus(CorpusArguments(spec, block_len, caps), tokenizer, out, progress=progress)
    return out


def run_factors(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from memkfac.corpora import corpus_fingerprint, load_split
    from memkfac.devices import process_group, rank_device
    from memkfac.eigen import EIGEN_SUBDIR, compute_eigenbasis, eigenbasis_is_current
    from memkfac.factors import FactorArguments, collect_factors
    from memkfac.fingerprint import model_fingerprint
    from memkfac.models import load_model, resolve_model

    device = rank_device(args.device, "--device", "torchrun --nproc-per-node")
    with process_group(device) as (rank, world):
        progress = not args.quiet and rank == 0
        # rank 0 resolves (and may download or convert) first; the others then find it cached
        model_dir = resolve_model(args.model, progress=progress) if rank == 0 else None
        if world > 1:
            dist.barrier()
            model_dir = model_dir or resolve_model(args.model, progress=False)
        layers = model_layers(args.layers, model_dir)
        model, tokenizer = load_model(model_dir, dtype=args.dtype, device=device)
        corpus = (
            _corpus_dir(args.corpus, tokenizer, args.block_len, args.tokens, progress) if rank == 0 else None
        )
        if world > 1:
            dist.barrier()
            corpus = corpus or _corpus_dir(args.corpus, tokenizer, args.block_len, args.tokens, False)
        blocks = load_split(corpus, "factor")
        if len(blocks) == 0:
            raise MemkfacError(
                f"the corpus {corpus} has no factor blocks", "use a larger corpus or --block-len"
            )
        fargs = FactorArguments(
            layers=layers,
            projections=args.proj,
            patterns=tuple(args.modules) if args.modules else None,
            fisher=args.fisher,
            seed=args.seed,
            batch_size=args.batch_size,
            shard_tokens=args.shard_tokens,
            max_tokens=args.tokens,
            model_dtype=args.dtype,
        )
        index_path = collect_factors(
            model,
            blocks,
            args.out,
            fargs,
            model_fingerprint=model_fingerprint(model_dir),
            corpus_fingerprint=corpus_fingerprint(corpus, "factor"),
            progress=not args.quiet,
            overwrite=args.overwrite,
            inputs=[model_dir, corpus],
        )
        if rank == 0:
            index = json.loads(index_path.read_text())
            print(
                f"factors: {len(index['targets'])} modules over {index['tokens']} tokens "
                f"in {len(index['shards'])} shards -> {index_path}"
            )
            if not args.no_eigen:
                eig = args.out / EIGEN_SUBDIR
                if eigenbasis_is_current(eig, args.out):
                    print(f"eigenbasis of these factors already in {eig}")
                else:  # the factor directory's own eigenbasis: a stale one is replaced
                    compute_eigenbasis(args.out, eig, progress=progress, device=device, overwrite=True)
                    print(f"eigenbasis -> {eig}")
    return 0


def run_eigen(args: argparse.Namespace) -> int:
    from memkfac.eigen import EIGEN_SUBDIR, compute_eigenbasis, eigenbasis_is_current

    device, _ = checked_placement(args)
    out = args.out or args.factors / EIGEN_SUBDIR
    if not args.overwrite and eigenbasis_is_current(out, args.factors):
        print(f"eigenbasis of these factors already in {out}")
        return 0
    compute_eigenbasis(args.factors, out, progress=not args.quiet, device=device, overwrite=args.overwrite)
    print(f"eigenbasis -> {out}")
    return 0
