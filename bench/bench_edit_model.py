"""Benchmark: a whole-model K-FAC edit of all 30 layers x gate/up/down of a SmolLM2-135M-shaped model.

The model is a seeded random initialisation of SmolLM2-135M's config (Llama, 30 layers, hidden 576,
MLP 1536, 134.5M parameters), not the released weights: the edit's cost depends on shapes only. Its
eigenbasis is real: factors collected by ``memkfac.factors.collect_factors`` on a few blocks of random
tokens (gold labels), decomposed by ``memkfac.eigen.compute_eigenbasis``. Model, factors and eigenbasis
are cached under ``bench/results/edit_model_cache/`` and reused, so the timed part is the edit from a
cached eigenbasis: ``memkfac.editing.edit_model`` (load, validate, select, edit 90 weights in float64,
write the checkpoint), at rho = 0.6.

Run: ``python bench/bench_edit_model.py``. The first run builds the cache (150 float64 eighs of up to
1536 x 1536: about 25 minutes on 2 shared CPU cores); later runs time the edit only.
Prints a table and writes ``bench/results/bench_edit_model.json``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from memkfac.editing import EditArguments, edit_model
from memkfac.eigen import EIGEN_FILE, compute_eigenbasis
from memkfac.factors import FactorArguments, collect_factors
from memkfac.fingerprint import model_fingerprint
from memkfac.tiny import build_byte_tokenizer, smollm2_135m_config

from common import RESULTS, timed, write_result

CACHE = RESULTS / "edit_model_cache"


def cached_eigenbasis() -> tuple[Path, Path]:
    """(model_dir, eig_dir), built once."""
    model_dir, factor_dir, eig_dir = CACHE / "model", CACHE / "factors", CACHE / "eigenbasis"
    if not (model_dir / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(smollm2_135m_config(), dtype=torch.float32).eval()
        model.save_pretrained(model_dir)
        build_byte_tokenizer().save_pretrained(model_dir)
    if not (eig_dir / EIGEN_FILE).is_file():
        shutil.rmtree(factor_dir, ignore_errors=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        blocks = torch.randint(
            0, model.config.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0)
        )
        collect_factors(
            model,
            blocks,
            factor_dir,
            FactorArguments(fisher="empirical", batch_size=4),
            model_fingerprint=model_fingerprint(model_dir),
            corpus_fingerprint="random-tokens",
        )
        compute_eigenbasis(factor_dir, eig_dir)
    return model_dir, eig_dir


def main() -> None:
    model_dir, eig_dir = cached_eigenbasis()
    config = EditArguments(layers=list(range(30)), projections=("gate", "up", "down"), keep_mass=0.6)
    out = CACHE / "edited"
    manifest, total_s = timed(lambda: edit_model(model_dir, eig_dir, config, out))
    kept = [m["frac_kept"] for m in manifest["modules"]]
    row = dict(
        modules=len(manifest["modules"]),
        rho=0.6,
        total_s=total_s,
        edit_s=manifest["edit_seconds"],
        write_s=total_s - manifest["edit_seconds"],
        mean_frac_kept=sum(kept) / len(kept),
    )
    shutil.rmtree(out)
    print(f"\n{'modules':>7} {'rho':>4} {'total s':>8} {'load+edit s':>12} {'write s':>8} {'mean kept':>10}")
    print(
        f"{row['modules']:>7} {row['rho']:>4} {row['total_s']:>8.1f} {row['edit_s']:>12.1f} "
        f"{row['write_s']:>8.1f} {row['mean_frac_kept']:>10.2%}"
    )
    write_result("bench_edit_model", {"rows": [row]})


if __name__ == "__main__":
    main()
