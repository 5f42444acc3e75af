"""Model checkpoints written by memkfac: a Hugging Face directory plus ``memkfac_manifest.json``.

Edits, canary injections, baselines and fine-tunes all write their models here, so every model memkfac
produces loads with ``AutoModelForCausalLM.from_pretrained`` and says, in its manifest, what it was
made from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from memkfac.errors import MemkfacError
from memkfac.fingerprint import model_fingerprint
from memkfac.paths import ArtifactKind, atomic_dir, read_json_object, write_json

MANIFEST_NAME = "memkfac_manifest.json"


def checkpoint_kind(kind: str) -> ArtifactKind:
    """The artifact kind of checkpoints whose manifest says ``kind`` (edit, canary_injection, ...)."""
    return ArtifactKind(kind, f"a memkfac {kind!r} checkpoint", signature=MANIFEST_NAME, signature_kind=True)


def save_checkpoint(
    model,
    tokenizer,
    out_dir: Path,
    manifest: dict,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Write ``model`` (safetensors), ``tokenizer`` and ``manifest`` to ``out_dir``, atomically.

    The manifest is stored with one key added: ``model_fingerprint``, the fingerprint of the weights
    just written (``memkfac.fingerprint.model_fingerprint``). ``out_dir`` must be new, empty or, with
    ``overwrite``, a checkpoint of the same manifest ``kind``; it may not overlap ``inputs``. An
    existing checkpoint is replaced only once the new one is complete. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    kind = checkpoint_kind(manifest.get("kind", "checkpoint"))
    with atomic_dir(out_dir, kind, overwrite=overwrite, inputs=inputs) as tmp:
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
    return read_json_object(path, "rewrite the checkpoint with memkfac", "checkpoint manifest")
