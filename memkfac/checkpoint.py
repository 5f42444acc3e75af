"""Model checkpoints written by memkfac: a Hugging Face directory plus ``memkfac_manifest.json``.

Edits, canary injections, baselines and fine-tunes all write their models here, so every model memkfac
produces loads with ``AutoModelForCausalLM.from_pretrained`` and says, in its manifest, what it was
made from.
"""

from __future__ import annotations

import json
from pathlib import Path

from memkfac.errors import MemkfacError
from memkfac.fingerprint import model_fingerprint
from memkfac.paths import atomic_dir, write_json

MANIFEST_NAME = "memkfac_manifest.json"


def save_checkpoint(model, tokenizer, out_dir: Path, manifest: dict) -> Path:
    """Write ``model`` (safetensors), ``tokenizer`` and ``manifest`` to ``out_dir``, atomically.

    The manifest is stored with one key added: ``model_fingerprint``, the fingerprint of the weights
    just written (``memkfac.fingerprint.model_fingerprint``). An existing ``out_dir`` is replaced only
    once the new checkpoint is complete. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / MANIFEST_NAME, {**manifest, "model_fingerprint": model_fingerprint(tmp)})
    return out_dir


def load_manifest(model_dir: Path) -> dict:
    """Read ``memkfac_manifest.json`` from a checkpoint directory written by ``save_checkpoint``."""
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        raise MemkfacError(
            f"{path} does not exist: {model_dir} was not written by memkfac",
            "point at a checkpoint directory written by memkfac (e.g. by `memkfac edit --out DIR`)",
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MemkfacError(f"{path} is not valid JSON ({e})", "rewrite the checkpoint with memkfac") from e
    if not isinstance(manifest, dict):
        raise MemkfacError(f"{path} does not hold a JSON object", "rewrite the checkpoint with memkfac")
    return manifest
