"""Batched greedy generation equals one-at-a-time generation and a cache-free reference."""

from __future__ import annotations

import pytest
import torch

from memkfac.errors import MemkfacError
from memkfac.generation import greedy_continuations, probe_token_ids
from memkfac.probes import Probe
from memkfac.tiny import build_tiny_model


def _reference(model, prompt: list[int], n_new: int) -> list[int]:
    """Greedy decoding without cache or padding: the full sequence re-run every step."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n_new):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt) :].tolist()


def _random_prompts(n: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (n,), generator=g).tolist()
    prompts = [torch.randint(1, 384, (k,), generator=g).tolist() for k in lengths]
    counts = torch.randint(1, 16, (n,), generator=g).tolist()
    return prompts, counts


@pytest.mark.parametrize("arch", ["llama", "olmo2", "qwen2", "mistral", "gemma"])
def test_batched_equals_one_at_a_time_and_reference(arch):
    model, tok = build_tiny_model(arch=arch, seed=1)
    prompts, counts = _random_prompts(17)
    batched = greedy_continuations(model, tok, prompts, counts, batch_size=6, progress=False)
    single = greedy_continuations(model, tok, prompts, counts, batch_size=1, progress=False)
    assert batched == single
    assert [len(b) for b in batched] == counts
    for p, n, b in zip(prompts[:5], counts[:5], batched[:5], strict=True):
        assert b == _reference(model, p, n)


def test_count_is_exact_even_through_end_of_text():
    model, tok = build_tiny_model(seed=2)
    with torch.no_grad():  # make the end-of-text token the greedy choice everywhere
        model.lm_head.bias = None
        model.lm_head.weight[tok.eos_token_id] = 0
        model.lm_head.weight[tok.eos_token_id, 0] = 1e4
        model.model.norm.weight.abs_()
    out = greedy_continuations(model, tok, [[5, 6, 7]], 9, progress=False)
    assert out[0] == [tok.eos_token_id] * 9


def test_probe_token_ids_prefer_carried_ids(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = Probe(id="a", prefix="The quick brown", suffix=" fox jumps")
    assert probe_token_ids(text, tok) == (
        tok("The quick brown", add_special_tokens=False).input_ids,
        tok(" fox jumps", add_special_tokens=False).input_ids,
    )
    exact = Probe(id="b", prefix="ignored", suffix="ignored", prefix_ids=[3, 4], suffix_ids=[5])
    assert probe_token_ids(exact, tok) == ([3, 4], [5])
    with pytest.raises(MemkfacError, match="empty suffix"):
        probe_token_ids(Probe(id="c", prefix="x", suffix=""), tok)


def test_bad_arguments_are_errors():
    model, tok = build_tiny_model()
    with pytest.raises(MemkfacError, match="max_new_tokens"):
        greedy_continuations(model, tok, [[1], [2]], [3], progress=False)
    with pytest.raises(MemkfacError, match="at least one token"):
        greedy_continuations(model, tok, [[]], 3, progress=False)
