"""Fine-tuning loop and canary injection on tiny models; the CLI end to end on a tiny model."""

from __future__ import annotations

import json
import re

import pytest
import torch

from memkfac.canaries import CanaryArguments, generate_canaries
from memkfac.checkpoint import load_manifest
from memkfac.cli import main
from memkfac.errors import MemkfacError
from memkfac.finetune import FinetuneArguments, collate, finetune, mixed_batches, set_trainable
from memkfac.inject import InjectArguments, canary_set_fingerprint, inject_canaries
from memkfac.tiny import build_tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the CI machine is shared
    yield
    torch.set_num_threads(threads)


def test_collate_masks_padding():
    b = collate([[5, 6, 7], [8]], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    cue = collate([[5, 6, 7], [8]], pad_id=0, loss_starts=[2, 0])
    assert cue["labels"].tolist() == [[-100, -100, 7], [8, -100, -100]]


def test_mixed_batches_cover_the_first_pool_each_epoch_and_are_seeded():
    canaries = [[i] * (1 + i % 5) for i in range(10)]
    general = [[100 + i] for i in range(3)]
    plan = mixed_batches([(canaries, 4), (general, 2)], pad_id=0, seed=1)
    for epoch in range(2):
        batches = plan(epoch)
        assert [len(b["input_ids"]) for b in sorted(batches, key=lambda b: -len(b["input_ids"]))] == [6, 6, 4]
        firsts = sorted(int(row[0]) for b in batches for row in b["input_ids"] if row[0] < 100)
        assert firsts == list(range(10))  # every canary exactly once per epoch

    def first_epoch(seed):
        return [b["input_ids"].tolist() for b in mixed_batches([(canaries, 4), (general, 2)], 0, seed)(0)]

    assert first_epoch(1) == first_epoch(1) != first_epoch(2)
    with pytest.raises(MemkfacError, match="non-empty first pool"):
        mixed_batches([([], 4)], pad_id=0)


def test_finetune_lowers_the_loss_and_trains_only_chosen_layers():
    model, _ = build_tiny_model(None, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = collate([list(range(1, 30)), list(range(40, 60))], pad_id=0)
    config = FinetuneArguments(epochs=30, lr=3e-3, warmup_steps=3, train_layers="2-3", train_embeddings=False)
    stats = finetune(model, lambda epoch: [batch], config, progress=False)
    assert stats.steps == 30 and stats.tokens == 30 * (29 + 20) and len(stats.losses) == 30
    assert stats.losses[-1] < 0.5 * stats.losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".layers.3." in n for n in changed) and any(".layers.2." in n for n in changed)
    assert not any(".layers.0." in n or ".layers.1." in n or "embed_tokens" in n for n in changed)
    assert not model.training and all(p.requires_grad for p in model.parameters())
    with pytest.raises(MemkfacError, match="outside the model"):
        set_trainable(model, FinetuneArguments(train_layers="7"))


def test_warmup_then_constant_or_linear_decay():
    model, _ = build_tiny_model(None, seed=0)
    batch = collate([[1, 2, 3, 4]], pad_id=0)

    def plan(epoch):
        return [batch, batch]

    lin = finetune(
        model, plan, FinetuneArguments(epochs=3, lr=1e-3, warmup_steps=2, decay="linear"), progress=False
    )
    assert lin.lrs == pytest.approx([5e-4, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    const = finetune(model, plan, FinetuneArguments(epochs=2, lr=1e-3, warmup_steps=2), progress=False)
    assert const.lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])
    with pytest.raises(MemkfacError, match="unknown decay"):
        finetune(model, plan, FinetuneArguments(decay="cosine"), progress=False)


def test_inject_recites_trained_not_control_and_writes_a_manifest(tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, hidden_size=64, intermediate_size=128, seed=0)
    trained, control = generate_canaries(CanaryArguments(n_trained=8, n_control=8))
    general = torch.randint(1, 384, (16, 64), generator=torch.Generator().manual_seed(0))
    recipe = InjectArguments(
        canaries_per_batch=8,
        general_per_batch=2,
        general_len=32,
        eval_batch_size=16,
        heldout_blocks=8,
        finetune=FinetuneArguments(epochs=80, lr=3e-3, warmup_steps=5),
    )
    m = inject_canaries(base, trained + control, general, general, recipe, tmp_path / "out", progress=False)
    assert m["recall"]["trained"]["all"]["strict_pct"] >= 75.0
    assert m["recall"]["control"]["all"]["strict_pct"] == 0.0
    assert set(m["recall"]["trained"]) == {"all", "sweep", "holdout"}
    assert m["canary_set_fingerprint"] == canary_set_fingerprint(trained + control)
    assert m["n_trained"] == 8 and m["n_control"] == 8 and m["finetune"]["steps"] == 80
    assert m["perplexity"]["base"] > 0 and m["recipe"]["finetune"]["lr"] == 3e-3
    assert load_manifest(tmp_path / "out")["base_fingerprint"] == m["base_fingerprint"]
    with pytest.raises(MemkfacError, match="no probes of kind 'memorized'"):
        inject_canaries(base, control, general, general, recipe, tmp_path / "x", progress=False)
    with pytest.raises(MemkfacError, match="none as long as general_len"):
        inject_canaries(base, trained, general[:, :16], general, recipe, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_inject_on_a_tiny_model(tmp_path, memkfac_home, capsys):
    base = tmp_path / "tiny"
    build_tiny_model(base, hidden_size=64, intermediate_size=128, seed=0)
    argv = ["inject", str(base), "--n-trained", "4", "--n-control", "4", "--epochs", "2"]
    argv += ["--factor-tokens", "640", "--finetune-tokens", "1280", "--heldout-tokens", "640"]
    argv += ["--train-layers", "all", "--heldout-blocks", "4", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained  all" in out and "held-out perplexity" in out
    manifest = json.loads((memkfac_home / "injected" / "tiny" / "memkfac_manifest.json").read_text())
    assert manifest["n_trained"] == 4 and manifest["finetune"]["steps"] == 2
    assert (memkfac_home / "probes" / "canaries.jsonl").is_file()
    assert (memkfac_home / "corpora" / "tiny" / "meta.json").is_file()
    assert main(argv + ["--train-layers", "9", "--overwrite"]) == 2  # a layer the model lacks: a usage error
    assert "outside the model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "records, message",
    [
        (
            [("memorized", "sweep"), ("memorized", "holdout")],
            r"--probes \(.*mine\.jsonl\) has no probes of kind 'control'",
        ),
        (
            [("memorized", "sweep"), ("control", "holdout")],
            r"no probes of kind 'memorized' in split 'holdout'",
        ),
        (
            [("memorized", "sweep"), None],
            r"(?s)--probes: .*mine\.jsonl: 1 error.*line 2: missing field 'suffix'",
        ),
    ],
)
def test_cli_inject_rejects_a_canary_file_the_pipeline_would_reject(
    tmp_path, memkfac_home, capsys, records, message
):
    """`memkfac inject --probes` runs the pipeline's canaries.file check before anything is written."""
    base = tmp_path / "tiny"
    build_tiny_model(base, seed=0)
    lines = [
        {"id": "bad", "prefix": "no suffix"}
        if r is None
        else {
            "id": f"p{i}",
            "prefix": f"Vault {i} code:",
            "suffix": f" {1000 + i} left",
            "kind": r[0],
            "split": r[1],
        }
        for i, r in enumerate(records)
    ]
    probes = tmp_path / "mine.jsonl"
    probes.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["inject", str(base), "--probes", str(probes), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not memkfac_home.exists()  # no corpus, no model, no probe file
