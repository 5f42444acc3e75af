"""Disk and memory of K-FAC factors and eigenbasis at a model's real shapes, computed from the shapes.

No weights and no GPU: the model is built on the meta device, its tracked maps found with the engine's
own ``find_targets`` (gate and up share one A, as in ``memkfac.factors``) and sized with the engine's
rules (fp32 sums, shard size from ``shard_token_count``, fp32 eigenvectors). Each figure is printed with
its arithmetic. Default: OLMo-2-7B, all 32 layers, gate/up/down.

    python bench/memory_at_scale.py [--model olmo2-7b] [--layers all] [--edit-layers 22-24]

Writes ``bench/results/memory_at_scale-MODEL.json``.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

from memkfac.factors import FactorArguments, shard_token_count
from memkfac.targets import find_targets, parse_layers
from memkfac.tiny import BENCH_CONFIGS

from common import write_result

FP32 = 4  # bytes: factor sums and eigenvectors are fp32
GiB = 2**30


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.2f} GiB"


def sizes(targets) -> dict:
    """Entries of the factors: one A (d_in^2) per input group, one G (d_out^2) per map."""
    groups = {t.input_group: t.in_features for t in targets}
    a_entries = sum(d * d for d in groups.values())
    g_entries = sum(t.out_features**2 for t in targets)
    values = sum(groups.values()) + sum(t.out_features for t in targets)  # eigenvalues mu, lam
    return {
        "groups": groups,
        "A": a_entries,
        "G": g_entries,
        "entries": a_entries + g_entries,
        "values": values,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(BENCH_CONFIGS), default="olmo2-7b")
    parser.add_argument("--layers", default="all", help="layers with factors (default all)")
    parser.add_argument("--projections", default="gate,up,down")
    parser.add_argument("--edit-layers", default="22-24", help="layers an edit touches (gate, up)")
    opts = parser.parse_args()

    config = BENCH_CONFIGS[opts.model]()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    layers = parse_layers(opts.layers, config.num_hidden_layers)
    projections = tuple(opts.projections.split(","))
    targets = find_targets(model, layers, projections)
    s = sizes(targets)
    one_layer = sizes([t for t in targets if t.layer == layers[0]])
    shard_tokens = shard_token_count(targets, FactorArguments(layers=layers, projections=projections))
    factor_bytes = FP32 * s["entries"] + 8  # + the int64 token count
    eigen_bytes = FP32 * (s["entries"] + s["values"])
    edit_targets = find_targets(
        model, parse_layers(opts.edit_layers, config.num_hidden_layers), ("gate", "up")
    )
    e = sizes(edit_targets)
    edit_read = FP32 * (e["entries"] + e["values"])
    bf16_model = 2 * n_params

    d_in = ", ".join(f"{d}" for d in sorted(set(one_layer["groups"].values())))
    per_layer = one_layer["entries"]
    lines = [
        f"{opts.model}: {n_params / 1e9:.2f}B parameters; factors on {len(layers)} layers x "
        f"{'/'.join(projections)} = {len(targets)} maps, {len(s['groups'])} A groups (gate and up share one)",
        f"per layer: A of inputs d = {d_in}: {one_layer['A']:,} entries; G of the {len(projections)} "
        f"outputs: {one_layer['G']:,} entries; together {per_layer:,} entries = {gib(FP32 * per_layer)}",
        f"all layers: {len(layers)} x {per_layer:,} = {s['entries']:,} entries x 4 B = {gib(factor_bytes)}",
        f"shard size rule: max(65,536, entries / 512) = {shard_tokens:,} tokens per shard; every shard holds "
        f"every sum, so disk = {gib(factor_bytes)} per shard (20M tokens: "
        f"{-(-20_000_000 // shard_tokens)} shard(s))",
        f"eigenbasis file: the same square entries as eigenvectors + {s['values']:,} eigenvalues = "
        f"{gib(eigen_bytes)}",
    ]
    rows = [
        ("factor shards on disk", f"{gib(factor_bytes)} per shard", "one fp32 sum per A group and per G"),
        ("eigenbasis on disk", gib(eigen_bytes), "fp32 eigenvectors and eigenvalues"),
        (
            "collection, device memory per process",
            f"{gib(FP32 * s['entries'])} + model {gib(bf16_model)} bf16 + activations",
            "the running sums live on the device; each torchrun process holds its own",
        ),
        (
            "collection, host memory when a shard is written",
            gib(FP32 * s["entries"]),
            "the sums are copied to the CPU for safetensors",
        ),
        (
            "eigenbasis step, host memory at peak",
            gib(2 * FP32 * s["entries"]),
            "the merged sums, plus one loaded shard while merging, then plus the eigenvectors before writing",
        ),
        (
            f"edit of layers {opts.edit_layers} gate+up, eigenbasis read",
            f"{gib(edit_read)} (not {gib(eigen_bytes)})",
            f"lazy reads: {len(edit_targets)} maps' G and their {len(e['groups'])} shared A",
        ),
        ("edit, the model itself", f"{gib(bf16_model)} bf16", "loaded and written in its stored dtype"),
    ]
    print("\n".join(lines))
    print(f"\n| {'what':<52} | {'size':<44} | how |\n|---|---|---|")
    for what, size, how in rows:
        print(f"| {what:<52} | {size:<44} | {how} |")
    write_result(
        f"memory_at_scale-{opts.model}",
        {
            "model": opts.model,
            "parameters": n_params,
            "layers": layers,
            "projections": list(projections),
            "factor_entries": s["entries"],
            "factor_bytes_per_shard": factor_bytes,
            "shard_tokens": shard_tokens,
            "eigenbasis_bytes": eigen_bytes,
            "edit_layers": opts.edit_layers,
            "edit_eigenbasis_bytes_read": edit_read,
            "model_bf16_bytes": bf16_model,
            "arithmetic": lines,
        },
    )


if __name__ == "__main__":
    main()
