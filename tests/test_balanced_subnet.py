"""BalancedSubnet on a tiny model that has partly memorized a few random sequences."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from memkfac.balanced_subnet import (
    BSNArguments,
    _objective,
    _ScoreMask,
    sequence_losses,
    train_balanced_subnet,
)
from memkfac.errors import MemkfacError
from memkfac.models import load_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared box extra threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def memorizing(tmp_path_factory):
    """A tiny Llama fine-tuned on 4 forget + 4 retain random sequences (16 tokens) to loss ~0.25."""
    from memkfac.tiny import build_tiny_model

    model, tokenizer = build_tiny_model(arch="llama", seed=0)
    g = torch.Generator().manual_seed(0)
    forget = [torch.randint(1, 384, (16,), generator=g).tolist() for _ in range(4)]
    retain = [torch.randint(1, 384, (16,), generator=g).tolist() for _ in range(4)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(25):
        loss = sequence_losses(model, forget + retain).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = tmp_path_factory.mktemp("memorizing")
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, forget, retain


# Tiny weights (init std 0.02) give tiny score gradients (dL/dS = dL/dW_eff * W), so the tiny model
# needs a larger step than the paper's 0.3 to move scores across the pruning threshold in 20 steps.
_TINY = dict(layers=[0, 1, 2, 3], ratio=0.05, lr=10.0, epochs=10, forget_per_batch=2, retain_per_batch=2)


def test_bsn_raises_forget_loss_more_than_retain_loss_and_prunes_exactly(memorizing, tmp_path):
    base_dir, forget, retain = memorizing
    manifest = train_balanced_subnet(base_dir, forget, retain, BSNArguments(**_TINY), tmp_path / "bsn", False)
    losses = manifest["losses"]
    forget_rise = losses["forget_after"] - losses["forget_before"]
    retain_rise = losses["retain_after"] - losses["retain_before"]
    assert forget_rise > 0.02 and forget_rise > 5 * max(retain_rise, 0.0)
    assert len(manifest["history"]) == 10 and manifest["kind"] == "balanced_subnet"

    base = load_file(base_dir / "model.safetensors")
    edited = load_file(tmp_path / "bsn" / "model.safetensors")
    assert set(edited) == set(base)  # the scores are dropped, nothing is added
    masked = {m["name"] + ".weight" for m in manifest["modules"]}
    assert len(masked) == 8  # gate and up of 4 layers
    for name, W in base.items():
        if name not in masked:
            assert torch.equal(edited[name], W)
            continue
        pruned = (edited[name] == 0) & (W != 0)
        assert int(pruned.sum()) == round(0.05 * W.numel())  # exactly the configured fraction
        assert torch.equal(edited[name][~pruned], W[~pruned])  # the rest untouched
    assert manifest["fraction_pruned"] == pytest.approx(round(0.05 * 2048) / 2048)

    model, _ = load_model(tmp_path / "bsn")  # the checkpoint reloads and reproduces the recorded loss
    with torch.no_grad():
        assert sequence_losses(model, forget).mean().item() == pytest.approx(losses["forget_after"], rel=1e-5)


def test_the_mask_is_learned_not_left_at_its_random_start(memorizing, tmp_path):
    base_dir, forget, retain = memorizing
    # lr ~ 0 keeps the random initial mask; the trained mask must differ from it
    frozen = train_balanced_subnet(
        base_dir, forget, retain, BSNArguments(**{**_TINY, "lr": 1e-9}), tmp_path / "a", False
    )
    trained = train_balanced_subnet(base_dir, forget, retain, BSNArguments(**_TINY), tmp_path / "b", False)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    name = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(a[name] == 0, b[name] == 0)
    assert trained["losses"]["forget_after"] > frozen["losses"]["forget_after"]


def test_score_mask_prunes_smallest_scores_with_straight_through_gradient():
    mask = _ScoreMask(torch.ones(4, 5), ratio=0.2)
    with torch.no_grad():
        mask.scores.copy_(torch.arange(1.0, 21.0).view(4, 5) * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]))
    W = torch.full((4, 5), 2.0)
    out = mask(W)
    assert torch.equal(out == 0, torch.arange(20).view(4, 5) < 4)  # the 4 smallest |score| pruned
    out.sum().backward()
    # d out / d score = W * sign(score): the gradient passes the threshold unchanged, pruned entries included
    assert torch.equal(mask.scores.grad, 2.0 * mask.scores.detach().sign())


def test_objective_never_nan_and_bad_input_is_an_error(tiny_model_dir, tmp_path):
    losses = torch.tensor([1.0, 3.0, 2.0])
    assert _objective(losses, 2, 0.7).item() == pytest.approx(-0.3 * 2.0 + 0.7 * 2.0)
    assert _objective(losses, 0, 0.7).item() == pytest.approx(0.7 * 2.0)  # no forget rows: no NaN
    assert _objective(losses, 3, 0.7).item() == pytest.approx(-0.3 * 2.0)  # no retain rows: no NaN
    seqs = [[1, 2, 3]]
    with pytest.raises(MemkfacError, match="forget and retain"):
        train_balanced_subnet(tiny_model_dir, [], seqs, BSNArguments(layers=[0]), tmp_path / "x", False)
    with pytest.raises(MemkfacError, match="ratio"):
        train_balanced_subnet(
            tiny_model_dir, seqs, seqs, BSNArguments(layers=[0], ratio=1.5), tmp_path / "x", False
        )
    with pytest.raises(MemkfacError, match="is the input"):
        train_balanced_subnet(tiny_model_dir, seqs, seqs, BSNArguments(layers=[0]), tiny_model_dir, False)
    assert not (tmp_path / "x").exists()


def test_bsn_command_trains_on_the_sweep_split_and_writes_a_checkpoint(tiny_model_dir, tmp_path, capsys):
    from memkfac.checkpoint import load_manifest
    from memkfac.cli import main
    from memkfac.corpora import CorpusArguments, build_corpus
    from memkfac.probes import Probe, write_probe_set

    _, tokenizer = load_model(tiny_model_dir)
    notes = tmp_path / "notes.txt"
    notes.write_text(
        "\n\n".join(f"Note {i}: the quick brown fox {i * 7} jumps over the lazy dog." for i in range(60))
    )
    corpus = build_corpus(
        CorpusArguments(str(notes), block_len=16), tokenizer, tmp_path / "corpus", progress=False
    )
    probes = tmp_path / "probes.jsonl"
    write_probe_set(
        [
            Probe(id=f"s{i}", prefix=f"Customer {i} email:", suffix=" alice@example.com", split="sweep")
            for i in range(3)
        ]
        + [
            Probe(id=f"c{i}", prefix=f"Customer {i} phone:", suffix=" +1 555 0100", kind="control")
            for i in range(2)
        ],
        probes,
    )
    argv = ["bsn", str(tiny_model_dir), "--probes", str(probes), "--retain", str(corpus), "--layers", "2-3"]
    assert main([*argv, "--ratio", "0.02", "--epochs", "2", "--quiet", "--out", str(tmp_path / "bsn")]) == 0
    assert "pruned 164 weights" in capsys.readouterr().out  # round(0.02 * 2048) = 41 in each of 4 matrices
    manifest = load_manifest(tmp_path / "bsn")
    assert manifest["n_forget"] == 3 and manifest["arguments"]["layers"] == [2, 3]
    assert [t["name"] for t in manifest["targets"]] == [
        f"model.layers.{i}.mlp.{p}_proj" for i in (2, 3) for p in ("gate", "up")
    ]
    # the control probes are never a forget set; with no memorized holdout probes, nothing to train on
    assert main([*argv, "--forget-split", "holdout", "--out", str(tmp_path / "none")]) == 1
    assert "no memorized probes in split 'holdout'" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
