"""The factor shard store: shard files, the index, their validation, resumption and the exact merge.

A factor directory holds ``shard-XXXXX.safetensors`` files, each the fp32 (fp64 for a float64 model)
sums ``A_sum.<group>``, ``G_sum.<module>`` and ``tokens`` of one planned block range, with its
collection's identity in the safetensors metadata (key ``memkfac``), and ``index.json`` listing them
with their sha256. Shards merge exactly by addition.

The index cannot lie: loading checks that its records are unique and cover the planned block ranges
exactly once each, that every shard is the one its record names (sha256, shard number, blocks,
tokens) and that it belongs to the same collection (model, corpus, data, arguments, targets).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from memkfac.errors import MemkfacError
from memkfac.fingerprint import sha256_file
from memkfac.paths import ArtifactKind, atomic_file, read_json_object, read_safetensors, write_json

INDEX_FILE = "index.json"
FORMAT_VERSION = 1
SHARD_PATTERN = re.compile(r"^shard-(\d{5})\.safetensors$")
# What must agree for shards to belong to the same collection (checked on resume and on load).
IDENTITY_KEYS = ("model_fingerprint", "corpus_fingerprint", "data_sha256", "arguments", "targets")
_INDEX_KEYS = ("model_fingerprint", "targets", "shards", "planned_shards", "complete", "tokens", "fisher")
RECOLLECT = (
    "rerun the same `memkfac factors` command: it resumes, rebuilding index.json from the verified shards"
)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def is_factor_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a factor collection and nothing else (its eigenbasis and the
    temporary files and locks of a killed run allowed)."""
    from memkfac.eigen import EIGENBASIS

    seen_factors = False
    for entry in directory.iterdir():
        name = entry.name
        if name == INDEX_FILE or SHARD_PATTERN.match(name):
            seen_factors = True
        elif (
            name.startswith(".tmp-")
            or name.endswith(".memkfac-lock")
            or (
                name == "eigenbasis"
                and entry.is_dir()
                and (not any(entry.iterdir()) or EIGENBASIS.recognises(entry))
            )
        ):
            continue
        else:
            return False
    return seen_factors


FACTORS = ArtifactKind("factors", "a factor collection (written by `memkfac factors`)")


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
    def zeros(cls, targets, dtype: torch.dtype, device: torch.device) -> FactorSums:
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


def read_index(factor_dir: Path) -> dict | None:
    """The index of a factor directory, or None when there is none yet."""
    path = Path(factor_dir) / INDEX_FILE
    if not path.is_file():
        return None
    return read_json_object(path, RECOLLECT, "factor index", _INDEX_KEYS)


def factor_index_sha256(factor_dir: Path) -> str:
    """The sha256 of ``index.json``: names exactly these factors (an eigenbasis records it)."""
    path = Path(factor_dir) / INDEX_FILE
    if not path.is_file():
        raise MemkfacError(
            f"no {INDEX_FILE} in {factor_dir}: not a factor directory",
            "point at the --out directory of `memkfac factors`",
        )
    return sha256_file(path)


def shard_meta(path: Path) -> dict:
    """The collection identity and block range a shard file records in its metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["memkfac"])
    except Exception as e:  # unreadable header, missing metadata: the file is not a whole shard
        raise MemkfacError(
            f"factor shard {path} is corrupt or not a memkfac shard ({type(e).__name__}: {e})",
            f"delete {path}; rerunning the same collection recomputes it",
        ) from None


def check_identity(found: dict, expected: dict, where: Path) -> None:
    differing = [k for k in IDENTITY_KEYS if found.get(k) != expected.get(k)]
    if differing:
        raise MemkfacError(
            f"{where} holds factors of another collection: {', '.join(differing)} differ "
            "(another model, corpus or arguments)",
            "pass a new output directory, or --overwrite to replace that collection",
        )


def write_shard(out_dir: Path, k: int, sums: FactorSums, meta: dict) -> dict:
    """Write shard ``k`` atomically; return its index record."""
    path = Path(out_dir) / shard_name(k)
    with atomic_file(path) as tmp:
        save_file(sums.tensors(), str(tmp), metadata={"memkfac": json.dumps(meta, sort_keys=True)})
    return {"file": path.name, "sha256": sha256_file(path), "tokens": sums.tokens, "blocks": meta["blocks"]}


def completed_shards(out_dir: Path, identity: dict, plan: list[tuple[int, int]]) -> dict[int, dict]:
    """Shards already on disk for this collection (the resume point), verified against the index."""
    index = read_index(out_dir)
    if index is not None:
        check_identity(index, identity, out_dir / INDEX_FILE)
    listed = {s.get("file"): s for s in (index or {}).get("shards", []) if isinstance(s, dict)}
    done = {}
    for path in sorted(out_dir.glob("shard-*.safetensors")):
        meta = shard_meta(path)
        check_identity(meta, identity, path)
        k = meta["shard"]
        if k >= len(plan) or tuple(meta["blocks"]) != plan[k] or path.name != shard_name(k):
            raise MemkfacError(
                f"{path} covers blocks {meta['blocks']} as shard {k}, not this plan's shard", f"delete {path}"
            )
        sha = sha256_file(path)
        if path.name in listed and listed[path.name].get("sha256") != sha:
            raise MemkfacError(
                f"factor shard {path} does not match its sha256 in {INDEX_FILE} (corrupt)",
                f"delete {path}; rerunning the same collection recomputes it",
            )
        done[k] = {"file": path.name, "sha256": sha, "tokens": meta["tokens"], "blocks": meta["blocks"]}
    return done


def holds_other_collection(out_dir: Path, identity: dict, plan: list[tuple[int, int]]) -> bool:
    """Whether ``out_dir`` holds shards or an index that are not all of this collection."""
    try:
        completed_shards(out_dir, identity, plan)
    except MemkfacError:
        return True
    return False


def staging_dir(out_dir: Path) -> Path:
    """Where a collection that replaces another is built, so the other stays whole until it is done."""
    return out_dir.parent / f".{out_dir.name}.replacing"


def discard_other_collection(out_dir: Path, identity: dict, plan: list[tuple[int, int]]) -> None:
    """Delete the shards and index in ``out_dir`` (a staging directory) unless they are this collection's."""
    if holds_other_collection(out_dir, identity, plan):
        for path in [*out_dir.glob("shard-*.safetensors"), out_dir / INDEX_FILE]:
            path.unlink(missing_ok=True)


def write_index(
    out_dir: Path, identity: dict, header: dict, shards: dict[int, dict], plan: list[tuple[int, int]]
) -> Path:
    records = [shards[k] for k in sorted(shards)]
    return write_json(
        out_dir / INDEX_FILE,
        identity
        | header
        | {
            "tokens": sum(r["tokens"] for r in records),
            "shards": records,
            "plan": [list(p) for p in plan],
            "planned_shards": len(plan),
            "complete": len(records) == len(plan),
        },
    )


def check_records(index: dict, factor_dir: Path) -> list[tuple[int, dict]]:
    """The index's shard records as ``(shard number, record)``, checked to cover the plan exactly once.

    The plan is the index's ``plan`` (block ranges per shard), or for indexes written before it was
    recorded, ``planned_shards`` contiguous ranges from block 0. Raises naming the missing, repeated
    or unplanned shard.
    """
    where = factor_dir / INDEX_FILE
    records = index["shards"]
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and {"file", "sha256", "tokens", "blocks"} <= set(r) for r in records
    ):
        raise MemkfacError(f"{where}: the shard records are malformed", RECOLLECT)
    repeated = sorted(f for f, n in Counter(r["file"] for r in records).items() if n > 1)
    if repeated:
        raise MemkfacError(
            f"{where} lists {', '.join(repeated)} more than once: its sums would be counted twice", RECOLLECT
        )
    plan = index.get("plan")
    numbered = []
    for r in records:
        match = SHARD_PATTERN.match(str(r["file"]))
        k = int(match.group(1)) if match else -1
        expected = plan[k] if plan is not None and 0 <= k < len(plan) else None
        if not match or k >= index["planned_shards"] or (plan is not None and r["blocks"] != expected):
            raise MemkfacError(
                f"{where} lists {r['file']} (blocks {r['blocks']}), which is not a planned shard "
                f"of this collection ({index['planned_shards']} shards)",
                RECOLLECT,
            )
        numbered.append((k, r))
    blocks = Counter(tuple(r["blocks"]) for _, r in numbered)
    twice = sorted(b for b, n in blocks.items() if n > 1)
    if twice:
        raise MemkfacError(f"{where} lists blocks {list(twice[0])} in more than one shard", RECOLLECT)
    if plan is None:  # older indexes: the ranges must tile [0, n) in shard order
        ordered = sorted(numbered, key=lambda kr: kr[0])
        ends = [0] + [r["blocks"][1] for _, r in ordered[:-1]]
        gaps = [r["file"] for (_, r), start in zip(ordered, ends, strict=True) if r["blocks"][0] != start]
        if gaps:
            raise MemkfacError(f"{where}: the shards before {gaps[0]} are missing", RECOLLECT)
    if index.get("complete"):
        missing = sorted(set(range(index["planned_shards"])) - {k for k, _ in numbered})
        if missing:
            names = ", ".join(shard_name(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise MemkfacError(
                f"{where} says the collection is complete but does not list {names} "
                f"({len(missing)} of {index['planned_shards']} planned shards)",
                RECOLLECT,
            )
    listed_tokens = sum(r["tokens"] for _, r in numbered)
    if listed_tokens != index["tokens"]:
        raise MemkfacError(
            f"{where} says {index['tokens']} tokens but its shards hold {listed_tokens}", RECOLLECT
        )
    return numbered


def load_factor_sums(factor_dir: Path) -> tuple[FactorSums, dict]:
    """Merge a complete collection's shards by addition, verifying the index and each shard.

    Returns the summed ``FactorSums`` and the index. Raises ``MemkfacError`` naming the shard when one
    is missing, repeated, unplanned or corrupt, and naming the module when a sum holds NaN or Inf.
    """
    factor_dir = Path(factor_dir)
    index = read_index(factor_dir)
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
    for k, record in check_records(index, factor_dir):
        path = factor_dir / record["file"]
        fix = f"rerun the same `memkfac factors` command after deleting {path.name}; it recomputes that shard"
        if not path.is_file():
            raise MemkfacError(f"factor shard {path} is missing", fix)
        if sha256_file(path) != record["sha256"]:
            raise MemkfacError(
                f"factor shard {path} does not match its sha256 in {INDEX_FILE} (corrupt)", fix
            )
        meta = shard_meta(path)
        check_identity(meta, index, path)
        if (
            meta.get("shard") != k
            or meta.get("blocks") != record["blocks"]
            or meta.get("tokens") != record["tokens"]
        ):
            raise MemkfacError(
                f"factor shard {path} holds shard {meta.get('shard')} (blocks {meta.get('blocks')}), "
                f"but {INDEX_FILE} lists it as shard {k} (blocks {record['blocks']})",
                RECOLLECT,
            )
        sums = FactorSums.from_tensors(read_safetensors(path, fix, "factor shard"))
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
