"""Benchmark: K-FAC factor collection against a plain training step, on the same batches.

Model: a randomly initialised SmolLM2-135M config (Llama: 30 layers, hidden 576, MLP 1536, 9 heads,
3 KV heads, vocab 49152, tied embeddings), or with ``--model olmo2-1b`` / ``olmo2-7b`` OLMo-2's
(built directly on ``--device``). Tracked: layers 22-24 (OLMo-2-1B, 16 layers: 11-13), gate/up/down.

- collection: ``memkfac.factors.accumulate_batch`` through ``KFACHooks`` on the frozen model (the
  exact per-batch step of ``collect_factors``: forward, sampled labels, backward from the lowest
  tracked layer, fp32 A and G sums);
- training step: forward, sum-reduced cross-entropy on the gold next tokens, backward with weight
  gradients for every parameter (no optimizer step).

The two alternate batch by batch (interleaved, so machine load hits both alike); the ratio of tokens
per second is the result (target >= 1.5x). Writing a shard (safetensors + sha256, as
``collect_factors`` does every ``shard_token_count`` tokens) is timed once and reported amortised.

Run: ``python bench/bench_factors.py`` (about two minutes on 2 CPU cores; ``--device cuda --dtype
bfloat16`` on a GPU, ``--model olmo2-7b`` for the paper's scale). Prints a table and writes
``bench/results/bench_factors.json`` (other models and devices: ``bench_factors-MODEL-DEVICE.json``).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from memkfac.factor_store import FactorSums
from memkfac.factors import (
    FactorArguments,
    KFACHooks,
    accumulate_batch,
    contributing_positions,
    frozen,
    shard_token_count,
)
from memkfac.fingerprint import sha256_file
from memkfac.targets import find_targets
from memkfac.tiny import BENCH_CONFIGS

from common import timed, write_result  # bench/common.py: run as python bench/NAME.py

LAYERS = {"smollm2-135m": [22, 23, 24], "olmo2-1b": [11, 12, 13], "olmo2-7b": [22, 23, 24]}


def training_step(model, ids: torch.Tensor) -> None:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
    )
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=6, help="timed batches per method (default 6)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--model", choices=sorted(BENCH_CONFIGS), default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[opts.dtype]

    torch.manual_seed(0)
    config = BENCH_CONFIGS[opts.model]()
    with device:  # initialised where it runs: a 7B model is never materialised on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, config.vocab_size, (opts.batch_size, opts.seq_len), generator=gen)
        for _ in range(opts.batches + 1)
    ]
    layers = LAYERS[opts.model]
    args = FactorArguments(layers=layers, model_dtype=opts.dtype, batch_size=opts.batch_size)
    targets = find_targets(model, layers)
    sums = FactorSums.zeros(targets, torch.float32, device)
    valid = contributing_positions(opts.batch_size, opts.seq_len, None)
    tokens_per_batch = int(valid.sum())  # both methods see the same (seq_len - 1) positions per block

    def collect(i: int) -> None:
        with frozen(model), KFACHooks(model, targets, sums) as hooks:
            accumulate_batch(model, hooks, batches[i].to(device), valid, i * opts.batch_size, args)

    seconds: dict[str, list[float]] = {"collect": [], "train": []}
    collect(0)  # warm-up, untimed
    training_step(model, batches[0].to(device))
    for i in range(1, opts.batches + 1):
        for name, step in (
            ("collect", collect),
            ("train", lambda i: training_step(model, batches[i].to(device))),
        ):
            seconds[name].append(timed(functools.partial(step, i), device)[1])
        print(
            f"  batch {i}: collect {seconds['collect'][-1]:.2f} s, train {seconds['train'][-1]:.2f} s",
            flush=True,
        )
    # the median of per-batch ratios resists load spikes that hit one side of one pair
    pair_ratios = [t / c for c, t in zip(seconds["collect"], seconds["train"], strict=True)]
    median_ratio = statistics.median(pair_ratios)

    # shard writing, as collect_factors does it once per shard: safetensors file plus its sha256
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "shard.safetensors"
        _, shard_overhead = timed(lambda: (save_file(sums.tensors(), str(shard)), sha256_file(shard)))
        shard_bytes = shard.stat().st_size
    tokens = tokens_per_batch * opts.batches
    collect_tps = tokens / sum(seconds["collect"])
    train_tps = tokens / sum(seconds["train"])
    shard_tokens = shard_token_count(targets, args)
    amortised_tps = shard_tokens / (shard_tokens / collect_tps + shard_overhead)
    result = {
        "model": f"{opts.model} config, random init",
        "parameters": n_params,
        "tracked": f"layers {layers[0]}-{layers[-1]} gate/up/down ({len(targets)} maps)",
        "device": str(device),
        "dtype": opts.dtype,
        "batch": [opts.batch_size, opts.seq_len],
        "timed_batches": opts.batches,
        "tokens_timed": tokens,
        "collect_tokens_per_s": collect_tps,
        "train_tokens_per_s": train_tps,
        "ratio_collect_over_train": collect_tps / train_tps,
        "median_per_batch_ratio": median_ratio,
        "seconds_per_batch": seconds,
        "shard_bytes": shard_bytes,
        "shard_write_s": shard_overhead,
        "collect_tokens_per_s_incl_shard_writes": amortised_tps,
        "ratio_incl_shard_writes": amortised_tps / train_tps,
        "shard_tokens": shard_tokens,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    }
    rows = [
        ("training step (fwd, bwd, all weight grads)", train_tps),
        (f"factor collection (layers {layers[0]}-{layers[-1]}, gate/up/down)", collect_tps),
        (f"  + shard writes every {shard_tokens} tokens", amortised_tps),
    ]
    print(f"\n{'method':<48} {'tokens/s':>10} {'vs train':>9}")
    for label, tps in rows:
        print(f"{label:<48} {tps:>10.1f} {tps / train_tps:>8.2f}x")
    print(f"median of per-batch ratios (train s / collect s): {median_ratio:.2f}x")
    print(
        f"({opts.batches} batches of {opts.batch_size}x{opts.seq_len}, {opts.dtype} on {device}, "
        f"{torch.get_num_threads()} threads; {shard_bytes / 2**20:.0f} MiB shard in {shard_overhead:.2f} s)"
    )
    name = (
        "bench_factors"
        if (opts.model, device.type) == ("smollm2-135m", "cpu")
        else (f"bench_factors-{opts.model}-{device.type}")
    )
    write_result(name, result)


if __name__ == "__main__":
    main()
