"""Where artifacts live, which names are safe, and how artifacts are written without losing anything.

Every artifact is written to a temporary sibling first and renamed into place, so a crash never
leaves half an artifact that looks whole. And an output never destroys an input: a directory is
written only if it is new, empty, or an earlier artifact of the same kind (replaced only with
``overwrite``), and never when it contains, or lies inside, one of the run's inputs.

Every directory artifact carries a marker, ``memkfac_artifact.json``: its kind and the list of files
it wrote. A directory holding any file not in that list is the user's, and is never replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memkfac.errors import MemkfacError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MARKER = "memkfac_artifact.json"
OVERWRITE_FIX = "pass --overwrite (overwrite=True) to replace it, or choose another output"
NEW_OUTPUT_FIX = "choose a new or empty output directory"


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


@dataclass(frozen=True)
class ArtifactKind:
    """A kind of directory artifact: its name in the marker and how messages describe it.

    ``signature`` recognises artifacts written before markers existed: a file only this kind writes
    (with ``signature_kind``, a JSON file whose ``kind`` field is this kind's name).
    """

    name: str
    what: str
    signature: str | None = None
    signature_kind: bool = False

    def recognises(self, directory: Path) -> bool:
        """Whether ``directory`` holds an artifact of this kind and nothing else."""
        marker = read_marker(directory)
        if marker is not None:
            return marker.get("kind") == self.name and not foreign_files(directory, marker)
        if self.signature is None or not (directory / self.signature).is_file():
            return False
        if not self.signature_kind:
            return True
        with contextlib.suppress(OSError, ValueError):
            return json.loads((directory / self.signature).read_text()).get("kind") == self.name
        return False


def read_marker(directory: Path) -> dict | None:
    """The marker of a directory artifact, or None (none, or not a memkfac marker)."""
    with contextlib.suppress(OSError, ValueError):
        marker = json.loads((Path(directory) / MARKER).read_text())
        if isinstance(marker, dict) and isinstance(marker.get("files"), list):
            return marker
    return None


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir())


def foreign_files(directory: Path, marker: dict) -> list[str]:
    """Files under ``directory`` that its marker does not list (the user's, never to be deleted)."""
    listed = set(marker["files"]) | {MARKER}
    return [f for f in _files(directory) if f not in listed]


def _overlap(target: Path, inputs: Iterable[str | os.PathLike | None]) -> Path | None:
    """The first input that ``target`` equals, contains or lies inside (symlinks resolved)."""
    real = target.resolve()
    for item in inputs:
        if item is None:
            continue
        other = Path(item).resolve()
        if real == other or other.is_relative_to(real) or real.is_relative_to(other):
            return Path(item)
    return None


def check_inputs(target: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that equals, contains or lies inside one of the run's inputs."""
    target = Path(target)
    clash = _overlap(target, inputs)
    if clash is not None:
        real, other = target.resolve(), clash.resolve()
        relation = "is" if real == other else "contains" if other.is_relative_to(real) else "lies inside"
        raise MemkfacError(
            f"the output {target} {relation} the input {clash}: writing it would destroy the input",
            "write the output to a directory outside every input",
        )


def check_output_dir(
    final: str | os.PathLike,
    kind: ArtifactKind,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    owns: Callable[[Path], bool] | None = None,
) -> bool:
    """Raise unless ``final`` may receive an artifact of ``kind``; True if it holds one to replace.

    ``final`` may be missing or empty. Holding an earlier artifact of ``kind`` (``owns``, by default
    ``kind.recognises``), it is replaced only with ``overwrite``. Anything else in it, and any overlap
    with ``inputs``, is refused with a message naming the problem and the fix.
    """
    final = Path(final)
    check_inputs(final, inputs)
    if final.is_symlink():
        raise MemkfacError(
            f"the output {final} is a symbolic link; replacing it would leave its target behind",
            f"pass the real path ({final.resolve()}) or a new directory",
        )
    if not final.exists():
        if final.parent.exists() and not final.parent.is_dir():
            raise MemkfacError(f"the output {final}: {final.parent} is a file", NEW_OUTPUT_FIX)
        return False
    if not final.is_dir():
        raise MemkfacError(f"the output {final} is an existing file, not a directory", NEW_OUTPUT_FIX)
    if not any(final.iterdir()):
        return False
    if (owns or kind.recognises)(final):
        if not overwrite:
            raise MemkfacError(f"the output {final} already holds {kind.what}", OVERWRITE_FIX)
        return True
    marker = read_marker(final)
    if marker is not None and marker.get("kind") != kind.name:
        raise MemkfacError(
            f"the output {final} holds a memkfac {marker.get('kind')!r} artifact, not {kind.what}",
            f"{NEW_OUTPUT_FIX}; a {marker.get('kind')!r} artifact is never replaced by another kind",
        )
    names = foreign_files(final, marker) if marker is not None else _files(final)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise MemkfacError(
        f"the output {final} holds files that are not part of {kind.what} ({shown or 'subdirectories'}); "
        "replacing it would delete them",
        f"{NEW_OUTPUT_FIX}; memkfac replaces only an earlier artifact of the same kind, whole",
    )


@contextlib.contextmanager
def claim_output(
    final: str | os.PathLike,
    kind: ArtifactKind,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Iterator[Path]:
    """Lock ``final`` for this run and check it may be written (``check_output_dir``); yield it.

    A writer holds the claim from its first step, so a second run into the same output is refused at
    once, not after the first has computed for an hour. Claims nest within one process.
    """
    from memkfac.locks import DirectoryLock

    final = Path(final)
    inputs = list(inputs)
    check_output_dir(final, kind, overwrite=overwrite, inputs=inputs)  # before creating anything
    with DirectoryLock(final):
        check_output_dir(final, kind, overwrite=overwrite, inputs=inputs)  # no other run changes it now
        yield final


def _tmp_sibling(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_dir(
    final: str | os.PathLike,
    kind: ArtifactKind,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``final`` only if the block succeeds.

    ``final`` is checked first (``check_output_dir``: new, empty, or an earlier ``kind`` artifact with
    ``overwrite``; never an input) and locked while the block runs. The new directory gets its marker
    (``memkfac_artifact.json``: kind and file list) before the rename.
    """
    final = Path(final)
    inputs = list(inputs)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MemkfacError(f"cannot create the parent of the output {final}: {e}", NEW_OUTPUT_FIX) from e
    with claim_output(final, kind, overwrite=overwrite, inputs=inputs):
        tmp = _tmp_sibling(final)
        tmp.mkdir()
        try:
            yield tmp
            files = _files(tmp)
            (tmp / MARKER).write_text(json.dumps({"kind": kind.name, "files": files}, indent=1) + "\n")
            check_output_dir(final, kind, overwrite=overwrite, inputs=inputs)  # nothing appeared meanwhile
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, final)


def replace_dir(new: Path, final: Path) -> None:
    """Put the directory ``new`` in place of ``final`` by renames; the old one is deleted only after."""
    old = None
    if final.exists():
        old = _tmp_sibling(final)
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_file(
    final: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    owns: Callable[[Path], bool] | None = None,
) -> None:
    """Refuse a file output that is an input, lies inside one, is a directory, or (unless ``owns``
    recognises it as an earlier output of the same kind, or ``overwrite``) already exists."""
    final = Path(final)
    check_inputs(final, inputs)
    if final.is_dir():
        raise MemkfacError(f"the output {final} is a directory, not a file", "pass a file path")
    if final.exists() and not overwrite and not (owns is not None and owns(final)):
        raise MemkfacError(f"the output file {final} already exists", OVERWRITE_FIX)


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


def read_json(path: str | os.PathLike, fix: str, what: str = "") -> Any:
    """The JSON in ``path``; a missing, unreadable or malformed file is a ``MemkfacError`` naming it."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise MemkfacError(f"{label} does not exist", fix)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MemkfacError(f"{label} is not valid JSON ({e})", fix) from None


def read_json_object(path: str | os.PathLike, fix: str, what: str = "", keys: Iterable[str] = ()) -> dict:
    """``read_json`` that must hold an object with ``keys``; otherwise an error naming the file."""
    obj = read_json(path, fix, what)
    label = f"{what} {path}" if what else str(path)
    if not isinstance(obj, dict):
        raise MemkfacError(f"{label} does not hold a JSON object", fix)
    missing = [k for k in keys if k not in obj]
    if missing:
        raise MemkfacError(f"{label} lacks the field(s) {', '.join(missing)}", fix)
    return obj


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a safetensors file without reading its data: None if it is whole, else e.g.
    "truncated (12,288 of 65,600 bytes)". Reads the header only, so it is cheap for any size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"truncated or not a safetensors file ({size:,} bytes)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"not a safetensors file ({type(e).__name__}: {e})"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (KeyError, TypeError, IndexError, ValueError):
        return "not a safetensors file (malformed header)"
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"truncated ({size:,} of {expected:,} bytes)"
    return None


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, fix: str, what: str = "") -> Iterator[Any]:
    """A lazy handle on a whole safetensors file (``safetensors.safe_open``: ``keys()``, and
    ``get_tensor(key)`` reads one tensor); a missing, truncated or corrupt file names itself and ``fix``."""
    from safetensors import safe_open

    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise MemkfacError(f"{label} does not exist", fix)
    problem = safetensors_problem(path)
    if problem:
        raise MemkfacError(f"{label} is {problem}", fix)
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated and garbled files
        raise MemkfacError(f"{label} is truncated or corrupt ({type(e).__name__}: {e})", fix) from None
    with handle as f:
        yield f


def read_safetensors(path: str | os.PathLike, fix: str, what: str = "") -> dict:
    """The tensors of a safetensors file; a missing, truncated or corrupt file names itself and ``fix``."""
    with open_safetensors(path, fix, what) as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (a safe_open handle is no dict)
