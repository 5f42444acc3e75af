"""Benchmark: training time of the forget-set baselines GA+GD and NPO against BalancedSubnet, side by side.

The budget: each of GA+GD and NPO at most as long as BalancedSubnet on the default. BalancedSubnet runs
as the default pipeline config's ``balanced-subnet`` edit (``--bsn-epochs`` 5 epochs of 4 + 4 sequences
over the forget set), GA+GD and NPO at their defaults (80 steps of 4 + 4, the same step count), on the
same layers, forget set and retain blocks, one after the other in one process, each timed end to end
(load, train, write the checkpoint) by its ``memkfac.methods`` entry point. The data are seeded random
tokens shaped like the default's: ``--forget`` sequences of a ``--prefix``-token prefix and a
``--suffix``-token secret (the canary sweep split), ``--retain`` blocks of ``--block-len`` tokens (the
finetune split).

Run: ``python bench/bench_baselines.py`` (a tiny Llama built on the fly, seconds), or
``python bench/bench_baselines.py --model DIR --layers 22-24`` for a real checkpoint such as the
canary-injected SmolLM2-135M. Prints a table and writes ``bench/results/bench_baselines[-NAME].json``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from memkfac.arguments import BSNArguments
from memkfac.balanced_subnet import train_balanced_subnet
from memkfac.forget_set import ForgetSetArguments, train_forget_set
from memkfac.tiny import build_tiny_model

from common import timed, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a Hugging Face model directory (default: a tiny Llama)")
    p.add_argument("--layers", default=None, help="edited layers (default: 1-2 on tiny, else 22-24)")
    p.add_argument("--forget", type=int, default=64, help="forget sequences (the default sweep split)")
    p.add_argument("--bsn-epochs", type=int, default=5, help="BalancedSubnet epochs (default config)")
    p.add_argument("--prefix", type=int, default=24)
    p.add_argument("--suffix", type=int, default=16)
    p.add_argument("--retain", type=int, default=256, help="retain blocks (compare's retain_blocks)")
    p.add_argument("--block-len", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--name", default="", help="suffix of the result file")
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = a.model
        if model_dir is None:
            model_dir = tmp / "tiny"
            build_tiny_model(model_dir, arch="llama", seed=0)
        layers = a.layers or ("1-2" if a.model is None else "22-24")
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        g = torch.Generator().manual_seed(0)
        forget = [
            (
                torch.randint(1, vocab, (a.prefix,), generator=g).tolist(),
                torch.randint(1, vocab, (a.suffix,), generator=g).tolist(),
            )
            for _ in range(a.forget)
        ]
        retain = torch.randint(1, vocab, (a.retain, a.block_len), generator=g).tolist()

        runs = {
            "balanced_subnet": lambda: train_balanced_subnet(
                model_dir,
                [p + s for p, s in forget],
                retain,
                BSNArguments(layers=layers, epochs=a.bsn_epochs),
                tmp / "bsn",
                progress=False,
                device=a.device,
            ),
            "ga_gd": lambda: train_forget_set(
                model_dir,
                forget,
                retain,
                ForgetSetArguments(layers=layers),
                tmp / "ga",
                False,
                device=a.device,
            ),
            "npo": lambda: train_forget_set(
                model_dir,
                forget,
                retain,
                ForgetSetArguments(layers=layers, method="npo"),
                tmp / "npo",
                False,
                device=a.device,
            ),
        }
        seconds, steps = {}, {}
        for name, run in runs.items():
            manifest, seconds[name] = timed(run, torch.device(a.device))
            steps[name] = len(manifest["history"]) * (1 if name != "balanced_subnet" else -(-a.forget // 4))
    ratios = {name: seconds[name] / seconds["balanced_subnet"] for name in ("ga_gd", "npo")}
    print(f"{'method':<16}{'steps':>8}{'seconds':>10}{'/ BSN':>8}")
    for name in runs:
        ratio = seconds[name] / seconds["balanced_subnet"]
        print(f"{name:<16}{steps[name]:>8}{seconds[name]:>10.2f}{ratio:>8.2f}")
    write_result(
        "bench_baselines" + (f"-{a.name}" if a.name else ""),
        {
            "model": str(a.model or "tiny llama (memkfac.tiny)"),
            "layers": layers,
            "data": {k: getattr(a, k) for k in ("forget", "prefix", "suffix", "retain", "block_len")},
            "bsn_epochs": a.bsn_epochs,
            "device": a.device,
            "steps": steps,
            "seconds": seconds,
            "ratio_to_balanced_subnet": ratios,
            "within_budget": all(r <= 1.0 for r in ratios.values()),
        },
    )


if __name__ == "__main__":
    main()
