"""The factor engine against references computed by hand, and its clean failures."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from memkfac.errors import MemkfacError
from memkfac.factor_store import FactorSums, load_factor_sums, load_factors
from memkfac.factors import (
    FactorArguments,
    KFACHooks,
    collect_factors,
    sample_labels,
    shard_token_count,
)
from memkfac.targets import Target, find_targets
from memkfac.tiny import TINY_ARCHITECTURES, build_tiny_model

IDS = dict(model_fingerprint="model-a", corpus_fingerprint="corpus-a")


@pytest.fixture(scope="module")
def llama64():
    """A tiny random 2-layer Llama in float64."""
    model, _ = build_tiny_model(arch="llama", seed=1, dtype=torch.float64, num_layers=2)
    return model


def brute_force(model, blocks, lengths, targets, fisher, seed):
    """A and G sums by hand: each sequence alone (no padding), its per-token layer inputs and output
    gradients gathered with retain_grad from an ordinary backward (weights not frozen)."""
    inputs, outputs = {}, {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            inputs[name], outputs[name] = args[0], output

        return hook

    modules = dict(model.named_modules())
    handles = [modules[t.name].register_forward_hook(keep(t.name)) for t in targets]
    A = {t.name: 0 for t in targets}
    G = {t.name: 0 for t in targets}
    tokens = 0
    for i, n in enumerate(lengths):
        ids = blocks[i : i + 1, :n]
        logits = model(input_ids=ids).logits[0, : n - 1]
        gold = fisher == "empirical"
        labels = ids[0, 1:n] if gold else sample_labels(logits.detach(), [n - 1], [i], seed)
        model.zero_grad()
        F.cross_entropy(logits, labels, reduction="sum").backward()
        for t in targets:
            a = inputs[t.name][0, : n - 1]
            g = outputs[t.name].grad[0, : n - 1]
            A[t.name] = A[t.name] + a.T @ a
            G[t.name] = G[t.name] + g.T @ g
        tokens += n - 1
    for h in handles:
        h.remove()
    return {k: v / tokens for k, v in A.items()}, {k: v / tokens for k, v in G.items()}, tokens


def assert_rel_close(actual, expected, tol):
    err = (actual - expected).abs().max() / expected.abs().max()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def check_against_brute_force(model, tmp_path, fisher, padded, layers=None):
    torch.manual_seed(0)
    seq = 12
    blocks = torch.randint(1, 384, (5, seq))
    lengths = [seq] * 5
    mask = None
    if padded:  # right padding, lengths 12, 5, 9, 2, 7
        lengths = [12, 5, 9, 2, 7]
        mask = (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).long()
        blocks = blocks.masked_fill(mask == 0, 0)
    args = FactorArguments(layers=layers, fisher=fisher, seed=3, batch_size=2, model_dtype="float64")
    collect_factors(model, blocks, tmp_path / "f", args, attention_mask=mask, progress=False, **IDS)
    factors = load_factors(tmp_path / "f")
    targets = find_targets(model, layers)
    A, G, tokens = brute_force(model, blocks, lengths, targets, fisher, seed=3)
    assert {t.name for t in targets} == set(factors)
    for t in targets:
        assert factors[t.name].tokens == tokens == sum(n - 1 for n in lengths)
        assert_rel_close(factors[t.name].A, A[t.name], 1e-10)
        assert_rel_close(factors[t.name].G, G[t.name], 1e-10)
    # the engine restored the model: weights trainable again, nothing left hooked
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
@pytest.mark.parametrize("padded", [False, True])
def test_engine_matches_brute_force_per_token_reference(llama64, tmp_path, fisher, padded):
    check_against_brute_force(llama64, tmp_path, fisher, padded)


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHITECTURES if a != "llama"])
def test_engine_matches_brute_force_on_other_architectures(tmp_path, arch):
    model, _ = build_tiny_model(arch=arch, seed=1, dtype=torch.float64, num_layers=3)
    check_against_brute_force(model, tmp_path, "sampled", padded=True, layers=[1, 2])


def test_gradient_starts_at_lowest_tracked_layer_and_no_weight_grads(llama64, tmp_path):
    llama64.zero_grad(set_to_none=True)
    blocks = torch.randint(0, 384, (2, 8))
    needs_grad = {}

    def record(i):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            needs_grad[i] = out.requires_grad

        return hook

    handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(llama64.model.layers)]
    try:
        args = FactorArguments(layers=[1], fisher="empirical", model_dtype="float64")
        collect_factors(llama64, blocks, tmp_path / "f", args, progress=False, **IDS)
    finally:
        for h in handles:
            h.remove()
    assert needs_grad == {0: False, 1: True}  # the autograd graph starts inside layer 1
    assert all(p.grad is None for p in llama64.parameters())


def test_sampled_labels_follow_the_model_distribution():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]]).log_softmax(-1).repeat(4000, 1)
    labels = sample_labels(logits, [1] * 4000, list(range(4000)), seed=0)
    freq = torch.bincount(labels, minlength=4).double() / 4000
    assert (freq - logits[0].double().exp()).abs().max() < 0.03
    again = sample_labels(logits, [1] * 4000, list(range(4000)), seed=0)
    other = sample_labels(logits, [1] * 4000, list(range(4000)), seed=1)
    assert torch.equal(labels, again) and not torch.equal(labels, other)


def test_kfac_is_exact_on_a_deep_linear_network_with_squared_error():
    """For f(x) = W2 W1 x and 0.5 ||y - f||^2, G (x) A is the exact Fisher (GGN) block of each weight.

    G uses the exact expectation over labels: backpropagate each output basis vector e_c (the output
    Hessian is the identity), so over C passes G = J^T J / C and A = E[a a^T]; the block is C G (x) A.
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(5, 3, bias=False)).double()
    x = torch.randn(50, 4, dtype=torch.float64)
    targets = [Target("0", 0, "0", 4, 5), Target("1", 1, "1", 5, 3)]
    sums = FactorSums.zeros(targets, torch.float64, torch.device("cpu"))
    n_out = 3
    with KFACHooks(net, targets, sums):
        for c in range(n_out):
            net(x)[:, c].sum().backward()
            sums.tokens += len(x)
    params = dict(net.named_parameters())
    for t, (name, w) in zip(targets, params.items(), strict=True):

        def f(weight, sample, name=name):
            return torch.func.functional_call(net, {**params, name: weight}, (sample,))

        J = torch.stack([torch.func.jacrev(f)(w, xi).reshape(n_out, -1) for xi in x])  # (N, C, out*in)
        fisher = torch.einsum("nci,ncj->ij", J, J) / len(x)
        kfac = n_out * torch.kron(sums.G[t.name] / sums.tokens, sums.A[t.input_group] / sums.tokens)
        assert_rel_close(kfac, fisher, 1e-12)


def check_bfloat16_accumulates_in_float32(model, blocks, tmp_path):
    """bf16 activations, fp32 sums: close to the same model's fp32 factors (on the model's device)."""
    args = FactorArguments(fisher="empirical", batch_size=2)
    collect_factors(model, blocks, tmp_path / "fp32", args, progress=False, **IDS)
    args16 = FactorArguments(fisher="empirical", batch_size=2, model_dtype="bfloat16")
    collect_factors(model.to(torch.bfloat16), blocks, tmp_path / "bf16", args16, progress=False, **IDS)
    ref, low = load_factors(tmp_path / "fp32"), load_factors(tmp_path / "bf16")
    for name in ref:
        assert low[name].A.dtype == low[name].G.dtype == torch.float32
        assert_rel_close(low[name].A, ref[name].A, 0.05)
        assert_rel_close(low[name].G, ref[name].G, 0.1)


def test_bfloat16_model_accumulates_in_float32(tmp_path):
    model, _ = build_tiny_model(arch="llama", seed=0)
    check_bfloat16_accumulates_in_float32(model, torch.randint(0, 384, (4, 16)), tmp_path)


def test_gate_and_up_share_one_activation_factor(tmp_path):
    model, _ = build_tiny_model(arch="llama", seed=0)
    collect_factors(
        model, torch.randint(0, 384, (2, 8)), tmp_path / "f", FactorArguments(), progress=False, **IDS
    )
    shard = load_file(str(next((tmp_path / "f").glob("shard-*.safetensors"))))
    assert sum(k.startswith("A_sum.") for k in shard) == 2 * 4  # gate/up pair + down, 4 layers
    factors = load_factors(tmp_path / "f")
    assert factors["model.layers.0.mlp.gate_proj"].A is factors["model.layers.0.mlp.up_proj"].A


# ---- clean failures -------------------------------------------------------------------------------


@pytest.fixture
def collected(tmp_path):
    model, _ = build_tiny_model(arch="llama", seed=0)
    blocks = torch.randint(0, 384, (6, 9))
    args = FactorArguments(layers=[3], batch_size=2, shard_tokens=16)
    collect_factors(model, blocks, tmp_path / "f", args, progress=False, **IDS)
    return model, blocks, args, tmp_path / "f"


def test_collection_writes_several_shards_with_metadata(collected):
    *_, out = collected
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and len(index["shards"]) == 3 and index["tokens"] == 6 * 8
    assert index["fisher"] == "sampled" and index["model_fingerprint"] == "model-a"
    from safetensors import safe_open

    with safe_open(str(out / index["shards"][1]["file"]), framework="pt") as f:
        meta = json.loads(f.metadata()["memkfac"])
    assert meta["blocks"] == [2, 4] and meta["tokens"] == 16 and meta["corpus_fingerprint"] == "corpus-a"


def test_missing_shard_is_named(collected):
    *_, out = collected
    (out / "shard-00001.safetensors").unlink()
    with pytest.raises(MemkfacError, match="shard-00001.safetensors is missing"):
        load_factors(out)


def test_corrupt_shard_is_named_on_load_and_on_resume(collected):
    model, blocks, args, out = collected
    path = out / "shard-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(MemkfacError, match="shard-00002.safetensors does not match its sha256"):
        load_factors(out)
    with pytest.raises(MemkfacError, match="shard-00002.safetensors does not match its sha256"):
        collect_factors(model, blocks, out, args, progress=False, **IDS)


def test_refuses_to_resume_onto_another_collection(collected):
    model, blocks, args, out = collected
    with pytest.raises(MemkfacError, match="model_fingerprint differ") as e:
        collect_factors(
            model, blocks, out, args, progress=False, model_fingerprint="b", corpus_fingerprint="corpus-a"
        )
    assert "new output directory" in str(e.value)
    with pytest.raises(MemkfacError, match="data_sha256 differ"):
        collect_factors(model, blocks + 1, out, args, progress=False, **IDS)
    with pytest.raises(MemkfacError, match="arguments differ"):
        collect_factors(model, blocks, out, FactorArguments(layers=[3], seed=9), progress=False, **IDS)


def test_nan_factor_names_the_module(collected):
    *_, out = collected
    index = json.loads((out / "index.json").read_text())
    path = out / index["shards"][0]["file"]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["G_sum.model.layers.3.mlp.down_proj"][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    from memkfac.fingerprint import sha256_file

    index["shards"][0]["sha256"] = sha256_file(path)  # a NaN written by the engine itself, not corruption
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(MemkfacError, match=r"G of model\.layers\.3\.mlp\.down_proj .* NaN or Inf"):
        load_factor_sums(out)


def test_incomplete_collection_is_refused_with_resume_hint(collected):
    *_, out = collected
    index = json.loads((out / "index.json").read_text())
    index["shards"].pop()  # as a run killed after its second shard leaves it
    index["complete"] = False
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(MemkfacError, match=r"(?s)incomplete \(2 of 3 shards\).*resumes"):
        load_factors(out)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(fisher="true"), "unknown fisher type"),
        (dict(model_dtype="bfloat16"), "model runs in torch.float32"),
        (dict(batch_size=0), "must be positive"),
    ],
)
def test_bad_arguments_are_refused_before_writing(tmp_path, bad, match):
    model, _ = build_tiny_model(arch="llama", seed=0)
    with pytest.raises(MemkfacError, match=match):
        collect_factors(
            model, torch.zeros(2, 4, dtype=torch.long), tmp_path / "f", FactorArguments(**bad), **IDS
        )
    assert not (tmp_path / "f").exists()


def test_overwrite_replaces_another_collection(collected):
    model, blocks, args, out = collected
    other = FactorArguments(layers=[2], batch_size=2, shard_tokens=16)
    collect_factors(model, blocks, out, other, progress=False, overwrite=True, **IDS)
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and index["arguments"]["layers"] == [2]
    assert list(load_factors(out)) == [f"model.layers.2.mlp.{p}_proj" for p in ("gate", "up", "down")]


# ---- command line -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_collects_factors_and_eigenbasis_end_to_end(tiny_model_dir, memkfac_home, tmp_path, capsys):
    from memkfac.cli import main
    from memkfac.eigen import load_eigenbasis

    corpus = tmp_path / "notes.txt"
    corpus.write_text(
        "\n\n".join(f"Note {i}: the quick brown fox {i * 7} jumps over the lazy dog." for i in range(200))
    )
    out = tmp_path / "factors"
    argv = [str(tiny_model_dir), "--corpus", str(corpus), "--layers", "2-3", "--proj", "gate,up"]
    argv += ["--tokens", "300", "--block-len", "16", "--batch-size", "4", "--shard-tokens", "120", "--quiet"]
    assert main(["factors", *argv, "--out", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and index["tokens"] == 20 * 15 and len(index["shards"]) == 3
    modules, meta = load_eigenbasis(out / "eigenbasis")
    assert sorted(modules) == [f"model.layers.{i}.mlp.{p}_proj" for i in (2, 3) for p in ("gate", "up")]
    assert meta["tokens"] == 300
    assert (memkfac_home / "corpora").is_dir()  # the text was tokenized under the data root
    capsys.readouterr()
    # the same command again: nothing to resume, the eigenbasis is reused
    assert main(["factors", *argv, "--out", str(out)]) == 0
    assert "eigenbasis of these factors already in" in capsys.readouterr().out
    # a second run with other options onto the same directory is refused, with status 1
    assert main(["factors", *argv, "--fisher", "empirical", "--out", str(out)]) == 1
    assert "arguments differ" in capsys.readouterr().err
    assert main(["eigen", str(out), "--out", str(tmp_path / "eig"), "--quiet"]) == 0
    assert (tmp_path / "eig" / "eigenbasis.safetensors").read_bytes() == (
        out / "eigenbasis" / "eigenbasis.safetensors"
    ).read_bytes()


@pytest.mark.slow
@pytest.mark.distributed
def test_cli_under_torchrun_equals_one_process(tiny_model_dir, memkfac_home, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from memkfac.cli import main

    corpus = tmp_path / "notes.txt"
    corpus.write_text(
        "\n\n".join(f"Record {i}: alice@example.com paid {i * 13} on day {i}." for i in range(150))
    )
    argv = ["factors", str(tiny_model_dir), "--corpus", str(corpus), "--layers", "3", "--tokens", "200"]
    argv += ["--block-len", "16", "--batch-size", "2", "--shard-tokens", "60", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    memkfac_cmd = str(Path(sys.executable).parent / "memkfac")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--no-python",
        ]
        + [memkfac_cmd, *argv, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "index.json").read_text())
    two = json.loads((tmp_path / "two" / "index.json").read_text())
    assert two["complete"] and len(two["shards"]) > 1 and two["shards"] == one["shards"]
    assert (tmp_path / "two" / "eigenbasis" / "eigenbasis.safetensors").read_bytes() == (
        tmp_path / "one" / "eigenbasis" / "eigenbasis.safetensors"
    ).read_bytes()


def test_shard_size_grows_with_the_factors_so_writes_stay_cheap():
    def mlp(layer, d, f):
        names = ("gate", d, f), ("up", d, f), ("down", f, d)
        return [Target(f"model.layers.{layer}.mlp.{p}_proj", layer, p, i, o) for p, i, o in names]

    small = [t for layer in range(3) for t in mlp(layer, 576, 1536)]  # SmolLM2-135M, 3 layers
    assert shard_token_count(small, FactorArguments()) == 65536
    big = [t for layer in range(3) for t in mlp(layer, 4096, 11008)]  # OLMo-2-7B, 3 layers
    # gate and up share one A (4096^2); down has its own (11008^2); G: 11008^2 twice, 4096^2 once
    entries = 3 * (4096**2 + 11008**2 + 2 * 11008**2 + 4096**2)
    assert shard_token_count(big, FactorArguments()) == -(-entries // 512)
    assert shard_token_count(big, FactorArguments(shard_tokens=1000)) == 1000
