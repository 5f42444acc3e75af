"""Where artifacts live, which names are safe, and how artifacts are written atomically.

Every artifact is written to a temporary sibling first and renamed into place, so a crash never
leaves half an artifact that looks whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memkfac.errors import MemkfacError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def memkfac_home() -> Path:
    """The data root: ``$MEMKFAC_HOME``, or ``.memkfac`` under the current directory."""
    return Path(os.environ.get("MEMKFAC_HOME", ".memkfac")).resolve()


def safe_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it can be used as a file name or partition key inside the data root.

    Rejects '..', absolute paths, separators and anything but letters, digits, '.', '_' and '-'.
    """
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise MemkfacError(
            f"invalid {what} {name!r}: it becomes a file name inside the data root",
            "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, and no '..'",
        )
    return name


def _tmp_sibling(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise MemkfacError(f"{final} already exists", "choose another output path or remove it")
    tmp = _tmp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = _tmp_sibling(final)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; it is renamed to ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return path
