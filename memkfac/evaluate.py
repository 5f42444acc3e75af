"""One evaluation of one model variant: memorization, MIA, perplexity, nDCG, as Parquet tables.

This is what ``memkfac eval`` and the comparison run per variant, and what an orchestrator calls per
(variant, probe set). The nDCG reference (the unedited model's top-k lists on the held-out blocks)
is computed once per (reference weights, held-out data, k) and cached under
``MEMKFAC_HOME/cache/topk``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from memkfac.arguments import Checks
from memkfac.fingerprint import model_fingerprint
from memkfac.memorization import LOOSE_THRESHOLD, memorization_table, positional_stress_rows, summary_table
from memkfac.mia import mia_tables, probe_token_stats
from memkfac.paths import atomic_file, memkfac_home, safetensors_problem
from memkfac.tables import make_table, new_run_id, write_table
from memkfac.utility import heldout_pass, ndcg_from_lists, topk_lists


@dataclass
class EvalArguments:
    batch_size: int = 32  # prompts per greedy-generation batch
    ppl_batch_size: int = 8  # held-out blocks per forward (perplexity, nDCG, MIA)
    loose_threshold: float = LOOSE_THRESHOLD
    mia: bool = True
    stress: bool = False  # positional stress test: ~60 generations per probe, off by default
    stress_t: int = 20
    ndcg_k: int = 10
    heldout_blocks: int | None = 64  # the first held-out blocks measured (perplexity, nDCG); None: all

    def __post_init__(self):
        check = Checks()
        for name in ("batch_size", "ppl_batch_size", "stress_t", "ndcg_k", "heldout_blocks"):
            check.at_least(name, getattr(self, name), 1)
        check.require(
            0 < self.loose_threshold <= 1,
            "loose_threshold",
            f"loose_threshold {self.loose_threshold} is outside (0, 1]",
            "use the fraction of the suffix a loose match must reproduce, e.g. 0.75",
        )
        check.done()


@dataclass
class HeldOut:
    """Held-out text for perplexity and nDCG: packed blocks (n_blocks, block_len) and their identity."""

    blocks: torch.Tensor
    name: str  # the tables' probe_set partition, e.g. "stdlib-heldout"
    fingerprint: str  # of the whole split; the cache key adds the block count

    @classmethod
    def from_corpus(cls, corpus_dir: Path, max_blocks: int | None = None, name: str | None = None) -> HeldOut:
        """The first ``max_blocks`` (None: all) blocks of a built corpus's held-out split, named
        ``name`` in the tables (default ``<corpus dir name>-heldout``)."""
        from memkfac.corpora import corpus_fingerprint, load_split
        from memkfac.paths import safe_name

        blocks = load_split(corpus_dir, "heldout")[:max_blocks]
        name = safe_name(name or f"{Path(corpus_dir).resolve().name}-heldout", "held-out corpus name")
        return cls(blocks, name, corpus_fingerprint(corpus_dir, "heldout"))


def reference_topk(
    reference_dir: Path,
    heldout: HeldOut,
    k: int = 10,
    batch_size: int = 8,
    progress: bool = True,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
) -> torch.Tensor:
    """The reference model's top-k lists on ``heldout`` (n_blocks, block_len, k), cached by content.

    The model runs on ``device`` in ``dtype`` (checked first); a dtype other than float32 is part of the
    cache key, since it changes the lists.
    """
    from memkfac.devices import resolve_device
    from memkfac.models import load_model

    device = resolve_device(device)
    key = f"{model_fingerprint(reference_dir)[:16]}-{heldout.fingerprint[:16]}-n{len(heldout.blocks)}-k{k}"
    key += "" if dtype == "float32" else f"-{dtype}"
    path = memkfac_home() / "cache" / "topk" / f"{key}.safetensors"
    if path.is_file() and safetensors_problem(path) is None:  # a damaged cache file is recomputed
        return load_file(str(path))["topk"].long()
    model, _ = load_model(reference_dir, dtype=dtype, device=device)
    topk = topk_lists(model, heldout.blocks, k, batch_size, progress)
    with atomic_file(path) as tmp:
        save_file({"topk": topk.to(torch.int32).contiguous()}, str(tmp))
    return topk


def evaluate_model(
    model,
    tokenizer,
    probes,
    *,
    variant: str,
    probe_set: str,
    args: EvalArguments | None = None,
    heldout: HeldOut | None = None,
    reference: torch.Tensor | None = None,
    reference_name: str = "base",
    run_id: str | None = None,
    progress: bool = True,
) -> dict[str, pa.Table]:
    """Evaluate one loaded model; returns tables by name (write them with ``write_tables``).

    Always: ``memorization`` and ``memorization_summary`` on ``probes``. With ``args.mia``: ``mia`` and
    ``mia_auc`` (no rows unless there are both memorized and control probes, so a report over the
    table always finds a file and never a stale one). With ``args.stress``:
    ``positional_stress``. With ``heldout``: ``perplexity``, and ``ndcg`` when ``reference`` (the
    reference model's ``reference_topk`` on the same blocks) is given.
    """
    args = args or EvalArguments()
    run_id = run_id or new_run_id()
    keys = dict(variant=variant, probe_set=probe_set, run_id=run_id)
    # the memorization metrics and the MIA scores read the same teacher-forced pass: run it once
    token_stats = (
        probe_token_stats(model, tokenizer, probes, args.ppl_batch_size, progress) if args.mia else None
    )
    per_probe = memorization_table(
        model,
        tokenizer,
        probes,
        batch_size=args.batch_size,
        loose_threshold=args.loose_threshold,
        progress=progress,
        token_stats=token_stats,
        **keys,
    )
    tables = {
        "memorization": per_probe,
        "memorization_summary": summary_table(per_probe, args.loose_threshold),
    }
    if args.mia:
        tables["mia"], auc = mia_tables(
            model,
            tokenizer,
            probes,
            batch_size=args.ppl_batch_size,
            progress=progress,
            token_stats=token_stats,
            **keys,
        )
        tables["mia_auc"] = auc if auc is not None else make_table("mia_auc", [], **keys)
    if args.stress:
        stress = positional_stress_rows(model, tokenizer, probes, args.stress_t, args.batch_size, progress)
        tables["positional_stress"] = make_table("positional_stress", stress, **keys)
    if heldout is not None:
        tables |= utility_tables(
            model, heldout, variant, run_id, reference, reference_name, args.ppl_batch_size, progress
        )
    return tables


def evaluate_utility(
    model_dir: Path,
    reference_dir: Path,
    heldout: HeldOut,
    args: EvalArguments,
    *,
    variant: str,
    reference_name: str,
    root: Path | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
) -> dict[str, pa.Table]:
    """Perplexity of ``model_dir`` on ``heldout`` and nDCG of its top-k lists against the reference
    model's (cached, ``reference_topk``); writes and returns the ``perplexity`` and ``ndcg`` tables.
    Both models run on ``device`` in ``dtype`` (checked first)."""
    from memkfac.models import load_model

    reference = reference_topk(
        reference_dir, heldout, args.ndcg_k, args.ppl_batch_size, progress, device=device, dtype=dtype
    )
    model, _ = load_model(model_dir, dtype=dtype, device=device)
    tables = utility_tables(
        model, heldout, variant, new_run_id(), reference, reference_name, args.ppl_batch_size, progress
    )
    for name, table in tables.items():
        write_table(name, table, root)
    return tables


def write_tables(tables: dict[str, pa.Table], root: Path | None = None) -> dict[str, Path]:
    """Write each table to its partition under ``root`` (default MEMKFAC_HOME); returns the paths.

    An empty table (``mia_auc`` without control probes) has no key values of its own: it goes to the
    partition of ``memorization``, the probe set it was computed on.
    """
    probed = tables["memorization"]
    own = {"variant": probed.column("variant")[0].as_py(), "probe_set": probed.column("probe_set")[0].as_py()}
    return {
        name: write_table(name, table, root, **(own if table.num_rows == 0 else {}))
        for name, table in tables.items()
    }


def utility_tables(
    model,
    heldout: HeldOut,
    variant: str,
    run_id: str,
    reference: torch.Tensor | None = None,
    reference_name: str = "base",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, pa.Table]:
    """``perplexity`` on ``heldout``, and ``ndcg`` against ``reference`` top-k lists when given."""
    keys = dict(variant=variant, probe_set=heldout.name, run_id=run_id)
    k = 0 if reference is None else reference.shape[-1]
    ppl, edited = heldout_pass(model, heldout.blocks, batch_size, k, progress)  # one pass serves both
    tables = {
        "perplexity": make_table("perplexity", [ppl | {"data_fingerprint": heldout.fingerprint}], **keys)
    }
    if reference is not None:
        scores = ndcg_from_lists(edited, reference)
        row = scores | {"reference": reference_name, "data_fingerprint": heldout.fingerprint}
        tables["ndcg"] = make_table("ndcg", [row], **keys)
    return tables
