"""Resurgence: does removed memorization come back after a little fine-tuning?

The protocol (kfac_engine_notes section 5, adapted to verbatim memorization). For a model (an edit or
the unedited reference) and a canary probe set:
- the trained canaries (kind ``memorized``) are split by their ``split`` field: the ``sweep`` half is
  the relearn set T, the ``holdout`` half V is measured; ``control`` canaries (never trained) are
  measured too (as many as V): a rise there means the fine-tuning teaches the format rather than
  restoring memories;
- recipes: ``general`` fine-tunes on unrelated general text, ``partial_forget`` on the full T
  sequences (prefix + suffix), the relearn-on-a-subset attack (Deeb & Roger's RTT);
- per recipe, one fine-tuning run of max(``steps``) steps from the model as is, with greedy recall on V
  and on the controls measured after each N in ``steps`` (N = 0 is the model as is). The rate is
  constant after a warm-up of min(warmup_steps, first N) steps, so the model at checkpoint N is the one
  a fresh N-step run on the same batches would give (tested), at the cost of one run instead of one per N.

Rows follow the ``resurgence`` table: ``resurgence`` = strict recall after N steps / strict recall of
the unedited model before any fine-tuning. The fraction-of-removed-recall form
(R(N) - R(0)) / (R_base - R(0)) is computed by the dbt report from the N = 0 rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from memkfac.arguments import Checks
from memkfac.devices import resolve_device
from memkfac.errors import MemkfacError
from memkfac.finetune import Batch, FinetuneArguments, finetune, mixed_batches
from memkfac.generation import model_vocab_size, probes_token_ids
from memkfac.memorization import memorization_rows, summarize
from memkfac.models import load_model
from memkfac.paths import atomic_file, memkfac_home, safe_name
from memkfac.targets import check_layers

Recipe = Literal["general", "partial_forget"]
RECIPES: tuple[Recipe, ...] = get_args(Recipe)
MEASURED_KINDS = ("memorized", "control")


@dataclass(frozen=True)
class ResurgenceArguments:
    steps: tuple[int, ...] = (10, 50, 200)  # fine-tuning steps at which recall is measured
    recipes: tuple[Recipe, ...] = RECIPES
    lr: float = 3e-5
    warmup_steps: int = 5
    batch_size: int = 4  # sequences per step
    # tokens per general-text sequence: 64 makes a general step about as many tokens as a
    # partial_forget step (canaries are ~40-70 tokens), so the two recipes compare at equal N
    general_len: int = 64
    train_layers: str = "all"  # decoder layers fine-tuned (memkfac.finetune.FinetuneArguments)
    seed: int = 0
    eval_batch_size: int = 32

    def __post_init__(self):
        check = Checks()
        check.require(
            bool(self.steps)
            and all(s > 0 for s in self.steps)
            and list(self.steps) == sorted(set(self.steps)),
            "steps",
            f"resurgence steps {list(self.steps)} must be increasing and positive",
            "e.g. [10, 50, 200]",
        )
        check.subset("recipes", self.recipes, RECIPES)
        check.positive("lr", self.lr)
        check.at_least("warmup_steps", self.warmup_steps, 0)
        for name in ("batch_size", "general_len", "eval_batch_size"):
            check.at_least(name, getattr(self, name), 1)
        with check.field("train_layers"):
            check_layers(self.train_layers)
        check.done()


def split_canaries(probes) -> tuple[list, list]:
    """``(relearn, measured)``: memorized sweep probes, and memorized holdout probes plus as many
    control probes (the first in file order): a matched pair, measured at every checkpoint."""
    relearn = [p for p in probes if p.kind == "memorized" and p.split == "sweep"]
    held_back = [p for p in probes if p.kind == "memorized" and p.split == "holdout"]
    measured = held_back + [p for p in probes if p.kind == "control"][: len(held_back)]
    if not relearn or not held_back:
        raise MemkfacError(
            "the resurgence probe set needs memorized probes in both the sweep and the holdout split",
            "use the canary probe set (its trained canaries alternate sweep/holdout)",
        )
    return relearn, measured


def n_step_plan(pool: Sequence[Sequence[int]], n_steps: int, batch_size: int, pad_id: int, seed: int):
    """An epoch plan whose only epoch is exactly ``n_steps`` batches drawn from ``pool`` (cycled)."""
    plan = mixed_batches([(pool, batch_size)], pad_id, seed)
    batches: list[Batch] = []
    epoch = 0
    while len(batches) < n_steps:
        batches += plan(epoch)
        epoch += 1
    batches = batches[:n_steps]
    return lambda _epoch: batches


def general_sequences(blocks: torch.Tensor, length: int) -> torch.Tensor:
    """(n_blocks * (block_len // length), length) token ids: each block cut into consecutive pieces
    of ``length`` tokens, its remainder dropped; ``blocks`` is (n_blocks, block_len)."""
    block_len = blocks.shape[1]
    if length > block_len:
        raise MemkfacError(
            f"resurgence general_len {length} is longer than the corpus blocks ({block_len} tokens)",
            f"use general_len <= {block_len}, or build the corpus with a larger block_len",
        )
    return blocks[:, : block_len // length * length].reshape(-1, length)


def recall_by_kind(rows: list[dict]) -> dict[str, dict]:
    """Aggregates over all splits of each kind (``summarize`` rows keyed by kind)."""
    out = {}
    for r in summarize(rows):
        if r["kind"] not in out or r["split"] == "all":
            out[r["kind"]] = r
    return out


def resurgence_rows(
    model_dir: Path,
    reference_dir: Path,
    probes,
    general_blocks: torch.Tensor,
    args: ResurgenceArguments = ResurgenceArguments(),
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> list[dict]:
    """Rows of the ``resurgence`` table (without keys) for one model.

    Args:
        model_dir: the model under test (Hugging Face directory); it is never modified.
        reference_dir: the unedited model; its recall before any fine-tuning is the denominator of R(N)
            (the same directory as ``model_dir`` when the unedited model itself is tested).
        probes: the canary probe set (see ``split_canaries``).
        general_blocks: (n_blocks, block_len) token ids of general text, the ``general`` recipe's data,
            cut into sequences of ``args.general_len`` tokens (a block's remainder is dropped).
        device: where the models are fine-tuned and measured (checked before anything runs).
    """
    device = resolve_device(device)
    relearn, measured = split_canaries(probes)
    model, tokenizer = load_model(model_dir, device=device)
    pad_id = tokenizer.pad_token_id
    ids = probes_token_ids(relearn + measured, tokenizer, model_vocab_size(model))  # all, before training
    pools = {
        "general": general_sequences(general_blocks, args.general_len).tolist(),
        "partial_forget": [prompt + gold for prompt, gold in ids[: len(relearn)]],
    }

    def measure(m) -> dict[str, dict]:
        return recall_by_kind(memorization_rows(m, tokenizer, measured, args.eval_batch_size, progress=False))

    def rows_for(recipe: str, steps: int, recall: dict[str, dict]) -> list[dict]:
        out = []
        for kind in MEASURED_KINDS:
            if kind not in recall:
                continue
            r, before = recall[kind], before_edit[kind]["strict_pct"]
            out.append(
                {
                    "recipe": recipe,
                    "steps": steps,
                    "kind": kind,
                    "n_probes": r["n_probes"],
                    "strict_pct": r["strict_pct"],
                    "loose_pct": r["loose_pct"],
                    "avg_lev": r["avg_lev"],
                    "strict_pct_before_edit": before,
                    "resurgence": r["strict_pct"] / before if before else None,
                }
            )
        return out

    at_zero = measure(model)
    before_edit = (
        at_zero
        if Path(reference_dir).resolve() == Path(model_dir).resolve()
        else measure(load_model(reference_dir, device=device)[0])
    )
    rows = [row for recipe in args.recipes for row in rows_for(recipe, 0, at_zero)]
    checkpoints = set(args.steps)
    for recipe in tqdm(args.recipes, desc="resurgence", unit="recipe", disable=not progress):
        model, _ = load_model(model_dir, device=device)
        plan = n_step_plan(pools[recipe], max(args.steps), args.batch_size, pad_id, args.seed)
        config = FinetuneArguments(
            epochs=1,
            lr=args.lr,
            warmup_steps=min(args.warmup_steps, args.steps[0]),
            decay="constant",  # so that checkpoint N is what an N-step run would give
            seed=args.seed,
            train_layers=args.train_layers,
        )

        def at_checkpoint(n: int, recipe: str = recipe, model=model) -> None:
            if n in checkpoints:
                rows.extend(rows_for(recipe, n, measure(model)))

        finetune(model, plan, config, progress=False, after_step=at_checkpoint)
    return rows


def run_resurgence(
    model_dir: Path,
    reference_dir: Path,
    probes,
    general_blocks: torch.Tensor,
    args: ResurgenceArguments,
    *,
    variant: str,
    probe_set: str,
    plot_path: Path | None = None,
    root: Path | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> pa.Table:
    """``resurgence_rows`` (on ``device``) as the ``resurgence`` table, written under ``root`` (default
    MEMKFAC_HOME), and their recall curves as a PNG at ``plot_path`` (default
    ``<root>/plots/resurgence-<variant>-<probe_set>.png``). Returns the table."""
    from memkfac.tables import make_table, new_run_id, write_table

    rows = resurgence_rows(model_dir, reference_dir, probes, general_blocks, args, progress, device)
    table = make_table("resurgence", rows, variant=variant, probe_set=probe_set, run_id=new_run_id())
    write_table("resurgence", table, root=root)
    root = memkfac_home() if root is None else Path(root)
    plot_resurgence(
        rows,
        plot_path or root / "plots" / f"resurgence-{safe_name(variant)}-{safe_name(probe_set)}.png",
        title=f"resurgence of {variant}",
    )
    return table


def plot_resurgence(rows: list[dict], out_path: Path, title: str = "resurgence") -> Path:
    """A PNG of strict recall against fine-tuning steps, one curve per (recipe, kind); steps on a log
    axis (N = 0 plotted at 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=90)
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        for kind, style in (("memorized", "-o"), ("control", ":x")):
            points = sorted(
                (r["steps"], r["strict_pct"]) for r in rows if (r["recipe"], r["kind"]) == (recipe, kind)
            )
            if points:
                ax.plot(
                    [max(s, 1) for s, _ in points], [p for _, p in points], style, label=f"{recipe}/{kind}"
                )
    ax.set_xscale("log")
    ax.set_xlabel("fine-tuning steps (0 plotted at 1)")
    ax.set_ylabel("strict recall %")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_path
