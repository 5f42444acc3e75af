"""K-FAC factor collection: A = E[a a^T] over a tracked linear map's inputs, G = E[g g^T] over the loss
gradients at its outputs (Merullo et al. 2025; the estimator of kronfluence and of the paper's code).

The estimator, exactly:
- every position of every block except the last one (it has no next token), and, under an attention
  mask, only positions whose token and next token are both real; positions are selected outright;
- labels sampled from the model's own predictive distribution ("sampled", the true Fisher of the
  paper), each block with its own generator seeded from (seed, block index), or the gold next tokens
  ("empirical");
- loss = cross-entropy SUMMED over the contributing positions, so G is the mean per-token gradient outer
  product, independent of batch size;
- sums in fp32 (fp64 for a float64 model), divided by the token count only when loading; gate_proj and
  up_proj read the same input, so they share one A, computed once.

Speed: every parameter is frozen and each tracked map's input is detached into a fresh leaf that
requires grad, so backward computes no weight gradients and stops at the lowest tracked map. A and G
are added inside the same backward hook, so both see exactly the same tokens.

On disk (``out_dir``): shards of fixed block ranges and ``index.json``, kept by
``memkfac.factor_store`` (which also validates and merges them). The shard plan depends only on the
data and the arguments, so a collection killed part-way resumes from its completed shards and ends
bit-identical to an uninterrupted one. A collection holds its output directory's lock for its whole
run (``memkfac.locks``): a second run into the same directory is refused at once. Under torchrun the
ranks are one writer: rank 0 checks and locks the directory and tells the others, then each rank
computes and writes the shards ``k`` with ``k % world_size == rank`` (disjoint block ranges, no
communication while computing); at the end one gather collects the shard records and rank 0 writes
the final index.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from memkfac.arguments import Checks
from memkfac.errors import MemkfacError
from memkfac.factor_store import (
    FACTORS,
    FORMAT_VERSION,
    INDEX_FILE,
    FactorSums,
    completed_shards,
    discard_other_collection,
    holds_other_collection,
    is_factor_dir,
    staging_dir,
    write_index,
    write_shard,
)
from memkfac.locks import DirectoryLock
from memkfac.paths import check_output_dir, replace_dir
from memkfac.targets import (
    PROJECTIONS,
    LayerSpec,
    Projection,
    Target,
    check_layers,
    find_targets,
    resolve_layers,
)

Fisher = Literal["sampled", "empirical"]
FISHER_TYPES: tuple[Fisher, ...] = get_args(Fisher)
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class FactorArguments:
    """How factors are collected. Everything here is recorded in ``index.json``."""

    layers: LayerSpec | None = None  # decoder layers to track (None: all); a spec is resolved on the model
    projections: tuple[Projection, ...] = ("gate", "up", "down")
    patterns: tuple[str, ...] | None = None  # module-name globs / 're:' regexes replacing the default rule
    fisher: Fisher = "sampled"  # "sampled" (true Fisher, paper) | "empirical" (gold labels)
    seed: int = 0  # label sampling seed (sampled Fisher)
    batch_size: int = 8  # sequences per forward
    shard_tokens: int | None = None  # contributing tokens per shard (whole batches); None: shard_token_count
    max_tokens: int | None = None  # stop after the first blocks holding this many contributing tokens
    model_dtype: Literal["float32", "bfloat16", "float64"] = "float32"  # float64 for tests; sums fp32+

    def __post_init__(self):
        check = Checks()
        if self.layers is not None:
            with check.field("layers"):
                check_layers(self.layers)
        check.subset("projections", self.projections, PROJECTIONS)
        check.require(
            self.fisher in FISHER_TYPES,
            "fisher",
            f"unknown fisher type {self.fisher!r}",
            f"use one of {', '.join(FISHER_TYPES)}",
        )
        check.one_of("model_dtype", self.model_dtype, MODEL_DTYPES)
        for name in ("batch_size", "shard_tokens", "max_tokens"):
            value = getattr(self, name)
            check.require(
                value is None or value >= 1,
                name,
                f"{name} must be positive (got {value})",
                "pass a positive number",
            )
        check.done()

    def to_json(self) -> dict:
        d = asdict(self)
        d["projections"] = list(self.projections)
        d["patterns"] = None if self.patterns is None else list(self.patterns)
        d["layers"] = None if self.layers is None else sorted(self.layers)
        return d


def add_outer_(acc: Tensor, x: Tensor) -> None:
    """``acc += x^T x`` for x (n, d), accumulated in ``acc``'s dtype (fp32 sums of bf16 inputs)."""
    if x.dtype == acc.dtype:
        acc.addmm_(x.T, x)
    elif x.is_cuda:  # bf16 tensor cores with an fp32 result; never a bf16 partial sum
        acc.add_(torch.mm(x.T, x, out_dtype=acc.dtype))
    else:
        x = x.to(acc.dtype)
        acc.addmm_(x.T, x)


class KFACHooks:
    """Hooks on the tracked maps that add the selected positions' ``a a^T`` and ``g g^T`` to ``sums``.

    ``positions`` (set per batch by ``accumulate_batch``) are flat indices into the (batch * seq)
    positions that contribute, or None for all. A forward pre-hook detaches each map's input into a
    leaf that requires grad (so autograd starts there and computes no weight gradients); a tensor hook
    on the output adds G, and A for the first map of each input group, during backward.
    """

    def __init__(self, model: nn.Module, targets: list[Target], sums: FactorSums):
        self.modules = dict(model.named_modules())
        self.targets = targets
        self.sums = sums
        self.positions: Tensor | None = None
        self._owners = {}  # input group -> name of the map that adds its A
        for t in targets:
            self._owners.setdefault(t.input_group, t.name)
        self._inputs: dict[str, Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> KFACHooks:
        for t in self.targets:
            module = self.modules[t.name]
            self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(t)))
            self._handles.append(module.register_forward_hook(self._make_forward_hook(t)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()

    def _select(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, x.shape[-1])
        return x if self.positions is None else x.index_select(0, self.positions)

    def _make_pre_hook(self, target: Target):
        def pre_hook(module, args):
            x = args[0]
            if not x.requires_grad:
                x = x.detach().requires_grad_()
            if self._owners[target.input_group] == target.name:
                self._inputs[target.input_group] = x.detach()
            return (x, *args[1:])

        return pre_hook

    def _make_forward_hook(self, target: Target):
        def backward_hook(grad: Tensor) -> None:
            with torch.no_grad():
                add_outer_(self.sums.G[target.name], self._select(grad))
                if self._owners[target.input_group] == target.name:
                    add_outer_(
                        self.sums.A[target.input_group], self._select(self._inputs.pop(target.input_group))
                    )

        def forward_hook(module, args, output):
            output.register_hook(backward_hook)

        return forward_hook


def contributing_positions(n_blocks: int, seq_len: int, attention_mask: Tensor | None) -> Tensor:
    """(n_blocks, seq_len) bool: positions with a next-token label (not last; token and next token real)."""
    valid = torch.ones(n_blocks, seq_len, dtype=torch.bool)
    valid[:, -1] = False
    if attention_mask is not None:
        m = attention_mask.bool().cpu()
        valid[:, :-1] &= m[:, :-1] & m[:, 1:]
    return valid


def block_seed(seed: int, block: int) -> int:
    """The label-sampling seed of one block: independent of batch size, shard plan and world size."""
    digest = hashlib.sha256(f"memkfac-labels:{seed}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_labels(logits: Tensor, counts: list[int], blocks: list[int], seed: int) -> Tensor:
    """One label per row of ``logits`` (n, vocab), drawn from softmax(logits).

    Rows come in runs of ``counts[i]`` positions of block ``blocks[i]``; each block draws from its own
    generator seeded with ``block_seed(seed, block)``. Returns (n,) int64.
    """
    labels = []
    for chunk, block in zip(
        logits.split(counts), blocks, strict=True
    ):  # one block's probs in memory at a time
        gen = torch.Generator(device=logits.device).manual_seed(block_seed(seed, block))
        labels.append(torch.multinomial(torch.softmax(chunk, dim=-1), 1, generator=gen).squeeze(1))
    return torch.cat(labels)


def accumulate_batch(
    model: nn.Module,
    hooks: KFACHooks,
    ids: Tensor,
    valid: Tensor,
    first_block: int,
    args: FactorArguments,
    attention_mask: Tensor | None = None,
) -> int:
    """Forward and backward one batch, adding its contributing positions to ``hooks.sums``.

    ``ids`` (batch, seq) on the model's device; ``valid`` (batch, seq) bool on CPU from
    ``contributing_positions``; ``first_block`` is the index of the batch's first block (it seeds the
    sampled labels). The loss is the cross-entropy summed over the contributing positions. The model
    must be frozen (``frozen``). Returns the number of positions added.
    """
    device = ids.device
    positions = valid.reshape(-1).nonzero().squeeze(1)  # on CPU: no device sync
    hooks.positions = positions.to(device)
    kwargs = {}
    if attention_mask is not None:  # positions from the mask: left padding gets the packed positions
        kwargs = {
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0),
        }
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    flat = logits.reshape(-1, logits.shape[-1]).index_select(0, hooks.positions)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    if args.fisher == "empirical":
        labels = ids.reshape(-1).index_select(0, hooks.positions + 1)
    else:
        with torch.no_grad():
            counts = valid.sum(1).tolist()
            blocks = [first_block + i for i, c in enumerate(counts) if c]
            labels = sample_labels(flat.detach(), [c for c in counts if c], blocks, args.seed)
    F.cross_entropy(flat, labels, reduction="sum").backward()
    hooks.sums.tokens += len(positions)
    return len(positions)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; restores both afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


MIN_SHARD_TOKENS = 65536
TOKENS_PER_FACTOR_ENTRY = 1 / 512


def shard_token_count(targets: list[Target], args: FactorArguments) -> int:
    """Tokens per shard: ``args.shard_tokens``, or by default at least 65,536 and one token per 512
    factor entries. A shard holds every factor (4 bytes per entry) whatever its token count, so at
    OLMo-2-7B scale a fixed 65,536 would spend twice as long writing shards as computing them
    (measured on an H100, docs/results.md "On a GPU"); one token per 512 entries keeps writes to a few percent
    there and changes nothing for small models, where compute dominates."""
    if args.shard_tokens is not None:
        return args.shard_tokens
    entries = sum(t.in_features**2 for t in {t.input_group: t for t in targets}.values())
    entries += sum(t.out_features**2 for t in targets)
    return max(MIN_SHARD_TOKENS, math.ceil(entries * TOKENS_PER_FACTOR_ENTRY))


def _shard_plan(tokens_per_block: Tensor, args: FactorArguments, shard_tokens: int) -> list[tuple[int, int]]:
    """Block ranges [start, end) of the shards: whole batches of about ``shard_tokens`` tokens each."""
    n = len(tokens_per_block)
    if args.max_tokens is not None:
        n = min(n, int(torch.searchsorted(tokens_per_block.cumsum(0), args.max_tokens)) + 1)
    mean_tokens = max(1.0, float(tokens_per_block[:n].float().mean())) if n else 1.0
    per_shard = max(1, math.ceil(shard_tokens / mean_tokens / args.batch_size)) * args.batch_size
    return [(s, min(s + per_shard, n)) for s in range(0, n, per_shard)]


def _validate(model: nn.Module, blocks: Tensor, attention_mask: Tensor | None, args: FactorArguments) -> None:
    dtype = next(model.parameters()).dtype
    if dtype != MODEL_DTYPES[args.model_dtype]:
        raise MemkfacError(
            f"the model runs in {dtype} but the arguments say model_dtype={args.model_dtype!r}",
            "load the model in the dtype the arguments name (or change model_dtype)",
        )
    if blocks.ndim != 2 or blocks.shape[1] < 2 or blocks.dtype not in (torch.int64, torch.int32):
        raise MemkfacError(
            f"blocks must be integer token ids of shape (n_blocks, seq_len >= 2), got {tuple(blocks.shape)} "
            f"{blocks.dtype}",
            "pass packed blocks from memkfac.corpora.load_split",
        )
    if attention_mask is not None and attention_mask.shape != blocks.shape:
        raise MemkfacError(
            f"attention mask shape {tuple(attention_mask.shape)} differs from blocks {tuple(blocks.shape)}",
            "pass one mask entry per token (1 real, 0 padding)",
        )


def _data_sha256(blocks: Tensor, attention_mask: Tensor | None) -> str:
    h = hashlib.sha256(str(tuple(blocks.shape)).encode())
    h.update(blocks.to(torch.int64).contiguous().numpy().tobytes())
    if attention_mask is not None:
        h.update(attention_mask.to(torch.bool).contiguous().numpy().tobytes())
    return h.hexdigest()


def collect_factors(
    model: nn.Module,
    blocks: torch.LongTensor,
    out_dir: Path,
    args: FactorArguments,
    *,
    model_fingerprint: str,
    corpus_fingerprint: str,
    attention_mask: Tensor | None = None,
    progress: bool = True,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
) -> Path:
    """Collect K-FAC factor sums of ``model`` over ``blocks`` (n_blocks, seq_len) into shards in ``out_dir``.

    ``attention_mask`` (n_blocks, seq_len), 1 for real tokens, is for padded sequences; packed blocks
    need none. Resumes from completed shards of the same collection; refuses shards of another model,
    corpus or arguments, unless ``overwrite``: then the new collection is built in a staging sibling
    and replaces the earlier one only when complete (a rerun resumes it there). ``out_dir`` must be new,
    empty or a factor directory, and may not overlap ``inputs`` (the model and corpus directories read).
    The directory is locked for the whole run. Under torch.distributed every rank calls this with the
    same inputs and ``out_dir`` (a shared file system). Returns the path of ``index.json``.
    """
    if isinstance(args.layers, str):
        args = resolve_layers(args, model.config.num_hidden_layers)
    _validate(model, blocks, attention_mask, args)
    out_dir = Path(out_dir)
    targets = find_targets(model, args.layers, args.projections, args.patterns)
    valid = contributing_positions(*blocks.shape, attention_mask)
    shard_tokens = shard_token_count(targets, args)
    plan = _shard_plan(valid.sum(1), args, shard_tokens)
    identity = {
        "format_version": FORMAT_VERSION,
        "model_fingerprint": model_fingerprint,
        "corpus_fingerprint": corpus_fingerprint,
        "data_sha256": _data_sha256(blocks, attention_mask),
        "arguments": args.to_json(),
        "targets": [t.to_json() | {"input_group": t.input_group} for t in targets],
    }
    header = {
        "fisher": args.fisher,
        "seed": args.seed,
        "seq_len": blocks.shape[1],
        "shard_tokens": shard_tokens,
    }
    rank, world = _dist_info()
    lock = DirectoryLock(out_dir)
    error, work = None, out_dir
    if rank == 0:  # the ranks of one run are one writer: rank 0 claims the directory for all
        try:
            lock.acquire()
            check_output_dir(out_dir, FACTORS, overwrite=True, inputs=inputs, owns=is_factor_dir)
            if overwrite and out_dir.is_dir() and holds_other_collection(out_dir, identity, plan):
                work = staging_dir(out_dir)  # the earlier collection stays whole until this one is
                check_output_dir(work, FACTORS, overwrite=True, inputs=inputs, owns=is_factor_dir)
                work.mkdir(parents=True, exist_ok=True)
                discard_other_collection(work, identity, plan)
            work.mkdir(parents=True, exist_ok=True)
            completed_shards(work, identity, plan)  # another collection is refused before any work
        except MemkfacError as e:
            lock.release()
            error = e
    if world > 1:
        box = [error, work]
        dist.broadcast_object_list(box, src=0)
        error, work = box
    if error is not None:
        raise error
    try:
        _compute_shards(model, blocks, work, args, attention_mask, progress, identity, header, valid, plan)
        if work != out_dir:
            if rank == 0:
                replace_dir(work, out_dir)
            if world > 1:
                dist.barrier()
    finally:
        if rank == 0:
            lock.release()
    if rank == 0 and args.max_tokens is not None and args.max_tokens > valid.sum():
        print(
            f"memkfac factors: the data holds only {int(valid.sum())} contributing tokens, "
            f"fewer than max_tokens={args.max_tokens}; used them all",
            file=sys.stderr,
        )
    return out_dir / INDEX_FILE


def _compute_shards(
    model: nn.Module,
    blocks: Tensor,
    out_dir: Path,
    args: FactorArguments,
    attention_mask: Tensor | None,
    progress: bool,
    identity: dict,
    header: dict,
    valid: Tensor,
    plan: list[tuple[int, int]],
) -> None:
    """Compute and write this rank's missing shards; rank 0 keeps the index current."""
    rank, world = _dist_info()
    targets = find_targets(model, args.layers, args.projections, args.patterns)
    done = completed_shards(out_dir, identity, plan)
    if world > 1:
        dist.barrier()  # every rank has read the resume state before any rank writes
    mine = [k for k in range(len(plan)) if k % world == rank and k not in done]
    device = next(model.parameters()).device
    acc_dtype = torch.float64 if args.model_dtype == "float64" else torch.float32

    written: dict[int, dict] = {}
    bar = tqdm(
        total=int(sum(valid[s:e].sum() for k, (s, e) in enumerate(plan) if k in mine)),
        desc=f"factors (rank {rank})" if world > 1 else "factors",
        unit="tok",
        disable=not progress,
    )
    with frozen(model):
        for k in mine:
            start, end = plan[k]
            sums = FactorSums.zeros(targets, acc_dtype, device)
            with KFACHooks(model, targets, sums) as hooks:
                for b in range(start, end, args.batch_size):
                    stop = min(b + args.batch_size, end)
                    mask = None if attention_mask is None else attention_mask[b:stop].to(device)
                    ids = blocks[b:stop].to(device)
                    bar.update(accumulate_batch(model, hooks, ids, valid[b:stop], b, args, mask))
            meta = identity | header | {"shard": k, "blocks": [start, end], "tokens": sums.tokens}
            written[k] = write_shard(out_dir, k, sums, meta)
            if rank == 0:
                write_index(out_dir, identity, header, done | written, plan)
    bar.close()
    if world > 1:  # every rank's new shard records to every rank
        gathered: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, written)
        for records in gathered:
            written |= records
    if rank == 0:
        write_index(out_dir, identity, header, done | written, plan)
    if world > 1:
        dist.barrier()  # nobody returns before the final index exists
