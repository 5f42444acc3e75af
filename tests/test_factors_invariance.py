"""Factors must not depend on how the work is cut: batch size, padding, shards, interruption, processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from memkfac.factor_store import load_factor_sums, load_factors
from memkfac.factors import FactorArguments, collect_factors
from memkfac.tiny import build_tiny_model

IDS = dict(model_fingerprint="model-a", corpus_fingerprint="corpus-a")


@pytest.fixture(scope="module")
def llama64():
    model, _ = build_tiny_model(arch="llama", seed=2, dtype=torch.float64, num_layers=3)
    return model


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(1, 384, (12, 10), generator=torch.Generator().manual_seed(0))


def collect(model, blocks, out, progress=False, mask=None, **kwargs):
    collect_factors(
        model, blocks, out, FactorArguments(**kwargs), attention_mask=mask, progress=progress, **IDS
    )
    return load_factors(out)


def assert_factors_close(a, b, tol):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tokens == b[name].tokens
        for x, y in ((a[name].A, b[name].A), (a[name].G, b[name].G)):
            err = ((x - y).abs().max() / y.abs().max()).item()
            assert err < tol, f"{name}: relative difference {err:.2e}"


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_batch_size_does_not_change_factors(llama64, blocks, tmp_path, fisher):
    kw = dict(fisher=fisher, seed=4, model_dtype="float64", layers=[1, 2])
    one = collect(llama64, blocks, tmp_path / "b1", batch_size=1, **kw)
    five = collect(llama64, blocks, tmp_path / "b5", batch_size=5, **kw)
    assert_factors_close(five, one, 1e-12)


def test_padded_with_mask_equals_each_sequence_alone(llama64, tmp_path):
    """Sequences of different lengths: one right- and left-padded batch with a mask, against each
    sequence as its own unpadded block (collections merged by adding their sums)."""
    lengths = [10, 4, 7]
    seqs = [torch.randint(1, 384, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths]
    kw = dict(fisher="empirical", model_dtype="float64", layers=[0, 2])
    alone = None
    for i, s in enumerate(seqs):
        collect_factors(llama64, s, tmp_path / f"alone{i}", FactorArguments(**kw), progress=False, **IDS)
        sums, _ = load_factor_sums(tmp_path / f"alone{i}")
        alone = sums if alone is None else alone.add_(sums)
    for side in ("right", "left"):
        padded = torch.zeros(3, 10, dtype=torch.long)
        mask = torch.zeros(3, 10, dtype=torch.long)
        for i, s in enumerate(seqs):
            cols = slice(0, lengths[i]) if side == "right" else slice(10 - lengths[i], 10)
            padded[i, cols], mask[i, cols] = s[0], 1
        collect_factors(
            llama64,
            padded,
            tmp_path / side,
            FactorArguments(batch_size=3, **kw),
            attention_mask=mask,
            progress=False,
            **IDS,
        )
        got, _ = load_factor_sums(tmp_path / side)
        assert got.tokens == alone.tokens == sum(n - 1 for n in lengths)
        for name in alone.G:
            torch.testing.assert_close(got.G[name], alone.G[name], rtol=1e-10, atol=1e-14)
        for group in alone.A:
            torch.testing.assert_close(got.A[group], alone.A[group], rtol=1e-10, atol=1e-14)


def test_merged_shards_equal_one_pass(llama64, blocks, tmp_path):
    kw = dict(seed=1, model_dtype="float64", batch_size=2)
    sharded = collect(llama64, blocks, tmp_path / "sharded", shard_tokens=18, **kw)
    one_pass = collect(llama64, blocks, tmp_path / "one", shard_tokens=10**9, **kw)
    assert len(json.loads((tmp_path / "sharded" / "index.json").read_text())["shards"]) == 6
    assert_factors_close(sharded, one_pass, 1e-12)


def test_max_tokens_takes_whole_leading_blocks(llama64, blocks, tmp_path):
    kw = dict(seed=1, model_dtype="float64", batch_size=4, fisher="empirical")
    capped = collect(llama64, blocks, tmp_path / "capped", max_tokens=30, **kw)
    first4 = collect(llama64, blocks[:4], tmp_path / "first4", **kw)
    assert next(iter(capped.values())).tokens == 36  # 4 blocks x 9 positions: the first to reach 30
    assert_factors_close(capped, first4, 1e-12)


class Killed(Exception):
    pass


def test_interrupted_then_resumed_equals_uninterrupted_bit_for_bit(blocks, tmp_path):
    model, _ = build_tiny_model(arch="llama", seed=0)
    kw = dict(seed=7, batch_size=2, shard_tokens=36)  # 12 blocks of 9 tokens -> 3 shards of 2 batches
    full = collect(model, blocks, tmp_path / "full", **kw)

    forwards = []

    def kill_at_fifth_forward(module, args):
        forwards.append(1)
        if len(forwards) == 5:  # in the middle of shard 2
            raise Killed

    handle = model.register_forward_pre_hook(kill_at_fifth_forward)
    with pytest.raises(Killed):
        collect(model, blocks, tmp_path / "resumed", **kw)
    index = json.loads((tmp_path / "resumed" / "index.json").read_text())
    assert not index["complete"] and [s["file"] for s in index["shards"]] == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    forwards.clear()
    resumed = collect(model, blocks, tmp_path / "resumed", **kw)
    handle.remove()
    assert len(forwards) == 2  # only shard 2 was recomputed
    for name in full:
        assert torch.equal(full[name].A, resumed[name].A) and torch.equal(full[name].G, resumed[name].G)
    shards = lambda d: json.loads((tmp_path / d / "index.json").read_text())["shards"]  # noqa: E731
    assert shards("full") == shards("resumed")


WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from memkfac.factors import FactorArguments, collect_factors
    from memkfac.tiny import build_tiny_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model, _ = build_tiny_model(arch="llama", seed=0)
    blocks = torch.randint(1, 384, (12, 10), generator=torch.Generator().manual_seed(0))
    args = FactorArguments(layers=[2, 3], seed=5, batch_size=2, shard_tokens=18)
    ids = dict(model_fingerprint="m", corpus_fingerprint="c")
    collect_factors(model, blocks, sys.argv[1], args, progress=False, **ids)
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_equal_one(blocks, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    model, _ = build_tiny_model(arch="llama", seed=0)
    args = FactorArguments(layers=[2, 3], seed=5, batch_size=2, shard_tokens=18)
    collect_factors(
        model, blocks, tmp_path / "one", args, model_fingerprint="m", corpus_fingerprint="c", progress=False
    )
    one = json.loads((tmp_path / "one" / "index.json").read_text())
    two = json.loads((tmp_path / "two" / "index.json").read_text())
    assert two["complete"] and len(two["shards"]) == 6
    assert two["shards"] == one["shards"]  # same sha256 per shard: bit-identical sums
    a, b = load_factors(tmp_path / "one"), load_factors(tmp_path / "two")
    for name in a:
        assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].G, b[name].G)
