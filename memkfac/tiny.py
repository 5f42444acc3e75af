"""Tiny causal LMs built from a config, with a byte-level tokenizer, for tests and smoke runs.

Nothing here downloads anything: the tokenizer is trained in memory on a fixed text and the weights
are seeded random initialisations. The architectures are real Hugging Face classes, so module
discovery, hooks and checkpoint round trips are exercised exactly as on a released model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

_TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Customer record: name, email, phone, address, account. "
    "def function(self, value): return value + 1  # numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000\n"
    "Alice's email is alice@example.com and her phone is +1 555 0100. IBAN GB29 NWBK 6016 1331 9268 19.\n"
)

TINY_ARCHITECTURES = ("llama", "olmo2", "qwen2", "mistral", "gemma")


def build_byte_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (encodes any UTF-8 text), trained in memory on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def tiny_config(
    arch: str = "llama",
    vocab_size: int = 384,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    max_position_embeddings: int = 256,
):
    """A small config of a real architecture with gate/up/down MLPs."""
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHITECTURES}")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    if arch == "gemma":
        kwargs["head_dim"] = hidden_size // num_heads
    return AutoConfig.for_model(arch, **kwargs)


def build_tiny_model(
    out_dir: str | os.PathLike | None = None,
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_kwargs,
):
    """Build a seeded random tiny model; save it with its tokenizer when ``out_dir`` is given.

    Returns ``(model, tokenizer)`` in eval mode.
    """
    tokenizer = build_byte_tokenizer(config_kwargs.get("vocab_size", 384))
    config = tiny_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if out_dir is not None:
        out = Path(out_dir)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return model, tokenizer


def smollm2_135m_config():
    """The default model's architecture (SmolLM2-135M: Llama, 30 layers, hidden 576, MLP 1536).

    For benchmarks on a random initialisation of the real shapes when the converted weights are not
    needed.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
    )


def _olmo2_config(hidden: int, mlp: int, layers: int, heads: int):
    """An OLMo-2 architecture (vocab 100352, rope theta 500000, untied embeddings) at the given sizes."""
    from transformers import Olmo2Config

    return Olmo2Config(
        vocab_size=100352,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )


def olmo2_1b_config():
    """OLMo-2-1B's architecture (allenai/OLMo-2-0425-1B: 16 layers, hidden 2048, MLP 8192), for a GPU
    check that fits a short slot (bf16: 3.0 GB)."""
    return _olmo2_config(hidden=2048, mlp=8192, layers=16, heads=16)


def olmo2_7b_config():
    """OLMo-2-7B's architecture (allenai/OLMo-2-1124-7B: 32 layers, hidden 4096, MLP 11008, vocab
    100352), for benchmarks at the paper's scale on a random initialisation (bf16: 14.6 GB)."""
    return _olmo2_config(hidden=4096, mlp=11008, layers=32, heads=32)


BENCH_CONFIGS = {
    "smollm2-135m": smollm2_135m_config,
    "olmo2-1b": olmo2_1b_config,
    "olmo2-7b": olmo2_7b_config,
}
