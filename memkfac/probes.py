"""Probe sets: sequences a model must stop reciting. The JSONL format, validation, loading and writing.

One probe a line, a JSON object:

    {"id": "c-0001", "prefix": "Customer record for Ann Lee:", "suffix": " email ann@x.org ...",
     "kind": "memorized", "source": "canaries", "split": "sweep"}

- ``id`` (required, unique): a string or integer.
- Either ``prefix`` and ``suffix`` (the model is prompted with the prefix and must not continue with
  the suffix), or ``text`` alone: then the suffix is the last ``text_suffix_words`` (default 8)
  whitespace-separated words, with the whitespace before them, and the prefix everything before.
  The rule is word-based so that a probe set means the same thing for every tokenizer.
- ``prefix_ids`` / ``suffix_ids`` (optional, lists of token ids): token-exact probes (mined ones).
  When both are given the texts may be empty; evaluators then use the ids.
- ``kind``: ``memorized`` (default), ``control``, ``quote``, ...; ``source``: free text;
  ``split``: ``sweep`` (tune layers and rho on it) or ``holdout`` (report on it; the default).
- Other fields are ignored.

The official repository's two formats load too: ``prefix_text``/``suffix_text``/``prefix_ids``/
``suffix_ids`` (the Dolma memorization sets; id from ``doc_index`` and ``start``) and
``id``/``prefix``/``target_suffix`` (the quotes sets; kind ``quote``).

A file with any error is rejected whole; ``ProbeSetError`` lists every error with its line number.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memkfac.errors import MemkfacError
from memkfac.paths import atomic_file, check_output_file

SPLIT_VALUES = ("sweep", "holdout")
MAX_LINE_BYTES = 1 << 20  # a probe is a few hundred tokens; a 1 MiB line is a corrupt or wrong file
MIN_SUFFIX_CHARS = 4  # shorter suffixes are recited by chance
MIN_SUFFIX_TOKENS = 2
TEXT_SUFFIX_WORDS = 8


@dataclass
class Probe:
    """One probe: the model is prompted with ``prefix`` and should (not) continue with ``suffix``."""

    id: str
    prefix: str
    suffix: str
    kind: str = "memorized"
    source: str = ""
    split: str = "holdout"
    prefix_ids: list[int] | None = None
    suffix_ids: list[int] | None = None
    # where it was read from ("probes.jsonl, line 3"), for error messages; not part of the probe
    location: str = field(default="", compare=False, repr=False)


class ProbeSetError(MemkfacError):
    """A probe set with errors; ``errors`` holds every ``(location, message)``."""

    def __init__(self, origin: str, errors: list[tuple[str, str]]):
        self.errors = errors
        listing = "\n".join(f"  {where}: {msg}" for where, msg in errors)
        super().__init__(
            f"{origin}: {len(errors)} error(s); the probe set was not loaded:\n{listing}",
            "fix every listed line (format: see `memkfac probes validate --help`) and load it again",
        )


def split_text(text: str, suffix_words: int = TEXT_SUFFIX_WORDS) -> tuple[str, str]:
    """Split a ``text``-only probe: the suffix is the last ``suffix_words`` words with their leading space."""
    text = text.rstrip()
    starts = [m.start() for m in re.finditer(r"\S+", text)]
    if len(starts) <= suffix_words:
        raise ValueError(f"text has {len(starts)} words; needs more than {suffix_words} to split")
    cut = starts[-suffix_words]
    while text[cut - 1].isspace():
        cut -= 1
    return text[:cut], text[cut:]


def _parse_record(
    obj: object,
    default_split: str,
    text_suffix_words: int,
    min_suffix_chars: int,
    min_suffix_tokens: int,
) -> tuple[Probe | None, list[str]]:
    """Turn one JSON object (any supported format) into a Probe, or return the list of what is wrong."""
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got {type(obj).__name__}"]
    errors: list[str] = []
    o = dict(obj)
    if "target_suffix" in o:  # official quotes format
        o.setdefault("suffix", o.pop("target_suffix"))
        o.setdefault("kind", "quote")
        o.setdefault("source", o.get("author") or "")
    elif (
        "prefix_text" in o
        or "suffix_text" in o
        or ("prefix_ids" in o and "prefix" not in o and "text" not in o)
    ):
        o.setdefault("prefix", o.pop("prefix_text", ""))  # official Dolma memorization format
        o.setdefault("suffix", o.pop("suffix_text", ""))
        if "id" not in o and "doc_index" in o and "start" in o:
            o["id"] = f"{o['doc_index']}-{o['start']}"
        o.setdefault("source", o.get("dolma_name") or o.get("corpus") or "")

    pid = o.get("id")
    if pid is None or isinstance(pid, bool) or not isinstance(pid, str | int) or str(pid) == "":
        errors.append("missing field 'id' (a non-empty string or integer)")
    for name in ("prefix_ids", "suffix_ids"):
        ids = o.get(name)
        if ids is not None and not (
            isinstance(ids, list)
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
        ):
            errors.append(f"'{name}' must be a list of non-negative integers")
    has_ids = isinstance(o.get("prefix_ids"), list) and isinstance(o.get("suffix_ids"), list)
    if "text" in o and "prefix" not in o and "suffix" not in o:
        if not isinstance(o["text"], str):
            errors.append("'text' must be a string")
        else:
            try:
                o["prefix"], o["suffix"] = split_text(o["text"], text_suffix_words)
            except ValueError as e:
                errors.append(f"'text' is too short to split into prefix and suffix ({e})")
    elif not has_ids:
        errors.extend(f"missing field '{f}' (or give 'text')" for f in ("prefix", "suffix") if f not in o)
    for name in ("prefix", "suffix", "kind", "source", "split"):
        if name in o and not isinstance(o[name], str):
            errors.append(f"'{name}' must be a string")
    if errors:
        return None, errors

    suffix, suffix_ids = o.get("suffix", ""), o.get("suffix_ids")
    if suffix_ids is not None:
        if len(suffix_ids) < min_suffix_tokens:
            errors.append(
                f"suffix_ids has {len(suffix_ids)} token(s); at least {min_suffix_tokens} are needed"
            )
    elif not suffix.strip():
        errors.append("empty suffix: there is nothing to recite")
    elif len(suffix.strip()) < min_suffix_chars:
        errors.append(
            f"suffix {suffix!r} is too short (under {min_suffix_chars} characters): recited by chance"
        )
    split = o.get("split", default_split)
    if split not in SPLIT_VALUES:
        errors.append(f"unknown split {split!r}; use one of {', '.join(SPLIT_VALUES)}")
    kind = o.get("kind", "memorized")
    if not kind:
        errors.append("'kind' is empty; use memorized, control, quote, ...")
    if errors:
        return None, errors
    probe = Probe(
        id=str(pid),
        prefix=o.get("prefix", ""),
        suffix=suffix,
        kind=kind,
        source=o.get("source", ""),
        split=split,
        prefix_ids=o.get("prefix_ids"),
        suffix_ids=suffix_ids,
    )
    return probe, []


def parse_probes(
    records: Iterable[tuple[str, object]],
    origin: str,
    default_split: str = "holdout",
    text_suffix_words: int = TEXT_SUFFIX_WORDS,
    min_suffix_chars: int = MIN_SUFFIX_CHARS,
    min_suffix_tokens: int = MIN_SUFFIX_TOKENS,
) -> list[Probe]:
    """Validate ``(location, record)`` pairs into probes; raise ProbeSetError listing every error.

    A record may be an exception (raised while reading its line), which is reported at its location.
    """
    probes: list[Probe] = []
    errors: list[tuple[str, str]] = []
    first_seen: dict[str, str] = {}
    for where, obj in records:
        if isinstance(obj, Exception):
            errors.append((where, str(obj)))
            continue
        probe, problems = _parse_record(
            obj, default_split, text_suffix_words, min_suffix_chars, min_suffix_tokens
        )
        errors.extend((where, p) for p in problems)
        if probe is None:
            continue
        if probe.id in first_seen:
            errors.append((where, f"duplicate id {probe.id!r} (first at {first_seen[probe.id]})"))
            continue
        first_seen[probe.id] = where
        probe.location = f"{origin}, {where}"
        probes.append(probe)
    if not errors and not probes:
        errors.append((origin, "no probes"))
    if errors:
        raise ProbeSetError(origin, errors)
    return probes


def _read_jsonl(path: Path, max_line_bytes: int) -> Iterable[tuple[str, object]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"line {lineno}"
            if len(raw) > max_line_bytes:
                yield where, ValueError(f"line is {len(raw)} bytes, over the {max_line_bytes}-byte limit")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, ValueError(f"invalid UTF-8 at byte {e.start}")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, ValueError(f"bad JSON: {e.msg} (column {e.colno})")


def load_probe_set(
    path: Path,
    default_split: str = "holdout",
    text_suffix_words: int = TEXT_SUFFIX_WORDS,
    min_suffix_chars: int = MIN_SUFFIX_CHARS,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> list[Probe]:
    """Load and validate a JSONL probe set (native or official formats); all or nothing."""
    path = Path(path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise MemkfacError(f"probe set {path} {state}", "pass the path of a .jsonl probe-set file")
    return parse_probes(
        _read_jsonl(path, max_line_bytes),
        str(path),
        default_split=default_split,
        text_suffix_words=text_suffix_words,
        min_suffix_chars=min_suffix_chars,
    )


def probes_from_dataset(
    spec: str,
    columns: Mapping[str, str] | None = None,
    default_split: str = "holdout",
    text_suffix_words: int = TEXT_SUFFIX_WORDS,
) -> list[Probe]:
    """Load probes from a ``datasets`` dataset ``[hf:]NAME[:CONFIG[:SPLIT]]`` or a local data file.

    ``columns`` maps probe fields to dataset columns, e.g. ``{"prefix": "question", "suffix": "answer"}``;
    unmapped fields are read from columns of the same name. Row locations are reported as ``row N``.
    """
    import datasets

    parts = [spec] if Path(spec).exists() else spec.removeprefix("hf:").split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        if Path(name).is_file():
            fmt = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(
                Path(name).suffix
            )
            ds = datasets.load_dataset(fmt, data_files=name, split="train")
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline hub, unknown dataset: the user must act
        raise MemkfacError(
            f"could not open dataset {spec}: {type(e).__name__}: {e}"[:400],
            "check the name and network access, or export the probes to JSONL and use load_probe_set",
        ) from e
    mapping = dict(columns or {})
    missing = sorted(c for c in mapping.values() if c not in ds.column_names)
    if missing:
        raise MemkfacError(
            f"dataset {spec} has no column(s) {missing} (columns: {ds.column_names})",
            "map probe fields to existing columns, e.g. prefix=question suffix=answer",
        )
    renamed = {column: fld for fld, column in mapping.items()}
    # A column named like a mapped field (e.g. "id" when id=qid) is shadowed by the mapping.
    rows = (
        (f"row {i}", {renamed.get(k, k): v for k, v in row.items() if k in renamed or k not in mapping})
        for i, row in enumerate(ds)
    )
    return parse_probes(
        rows, f"dataset {spec}", default_split=default_split, text_suffix_words=text_suffix_words
    )


def probe_to_record(probe: Probe) -> dict:
    """The native JSONL object of a probe (id fields only when set)."""
    return {k: v for k, v in asdict(probe).items() if v is not None and k != "location"}


def write_probe_set(
    probes: list[Probe], path: Path, *, overwrite: bool = False, inputs: Sequence[Path | None] = ()
) -> Path:
    """Validate ``probes`` and write them as native JSONL, atomically; return ``path``.

    A file already holding exactly these probes is left as it is; any other existing file is replaced
    only with ``overwrite`` (a probe set may be a user's own), and never one of ``inputs``.
    """
    records = [(f"probe {i}", probe_to_record(p)) for i, p in enumerate(probes)]
    parse_probes(records, f"probes for {path}")  # what is written must load back
    path = Path(path)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for _, record in records)
    check_output_file(path, overwrite=overwrite, inputs=inputs, owns=lambda p: _holds(p, text))
    if not path.is_file() or not _holds(path, text):
        with atomic_file(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return path


def _holds(path: Path, text: str) -> bool:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return path.read_text(encoding="utf-8") == text
    return False
