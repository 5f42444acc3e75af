"""Benchmark: the whole edit path at a model's real shapes, stage by stage, on one device.

Model: a random initialisation of a real architecture (``--model``: smollm2-135m, or olmo2-7b for the
paper's scale), built directly on ``--device``. Stages, each the engine function users run:

1. ``collect_factors`` over ``--tokens`` random tokens in ``--seq-len`` blocks (sampled Fisher,
   ``--layers`` gate/up), shards written and hashed as in production;
2. ``compute_eigenbasis`` (fp64 eigh) on ``--device``;
3. ``edit_weight`` (K-FAC product rule, rho 0.9) of every tracked weight on ``--device``.

Random weights and tokens give the real shapes and costs, not the real spectra: it measures time and
memory, not what an edit removes. Run on a GPU:
``python bench/bench_scale.py --model olmo2-7b --device cuda --dtype bfloat16``; on the CPU here the
default (SmolLM2 shapes, 4096 tokens) takes about a minute. Prints a table and writes
``bench/results/bench_scale-MODEL-DEVICE.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from memkfac.editing import edit_weight
from memkfac.eigen import compute_eigenbasis, load_eigenbasis
from memkfac.factors import FactorArguments, collect_factors
from memkfac.targets import parse_layers
from memkfac.tiny import BENCH_CONFIGS

from common import timed, write_result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(BENCH_CONFIGS), default="smollm2-135m")
    parser.add_argument("--layers", default="22-24", help="decoder layers to track and edit (default 22-24)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens for the factors (default 4096)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--workdir", type=Path, default=None, help="where shards go (default: a temp dir)")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[opts.dtype]

    config = BENCH_CONFIGS[opts.model]()
    torch.manual_seed(0)
    with device:
        model, init_s = timed(lambda: AutoModelForCausalLM.from_config(config, dtype=dtype).eval(), device)
    layers = parse_layers(opts.layers, config.num_hidden_layers)
    n_blocks = -(-opts.tokens // (opts.seq_len - 1))
    blocks = torch.randint(
        0, config.vocab_size, (n_blocks, opts.seq_len), generator=torch.Generator().manual_seed(0)
    )
    args = FactorArguments(
        layers=layers, projections=("gate", "up"), batch_size=opts.batch_size, model_dtype=opts.dtype
    )
    with tempfile.TemporaryDirectory(dir=opts.workdir) as tmp:
        factor_dir, eig_dir = Path(tmp) / "factors", Path(tmp) / "eigenbasis"
        _, collect_s = timed(
            lambda: collect_factors(
                model, blocks, factor_dir, args, model_fingerprint="bench", corpus_fingerprint="random"
            ),
            device,
        )
        shard_bytes = sum(p.stat().st_size for p in factor_dir.glob("shard-*.safetensors"))
        _, eigh_s = timed(lambda: compute_eigenbasis(factor_dir, eig_dir, device=device), device)
        eig, _ = load_eigenbasis(eig_dir)
        edit_s, kept = 0.0, []
        for name, module_eig in eig.items():
            W = model.get_submodule(name).weight.data
            (W_new, stats), seconds = timed(lambda W=W, e=module_eig: edit_weight(W, e, 0.9), device)
            assert torch.isfinite(W_new).all() and W_new.device == W.device
            edit_s += seconds
            kept.append(stats.frac_kept)

    tokens = n_blocks * (opts.seq_len - 1)
    result = {
        "model": f"{opts.model} config, random init",
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": layers,
        "edited_weights": len(eig),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "dtype": opts.dtype,
        "init_s": init_s,
        "factor_tokens": tokens,
        "collect_s": collect_s,
        "collect_tokens_per_s": tokens / collect_s,
        "shard_bytes": shard_bytes,
        "eigh_s": eigh_s,
        "edit_s": edit_s,
        "mean_frac_kept_at_rho_0.9": sum(kept) / len(kept),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    }
    print(
        f"\n{result['model']} ({result['parameters'] / 1e9:.2f} B parameters) "
        f"on {result['device']}, {opts.dtype}"
    )
    print(f"  init                        {init_s:8.1f} s")
    print(
        f"  collect_factors             {collect_s:8.1f} s  "
        f"({tokens} tokens, {tokens / collect_s:,.0f} tokens/s, "
        f"{shard_bytes / 2**30:.2f} GiB of shards)"
    )
    print(f"  compute_eigenbasis (fp64)   {eigh_s:8.1f} s")
    print(f"  edit_weight x {len(eig):<3} (rho 0.9) {edit_s:8.1f} s")
    if result["peak_gpu_memory_gib"] is not None:
        print(f"  peak GPU memory             {result['peak_gpu_memory_gib']:8.1f} GiB")
    write_result(f"bench_scale-{opts.model}-{device.type}", result)


if __name__ == "__main__":
    main()
