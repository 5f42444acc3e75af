"""Benchmark: memorization evaluation batched (left padding + KV cache) vs one probe at a time.

The evaluation of the paper's Dolma windows: 256 probes, 64-token prefixes, exactly 48 greedy new
tokens each, scored against the gold suffix (``memkfac.memorization.memorization_rows`` without its
teacher-forced pass, which does not depend on decoding). Both modes
run side by side in one process on the same model and probes, and the continuations must be
identical. One-at-a-time decoding costs the same per probe whatever the count, so by default it runs
on the first ``--single-probes`` probes (64) and its per-probe time is compared with the batched
run's; ``--single-probes 256`` times it on all of them.

Model: the default SmolLM2-135M (``memkfac model prepare`` converts it into MEMKFAC_HOME), or with
``--random-init`` a seeded random model of the same config. Probe token ids are seeded random
(timing does not depend on content).

Run: ``python bench/bench_generation.py`` (one torch thread unless --threads; several minutes on a
shared 2-core CPU). Prints a table and writes ``bench/results/bench_generation.json``.
"""

from __future__ import annotations

import argparse

import torch

from memkfac.memorization import memorization_rows
from memkfac.probes import Probe

from common import timed, write_result


def make_probes(n: int, prefix_len: int, suffix_len: int, vocab: int, seed: int = 0) -> list[Probe]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, prefix_len + suffix_len), generator=g).tolist()
    return [
        Probe(f"p{i}", "", "", prefix_ids=row[:prefix_len], suffix_ids=row[prefix_len:])
        for i, row in enumerate(ids)
    ]


def load(random_init: bool):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from memkfac.models import DEFAULT_MODEL, load_model, resolve_model

    model_dir = resolve_model(DEFAULT_MODEL)
    if not random_init:
        return (*load_model(model_dir), f"{DEFAULT_MODEL} (converted weights)")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(model_dir), dtype=torch.float32
    ).eval()
    return model, AutoTokenizer.from_pretrained(model_dir), f"{DEFAULT_MODEL} config, random init"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--probes", type=int, default=256)
    parser.add_argument("--single-probes", type=int, default=64, help="probes decoded one at a time")
    parser.add_argument("--prefix", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--random-init", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer, model_name = load(args.random_init)
    probes = make_probes(args.probes, args.prefix, args.new_tokens, model.config.vocab_size)
    single_probes = probes[: args.single_probes]
    memorization_rows(
        model, tokenizer, probes[:2], batch_size=2, progress=False, teacher_forced=False
    )  # warm-up

    batched, t_batched = timed(
        lambda: memorization_rows(model, tokenizer, probes, args.batch_size, teacher_forced=False)
    )
    single, t_single = timed(
        lambda: memorization_rows(model, tokenizer, single_probes, batch_size=1, teacher_forced=False)
    )
    identical = all(b["generated_ids"] == s["generated_ids"] for b, s in zip(batched, single, strict=False))
    per_batched, per_single = t_batched / len(probes), t_single / len(single_probes)
    result = {
        "model": model_name,
        "probes": len(probes),
        "single_probes": len(single_probes),
        "prefix_tokens": args.prefix,
        "new_tokens": args.new_tokens,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "batched_seconds": t_batched,
        "single_seconds": t_single,
        "batched_seconds_per_probe": per_batched,
        "single_seconds_per_probe": per_single,
        "single_seconds_for_all_probes": per_single * len(probes),
        "speedup": per_single / per_batched,
        "batched_tokens_per_second": len(probes) * args.new_tokens / t_batched,
        "identical_continuations": identical,
    }
    print(
        f"model: {model_name}; prompts {args.prefix} tokens, {args.new_tokens} new; {args.threads} thread(s)"
    )
    print(f"{'mode':<16} {'probes':>6} {'seconds':>9} {'s/probe':>8} {'new tok/s':>9}")
    rate = result["batched_tokens_per_second"]
    print(f"{'batched':<16} {len(probes):>6} {t_batched:>9.1f} {per_batched:>8.3f} {rate:>9.1f}")
    print(
        f"{'one at a time':<16} {len(single_probes):>6} {t_single:>9.1f} {per_single:>8.3f} "
        f"{len(single_probes) * args.new_tokens / t_single:>9.1f}"
    )
    print(f"speedup per probe: {result['speedup']:.1f}x; continuations identical: {identical}")
    write_result("bench_generation", result)


if __name__ == "__main__":
    main()
