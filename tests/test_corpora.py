"""Corpora: disjoint, deterministic splits; packing; the local formats; fingerprints; errors."""

from __future__ import annotations

import json
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memkfac.corpora import (
    SPLITS,
    CorpusArguments,
    build_corpus,
    corpus_fingerprint,
    iter_documents,
    load_corpus_meta,
    load_split,
)
from memkfac.errors import MemkfacError
from memkfac.tiny import build_byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def _docs(n: int) -> list[str]:
    return [
        f"Document number {i}: the quick brown fox {i * 7} jumps over {i * 13} lazy dogs." for i in range(n)
    ]


def _block_docs(blocks, tok) -> set[str]:
    text = tok.decode(blocks.flatten().tolist())
    return {d for d in text.split(tok.eos_token) if d.startswith("Document") and d.endswith(".")}


def test_splits_are_disjoint_deterministic_and_packed(tmp_path, tok):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(300)))
    a = build_corpus(CorpusArguments(str(src), block_len=32), tok, tmp_path / "a", progress=False)
    b = build_corpus(CorpusArguments(str(src), block_len=32), tok, tmp_path / "b", progress=False)
    seen = {}
    for split in SPLITS:
        blocks = load_split(a, split)
        assert blocks.ndim == 2 and blocks.shape[1] == 32 and blocks.shape[0] > 0
        assert (blocks == load_split(b, split)).all()
        assert corpus_fingerprint(a, split) == corpus_fingerprint(b, split)
        seen[split] = _block_docs(blocks, tok)
    assert seen["factor"].isdisjoint(seen["heldout"]) and seen["factor"].isdisjoint(seen["finetune"])
    assert seen["finetune"].isdisjoint(seen["heldout"])
    assert len({corpus_fingerprint(a, s) for s in SPLITS}) == 3
    meta = load_corpus_meta(a)["splits"]
    assert meta["factor"]["n_documents"] > meta["heldout"]["n_documents"] > 0


def test_adding_documents_keeps_old_assignments(tmp_path, tok):
    """Split membership depends on each document alone, so a growing source never moves a document."""
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text("\n\n".join(_docs(100)))
    large.write_text("\n\n".join(_docs(200)))
    a = build_corpus(CorpusArguments(str(small), block_len=16), tok, tmp_path / "a", progress=False)
    b = build_corpus(CorpusArguments(str(large), block_len=16), tok, tmp_path / "b", progress=False)
    for split in SPLITS:
        old = _block_docs(load_split(a, split), tok)
        assert old <= _block_docs(load_split(b, split), tok)


def test_max_tokens_caps_each_split_and_parquet_dirs_load(tmp_path, tok):
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"body": _docs(400)}), data / "part.parquet")
    out = build_corpus(
        CorpusArguments(str(data), block_len=16, max_tokens=160, text_column="body"),
        tok,
        tmp_path / "c",
        progress=False,
    )
    for split in SPLITS:
        assert load_split(out, split).shape == (10, 16)
    with pytest.raises(MemkfacError, match="no column 'text'"):
        build_corpus(CorpusArguments(str(data)), tok, tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()


def test_stdlib_corpus_needs_no_download(tmp_path, tok):
    assert list(islice(iter_documents("stdlib"), 50)) == list(islice(iter_documents("stdlib"), 50))
    out = build_corpus(
        CorpusArguments("stdlib", block_len=64, max_tokens=640), tok, tmp_path / "s", progress=False
    )
    assert all(load_split(out, s).shape == (10, 64) for s in SPLITS)


def test_bad_specs_and_inputs(tmp_path, tok):
    with pytest.raises(MemkfacError, match="neither 'stdlib'"):
        list(iter_documents(str(tmp_path / "missing")))
    with pytest.raises(MemkfacError, match="bad dataset spec"):
        list(iter_documents("hf:"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(MemkfacError, match="bad.jsonl:2"):
        list(iter_documents(str(bad)))
    with pytest.raises(MemkfacError, match="bad split fractions"):
        build_corpus(
            CorpusArguments("stdlib", fractions={"factor": 1.0}), tok, tmp_path / "x", progress=False
        )
    with pytest.raises(MemkfacError, match="unknown corpus split"):
        load_split(tmp_path, "train")
    with pytest.raises(MemkfacError, match="not a built corpus"):
        load_split(tmp_path, "factor")


def test_unreachable_dataset_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MemkfacError, match="could not open dataset memkfac-test/none"):
        next(iter_documents("hf:memkfac-test/none"))


def test_cli_corpus_build(tiny_model_dir, tmp_path, capsys):
    from memkfac.cli import main

    src = tmp_path / "docs.txt"
    src.write_text("\n\n".join(_docs(200)))
    out = tmp_path / "corpus"
    argv = ["corpus", "build", str(tiny_model_dir), "--corpus", str(src), "--block-len", "16"]
    assert main(argv + ["--factor-tokens", "320", "--out", str(out), "--quiet"]) == 0
    assert "factor        20 blocks" in capsys.readouterr().out
    assert load_split(out, "factor").shape == (20, 16)
