"""Checkpoints: a loadable Hugging Face directory plus a manifest, written all or nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memkfac.checkpoint import MANIFEST_NAME, load_manifest, save_checkpoint
from memkfac.errors import MemkfacError
from memkfac.fingerprint import model_fingerprint
from memkfac.tiny import build_tiny_model


def test_checkpoint_round_trip(tmp_path):
    model, tokenizer = build_tiny_model(seed=1)
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt", {"kind": "test", "rho": 0.6})
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    manifest = load_manifest(out)
    assert manifest["kind"] == "test" and manifest["rho"] == 0.6
    assert manifest["model_fingerprint"] == model_fingerprint(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(out)("hello").input_ids == tokenizer("hello").input_ids


class _FailingTokenizer:
    def save_pretrained(self, path):
        raise OSError("disk full")


def test_failed_save_leaves_nothing_and_keeps_the_old_checkpoint(tmp_path):
    model, tokenizer = build_tiny_model(seed=1)
    out = tmp_path / "ckpt"
    save_checkpoint(model, tokenizer, out, {"kind": "test", "run": "first"})
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, _FailingTokenizer(), out, {"kind": "test", "run": "second"}, overwrite=True)
    assert load_manifest(out)["run"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left
    with pytest.raises(OSError):
        save_checkpoint(model, _FailingTokenizer(), tmp_path / "new", {})
    assert not (tmp_path / "new").exists()


def test_load_manifest_errors_name_the_problem(tmp_path):
    with pytest.raises(MemkfacError, match="was not written by memkfac"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(MemkfacError, match="not valid JSON"):
        load_manifest(tmp_path)
