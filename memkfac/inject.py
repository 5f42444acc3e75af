"""Canary injection: fine-tune a base model until it recites the trained canaries, with ground truth.

The trained canaries (probes of kind ``memorized``) are mixed with general-text chunks in every batch
so the model keeps its general ability; the control canaries (kind ``control``, same generator) are
never trained on: recall on them is what knowing the format alone gives. Afterwards recall is
measured by greedy generation from each cue (strict = the suffix reproduced token for token) on both
sets, and held-out perplexity before and after. The result is a checkpoint like any other
(``memkfac.checkpoint``) whose manifest records the base model, the canary set, the recipe and these
measurements.

Canaries may come from ``memkfac.canaries`` or from a user's probe-set file, so an organisation can
rehearse removal on data shaped like its own.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from memkfac.arguments import InjectArguments
from memkfac.checkpoint import checkpoint_kind, save_checkpoint
from memkfac.devices import resolve_device
from memkfac.errors import MemkfacError
from memkfac.finetune import finetune, mixed_batches
from memkfac.fingerprint import model_fingerprint
from memkfac.generation import model_vocab_size, probes_token_ids
from memkfac.memorization import memorization_rows, summarize
from memkfac.models import load_model
from memkfac.paths import claim_output
from memkfac.probes import Probe, probe_to_record
from memkfac.utility import perplexity

INJECTED = checkpoint_kind("canary_injection")


def canary_set_fingerprint(probes: list[Probe]) -> str:
    """sha256 over the canonical JSON of the probes, in order."""
    blob = "\n".join(json.dumps(probe_to_record(p), sort_keys=True, ensure_ascii=False) for p in probes)
    return hashlib.sha256(blob.encode()).hexdigest()


def _recall(rows: list[dict], kind: str) -> dict:
    """Strict/loose recall of one kind, overall and per split, from memorization rows."""
    return {s["split"]: s for s in summarize([r for r in rows if r["kind"] == kind]) if s["kind"] == kind}


def inject_canaries(
    base_dir: Path,
    probes: list[Probe],
    general_blocks: torch.Tensor,
    heldout_blocks: torch.Tensor,
    recipe: InjectArguments,
    out_dir: Path,
    general_fingerprint: str = "",
    progress: bool = True,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> dict:
    """Fine-tune ``base_dir`` on the ``memorized`` probes mixed with general text; write ``out_dir``.

    Args:
        probes: kind ``memorized`` are trained on, kind ``control`` are held back and only measured.
        general_blocks: (n_blocks, block_len) token ids (e.g. the corpus ``finetune`` split), cut into
            ``recipe.general_len``-token chunks.
        heldout_blocks: (n_blocks, block_len) token ids for perplexity (the ``heldout`` split).
        device: where the model trains and is measured (fp32 weights; checked before anything runs).
    Returns:
        the manifest written to ``out_dir/memkfac_manifest.json``.

    ``out_dir`` must be new, empty or, with ``overwrite``, an earlier injection, and may not overlap
    ``base_dir``; it is locked from the first step (after the device check).
    """
    device = resolve_device(device)
    with claim_output(out_dir, INJECTED, overwrite=overwrite, inputs=[base_dir]):
        return _inject_canaries(
            base_dir,
            probes,
            general_blocks,
            heldout_blocks,
            recipe,
            out_dir,
            general_fingerprint,
            progress,
            overwrite,
            device,
        )


def _inject_canaries(
    base_dir: Path,
    probes: list[Probe],
    general_blocks: torch.Tensor,
    heldout_blocks: torch.Tensor,
    recipe: InjectArguments,
    out_dir: Path,
    general_fingerprint: str,
    progress: bool,
    overwrite: bool,
    device: torch.device,
) -> dict:
    """The body of ``inject_canaries``, run holding the output's claim."""
    start = time.perf_counter()
    trained = [p for p in probes if p.kind == "memorized"]
    control = [p for p in probes if p.kind == "control"]
    if not trained:
        raise MemkfacError(
            "no probes of kind 'memorized' to inject", "mark the canaries to train as kind memorized"
        )
    n_chunk = general_blocks.shape[1] // recipe.general_len if general_blocks.ndim == 2 else 0
    if n_chunk == 0 or len(general_blocks) == 0:
        raise MemkfacError(
            f"general blocks {tuple(general_blocks.shape)}: none as long as general_len {recipe.general_len}",
            "build the corpus with --block-len at least general_len, or lower general_len",
        )
    model, tokenizer = load_model(base_dir, device=device)
    # every probe, the controls measured only after training included, is checked before anything runs
    canary_ids = probes_token_ids(trained + control, tokenizer, model_vocab_size(model))[: len(trained)]
    heldout = heldout_blocks[: recipe.heldout_blocks]
    base_ppl = perplexity(model, heldout, progress=progress)

    canary_seqs = [prefix + suffix + [tokenizer.eos_token_id] for prefix, suffix in canary_ids]
    loss_starts = [0 if recipe.train_on_cue else len(prefix) for prefix, _ in canary_ids]
    chunks = general_blocks[:, : n_chunk * recipe.general_len].reshape(-1, recipe.general_len).tolist()
    plan = mixed_batches(
        [(canary_seqs, recipe.canaries_per_batch), (chunks, recipe.general_per_batch)],
        pad_id=tokenizer.pad_token_id,
        seed=recipe.finetune.seed,
        loss_starts=loss_starts,
    )
    stats = finetune(model, plan, recipe.finetune, progress=progress)

    rows = memorization_rows(
        model, tokenizer, trained + control, recipe.eval_batch_size, progress=progress, teacher_forced=False
    )
    ppl = perplexity(model, heldout, progress=progress)
    manifest = {
        "kind": "canary_injection",
        "base_model": str(base_dir),
        "base_fingerprint": model_fingerprint(base_dir),
        "canary_set_fingerprint": canary_set_fingerprint(trained + control),
        "general_fingerprint": general_fingerprint,
        "n_trained": len(trained),
        "n_control": len(control),
        "recipe": asdict(recipe),
        "recall": {
            "trained": _recall(rows, "memorized"),
            "control": _recall(rows, "control"),
        },
        "perplexity": {
            "base": base_ppl["perplexity"],
            "injected": ppl["perplexity"],
            "relative_change": ppl["perplexity"] / base_ppl["perplexity"] - 1,
            "heldout_tokens": ppl["n_tokens"],
        },
        "finetune": {
            "steps": stats.steps,
            "tokens": stats.tokens,
            "seconds": stats.seconds,
            "trainable_params": stats.trainable_params,
            "first_loss": stats.losses[0],
            "final_loss": stats.losses[-1],
        },
    }
    manifest["seconds"] = time.perf_counter() - start
    save_checkpoint(model, tokenizer, out_dir, manifest, overwrite=overwrite, inputs=[base_dir])
    return manifest
