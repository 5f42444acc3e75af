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

On disk (``out_dir``): ``shard-XXXXX.safetensors`` files, each the fp32 sums ``A_sum.<group>``,
``G_sum.<module>`` and ``tokens`` of a fixed block range, and ``index.json`` listing them with sha256.
Shards merge exactly by addition. The shard plan depends only on the data and the arguments, so a
collection killed part-way resumes from its completed shards and ends bit-identical to an
uninterrupted one. Under torchrun each rank computes and writes the shards ``k`` with
``k % world_size == rank`` (disjoint block ranges, no communication while computing); at the end a
single collective gathers the shard records and rank 0 writes the final index.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from memkfac.arguments import Checks
from memkfac.errors import MemkfacError
from memkfac.fingerprint import sha256_file
from memkfac.paths import atomic_file, write_json
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
INDEX_FILE = "index.json"
FORMAT_VERSION = 1
# What must agree for shards to belong to the same collection (checked on resume and on load).
_IDENTITY_KEYS = ("model_fingerprint", "corpus_fingerprint", "data_sha256", "arguments", "targets")


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


@dataclass
class ModuleFactors:
    """Normalised factors of one tracked map: A (d_in, d_in) and G (d_out, d_out), means over ``tokens``."""

    A: Tensor
    G: Tensor
    tokens: int


@dataclass
class FactorSums:
    """Unnormalised sums: ``A[group]`` (d_in, d_in) per input group, ``G[name]`` (d_out, d_out) per map."""

    A: dict[str, Tensor] = field(default_factory=dict)
    G: dict[str, Tensor] = field(default_factory=dict)
    tokens: int = 0

    @classmethod
    def zeros(cls, targets: list[Target], dtype: torch.dtype, device: torch.device) -> FactorSums:
        sums = cls()
        for t in targets:
            sums.A.setdefault(
                t.input_group, torch.zeros(t.in_features, t.in_features, dtype=dtype, device=device)
            )
            sums.G[t.name] = torch.zeros(t.out_features, t.out_features, dtype=dtype, device=device)
        return sums

    def add_(self, other: FactorSums) -> FactorSums:
        for k, v in other.A.items():
            self.A[k].add_(v)
        for k, v in other.G.items():
            self.G[k].add_(v)
        self.tokens += other.tokens
        return self

    def tensors(self) -> dict[str, Tensor]:
        """The safetensors payload of a shard (on CPU, contiguous)."""
        out = {f"A_sum.{k}": v.cpu().contiguous() for k, v in self.A.items()}
        out |= {f"G_sum.{k}": v.cpu().contiguous() for k, v in self.G.items()}
        out["tokens"] = torch.tensor([self.tokens], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> FactorSums:
        sums = cls(tokens=int(tensors["tokens"].item()))
        for key, value in tensors.items():
            kind, _, name = key.partition(".")
            if kind == "A_sum":
                sums.A[name] = value
            elif kind == "G_sum":
                sums.G[name] = value
        return sums


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
    (measured on an H100, README "On a GPU"); one token per 512 entries keeps writes to a few percent
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


def _read_index(factor_dir: Path) -> dict | None:
    path = factor_dir / INDEX_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise MemkfacError(
            f"{path} is not valid JSON", f"delete {factor_dir} and collect the factors again"
        ) from None


def _shard_meta(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["memkfac"])
    except Exception as e:  # unreadable header, missing metadata: the file is not a whole shard
        raise MemkfacError(
            f"factor shard {path} is corrupt or not a memkfac shard ({type(e).__name__}: {e})",
            f"delete {path}; rerunning the same collection recomputes it",
        ) from None


def _check_identity(found: dict, expected: dict, where: Path) -> None:
    differing = [k for k in _IDENTITY_KEYS if found.get(k) != expected[k]]
    if differing:
        raise MemkfacError(
            f"{where} holds factors of another collection: {', '.join(differing)} differ "
            "(another model, corpus or arguments)",
            "pass a new output directory, or delete the old one to recollect",
        )


def _completed_shards(out_dir: Path, identity: dict, plan: list[tuple[int, int]]) -> dict[int, dict]:
    """Shards already on disk for this collection (the resume point), verified against the index."""
    index = _read_index(out_dir)
    if index is not None:
        _check_identity(index, identity, out_dir / INDEX_FILE)
    listed = {s["file"]: s for s in (index or {}).get("shards", [])}
    done = {}
    for path in sorted(out_dir.glob("shard-*.safetensors")):
        meta = _shard_meta(path)
        _check_identity(meta, identity, path)
        k = meta["shard"]
        if k >= len(plan) or tuple(meta["blocks"]) != plan[k]:
            raise MemkfacError(f"{path} covers blocks {meta['blocks']}, not this plan's shard", "delete it")
        sha = sha256_file(path)
        if path.name in listed and listed[path.name]["sha256"] != sha:
            raise MemkfacError(
                f"factor shard {path} does not match its sha256 in {INDEX_FILE} (corrupt)",
                f"delete {path}; rerunning the same collection recomputes it",
            )
        done[k] = {"file": path.name, "sha256": sha, "tokens": meta["tokens"], "blocks": meta["blocks"]}
    return done


def _discard_unusable(out_dir: Path, identity: dict, plan: list[tuple[int, int]]) -> None:
    """Delete the shards and index in ``out_dir`` unless they all belong to this collection."""
    try:
        _completed_shards(out_dir, identity, plan)
    except MemkfacError:
        for path in [*out_dir.glob("shard-*.safetensors"), out_dir / INDEX_FILE]:
            path.unlink(missing_ok=True)


def _write_index(out_dir: Path, identity: dict, header: dict, shards: dict[int, dict], planned: int) -> Path:
    records = [shards[k] for k in sorted(shards)]
    return write_json(
        out_dir / INDEX_FILE,
        identity
        | header
        | {
            "tokens": sum(r["tokens"] for r in records),
            "shards": records,
            "planned_shards": planned,
            "complete": len(records) == planned,
        },
    )


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
) -> Path:
    """Collect K-FAC factor sums of ``model`` over ``blocks`` (n_blocks, seq_len) into shards in ``out_dir``.

    ``attention_mask`` (n_blocks, seq_len), 1 for real tokens, is for padded sequences; packed blocks
    need none. Resumes from completed shards of the same collection; refuses shards of another model,
    corpus or arguments, unless ``overwrite`` (then they are deleted first). Under torch.distributed
    every rank calls this with the same inputs and ``out_dir`` (a shared file system). Returns the path
    of ``index.json``.
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
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and rank == 0:
        _discard_unusable(out_dir, identity, plan)
    if world > 1:
        dist.barrier()
    done = _completed_shards(out_dir, identity, plan)
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
            path = out_dir / f"shard-{k:05d}.safetensors"
            with atomic_file(path) as tmp:
                save_file(sums.tensors(), str(tmp), metadata={"memkfac": json.dumps(meta, sort_keys=True)})
            written[k] = {
                "file": path.name,
                "sha256": sha256_file(path),
                "tokens": sums.tokens,
                "blocks": [start, end],
            }
            if rank == 0:
                _write_index(out_dir, identity, header, done | written, len(plan))
    bar.close()
    if world > 1:  # the one collective of the run: every rank's new shard records to every rank
        gathered: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, written)
        for records in gathered:
            written |= records
    if rank == 0:
        _write_index(out_dir, identity, header, done | written, len(plan))
    if world > 1:
        dist.barrier()  # nobody returns before the final index exists
    if rank == 0 and args.max_tokens is not None and args.max_tokens > valid.sum():
        print(
            f"memkfac factors: the data holds only {int(valid.sum())} contributing tokens, "
            f"fewer than max_tokens={args.max_tokens}; used them all",
            file=sys.stderr,
        )
    return out_dir / INDEX_FILE


def load_factor_sums(factor_dir: Path) -> tuple[FactorSums, dict]:
    """Merge a complete collection's shards by addition, verifying each shard's sha256.

    Returns the summed ``FactorSums`` and the index. Raises ``MemkfacError`` naming the shard when one
    is missing or corrupt, and naming the module when a sum holds NaN or Inf.
    """
    factor_dir = Path(factor_dir)
    index = _read_index(factor_dir)
    if index is None:
        raise MemkfacError(
            f"no {INDEX_FILE} in {factor_dir}: not a factor directory",
            "point at the --out directory of `memkfac factors`",
        )
    if not index.get("complete"):
        raise MemkfacError(
            f"the factor collection in {factor_dir} is incomplete ({len(index['shards'])} of "
            f"{index['planned_shards']} shards)",
            "rerun the same `memkfac factors` command; it resumes from the completed shards",
        )
    total: FactorSums | None = None
    for record in index["shards"]:
        path = factor_dir / record["file"]
        fix = f"rerun the same `memkfac factors` command after deleting {path.name}; it recomputes that shard"
        if not path.is_file():
            raise MemkfacError(f"factor shard {path} is missing", fix)
        if sha256_file(path) != record["sha256"]:
            raise MemkfacError(
                f"factor shard {path} does not match its sha256 in {INDEX_FILE} (corrupt)", fix
            )
        _check_identity(_shard_meta(path), index, path)
        sums = FactorSums.from_tensors(load_file(str(path)))
        total = sums if total is None else total.add_(sums)
    if total is None or total.tokens == 0:
        raise MemkfacError(
            f"the factors in {factor_dir} saw no tokens", "collect over a non-empty corpus (check --tokens)"
        )
    for kind, tensors in (("A", total.A), ("G", total.G)):
        for name, value in tensors.items():
            if not torch.isfinite(value).all():
                raise MemkfacError(
                    f"factor {kind} of {name} in {factor_dir} contains NaN or Inf",
                    "recollect with model_dtype float32 (bf16 overflow is the usual cause) or check the "
                    "model's weights for NaN",
                )
    return total, index


def load_factors(factor_dir: Path) -> dict[str, ModuleFactors]:
    """Merged, normalised factors per tracked map (gate and up share one A tensor)."""
    sums, index = load_factor_sums(factor_dir)
    n = sums.tokens
    A = {group: a / n for group, a in sums.A.items()}
    return {
        t["name"]: ModuleFactors(A=A[t["input_group"]], G=sums.G[t["name"]] / n, tokens=n)
        for t in index["targets"]
    }
