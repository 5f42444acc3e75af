"""Mining: finds planted windows in a tiny model overfit on them, none in a fresh one; dedup; quotes."""

from __future__ import annotations

import random

import pytest
import torch

from memkfac.finetune import FinetuneArguments, collate, finetune
from memkfac.mining import Candidate, MineArguments, candidates, deduplicate, mine
from memkfac.probes import load_probe_set, write_probe_set
from memkfac.tiny import build_tiny_model

CONFIG = MineArguments(prefix_len=12, suffix_len=8, batch_size=8)


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(40)) for _ in range(n)]


@pytest.fixture(scope="module")
def overfit():
    """A tiny model trained until it recites 4 planted texts; plus 4 texts it never saw."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the CI machine is shared
    model, tok = build_tiny_model(None, hidden_size=64, intermediate_size=128, seed=0)
    planted, unseen = _texts(4, seed=1), _texts(4, seed=2)
    batch = collate([tok(t).input_ids for t in planted], tok.pad_token_id)
    finetune(
        model, lambda epoch: [batch], FinetuneArguments(epochs=150, lr=3e-3, warmup_steps=5), progress=False
    )
    yield model, tok, planted, unseen
    torch.set_num_threads(threads)


def test_finds_planted_windows_and_nothing_unseen(overfit):
    model, tok, planted, unseen = overfit
    probes, counts = mine(model, tok, planted + unseen, CONFIG, source="test", progress=False)
    docs = {int(p.id.split("-")[0][1:]) for p in probes}
    assert docs == {0, 1, 2, 3}, counts  # every planted text, no unseen one (docs 4-7)
    assert counts["texts"] == 8 and counts["candidates"] >= 8 and counts["kept"] == len(probes)
    for p in probes:
        assert p.kind == "memorized" and p.source == "test" and p.split in ("sweep", "holdout")
        assert len(p.prefix_ids) == 12 and len(p.suffix_ids) == 8
        assert p.prefix + p.suffix in planted[int(p.id.split("-")[0][1:])]


def test_fresh_model_memorizes_nothing(overfit):
    _, tok, planted, unseen = overfit
    fresh, _ = build_tiny_model(None, hidden_size=64, intermediate_size=128, seed=0)
    probes, counts = mine(fresh, tok, planted + unseen, CONFIG, progress=False)
    assert probes == [] and counts["memorized"] == 0


def test_quotes_mode_and_probe_set_round_trip(overfit, tmp_path):
    model, tok, planted, unseen = overfit
    probes, _ = mine(model, tok, planted + unseen, MineArguments(quotes=True), progress=False)
    assert {p.id for p in probes} == {"d0-t0", "d1-t0", "d2-t0", "d3-t0"}
    assert all(p.kind == "quote" and len(p.suffix_ids) == 8 for p in probes)
    assert load_probe_set(write_probe_set(probes, tmp_path / "mined.jsonl")) == probes


def test_windows_and_dedup():
    cands = candidates([list(range(50))], MineArguments(prefix_len=10, suffix_len=5, stride=20))
    assert [(c.start, c.prefix_ids[0], c.suffix_ids) for c in cands] == [
        (0, 0, [10, 11, 12, 13, 14]),
        (20, 20, [30, 31, 32, 33, 34]),
    ]
    a = Candidate(0, 0, [1], list(range(20)))
    near = Candidate(1, 0, [1], list(range(19)) + [99])  # one token differs: Jaccard 17/19
    other = Candidate(2, 0, [1], list(range(100, 120)))
    assert deduplicate([a, near, other], ngram=3, threshold=0.7) == [a, other]
    assert deduplicate([a, near, other], ngram=3, threshold=0.95) == [a, near, other]
