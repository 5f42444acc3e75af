"""Content fingerprints: sha256 of files, directories and model weights (and their size).

Fingerprints name what an artifact was computed from, so that stale inputs are detected
(factors from another model) and Dagster data versions change exactly when content changes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """One hex sha256 over several files: their names (relative to ``root``) and contents, sorted."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        name = p.relative_to(root).as_posix() if root is not None else p.name
        h.update(name.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def sha256_dir(path: str | os.PathLike) -> str:
    """Hex sha256 over every regular file in a directory tree (hidden files excluded)."""
    root = Path(path)
    files = [p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts)]
    return sha256_files(files, root)


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes of every regular file in a directory tree."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """Fingerprint of a model directory: the hash of its weight files only.

    Config edits that do not touch weights (generation settings) keep the fingerprint.
    """
    root = Path(model_dir)
    files = [p for p in root.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    if not files:
        from memkfac.errors import MemkfacError

        raise MemkfacError(
            f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {root}",
            "point at a Hugging Face model directory written by save_pretrained",
        )
    return sha256_files(files, root)
