"""General text corpora: sources, tokenizing, packing into blocks, disjoint splits, fingerprints.

A corpus spec names where documents come from:
- ``stdlib`` (default): the running Python's standard library: the pydoc documentation topics
  (``pydoc_data.topics``) and every ``.py`` source file (code, comments and docstrings), tests excluded.
  Nothing is downloaded. Topics and files are cut at blank lines into documents of at most about 4,000
  characters (so every split sees many files), ordered by a hash of their text (prose and code interleave).
- ``hf:NAME[:CONFIG[:SPLIT]]``: a ``datasets`` dataset, streamed (``SPLIT`` defaults to ``train``).
- a local ``.txt`` file (documents separated by blank lines), ``.jsonl`` file (one JSON object a line),
  ``.parquet`` file, or a directory holding such files (read in sorted order).

Every document goes to exactly one split, chosen by the sha256 of its text, so the splits are disjoint
(identical documents are kept once) and stable when the source grows. Within a split, documents are
tokenized without special tokens, joined with the EOS token after each document and cut into blocks of
``block_len`` tokens (the last partial block is dropped). Each split is saved as
``<split>.safetensors`` holding ``blocks``: int32 (n_blocks, block_len); ``meta.json`` records the
spec, the tokenizer and, per split, the counts, the sha256 of the tokens and the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from tqdm import tqdm

from memkfac.arguments import Checks
from memkfac.errors import MemkfacError
from memkfac.paths import ArtifactKind, atomic_dir, claim_output, read_json_object, read_safetensors

if TYPE_CHECKING:  # torch loads where blocks are made or read, so the CLI starts without it
    import torch

DEFAULT_CORPUS = "stdlib"
Split = Literal["factor", "finetune", "heldout"]
SPLITS: tuple[Split, ...] = get_args(Split)
DEFAULT_FRACTIONS = {"factor": 0.8, "finetune": 0.1, "heldout": 0.1}
_LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_TOKENIZE_BATCH = 64  # documents per tokenizer call
_STDLIB_DOC_CHARS = 4000
CORPUS = ArtifactKind("corpus", "a corpus (written by `memkfac corpus build`)", signature="meta.json")
_REBUILD = "rebuild it with `memkfac corpus build --out DIR --overwrite`"


def iter_documents(spec: str, text_column: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of a corpus spec, in a deterministic order."""
    if spec == "stdlib":
        yield from _stdlib_documents()
    elif spec.startswith("hf:"):
        yield from _hf_documents(spec, text_column)
    else:
        path = Path(spec)
        if not path.exists():
            raise MemkfacError(
                f"corpus {spec!r} is neither 'stdlib', 'hf:NAME[:CONFIG[:SPLIT]]' nor an existing path",
                "use stdlib (the default), hf:NeelNanda/pile-10k, or .txt/.jsonl/.parquet files",
            )
        files = sorted(p for p in path.rglob("*") if p.suffix in _LOCAL_SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise MemkfacError(
                f"no {'/'.join(_LOCAL_SUFFIXES)} files under {path}", "add text files or fix the path"
            )
        for f in files:
            yield from _file_documents(f, text_column)


def _stdlib_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(root.rglob("*.py")):
        if _STDLIB_SKIP_DIRS.isdisjoint(f.relative_to(root).parts):
            docs.append(f.read_text(encoding="utf-8", errors="replace"))
    pieces = [piece for doc in docs for piece in _cut_at_blank_lines(doc, _STDLIB_DOC_CHARS)]
    yield from sorted(pieces, key=_digest)


def _cut_at_blank_lines(text: str, max_chars: int) -> Iterator[str]:
    """Join blank-line-separated paragraphs into pieces of at most ``max_chars`` (or one long paragraph)."""
    piece = ""
    for para in text.split("\n\n"):
        if piece and len(piece) + len(para) + 2 > max_chars:
            yield piece
            piece = ""
        piece = f"{piece}\n\n{para}" if piece else para
    if piece.strip():
        yield piece


def _hf_documents(spec: str, text_column: str) -> Iterator[str]:
    import datasets

    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise MemkfacError(
            f"bad dataset spec {spec!r}", "write hf:NAME[:CONFIG[:SPLIT]], e.g. hf:NeelNanda/pile-10k"
        )
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), "train"
    if len(parts) == 3 and parts[2]:
        split = parts[2]
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # offline hub, unknown dataset or config: all need the user's action
        raise MemkfacError(
            f"could not open dataset {name} (config {config}, split {split}): {type(e).__name__}: {e}"[:400],
            "check the name and network (HF_DATASETS_OFFLINE must be unset), or use local files or stdlib",
        ) from e
    for row in stream:
        if text_column not in row:
            raise MemkfacError(
                f"dataset {name} has no column {text_column!r} (columns: {sorted(row)})",
                "pass the column holding the text with --text-column",
            )
        if row[text_column] and row[text_column].strip():
            yield row[text_column]


def _file_documents(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix == ".txt":
        for doc in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            if doc.strip():
                yield doc
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_column]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise MemkfacError(
                        f"{path}:{lineno}: not a JSON object with a {text_column!r} field ({e})",
                        "write one JSON object a line, or pass the text field name with --text-column",
                    ) from e
                if text and text.strip():
                    yield text
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_column not in table.column_names:
            raise MemkfacError(
                f"{path} has no column {text_column!r} (columns: {table.column_names})",
                "pass the column holding the text with --text-column",
            )
        for text in table.column(text_column).to_pylist():
            if text and text.strip():
                yield text
    else:
        raise MemkfacError(f"unsupported corpus file {path}", f"use one of {', '.join(_LOCAL_SUFFIXES)}")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()


def split_of(text: str, fractions: dict[str, float] = DEFAULT_FRACTIONS) -> str:
    """The split a document belongs to: a uniform number from its sha256, cut by the split fractions."""
    u = int(_digest(text)[:16], 16) / 2**64
    edge = 0.0
    for split, frac in fractions.items():
        edge += frac
        if u < edge:
            return split
    return next(reversed(fractions))


@dataclass
class CorpusArguments:
    """Where general text comes from and how it is packed and split."""

    source: str = DEFAULT_CORPUS  # "stdlib", "hf:NAME[:CONFIG[:SPLIT]]", or a local file or directory
    block_len: int = 128  # tokens per packed block
    max_tokens: int | dict[Split, int] | None = None  # token cap of every split, or per split; None: no cap
    fractions: dict[Split, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))  # document shares
    text_column: str = "text"  # column or field holding the text (hf:, .jsonl, .parquet)

    def __post_init__(self):
        check = Checks()
        check.at_least("block_len", self.block_len, 2)
        caps = self.max_tokens.values() if isinstance(self.max_tokens, dict) else [self.max_tokens]
        check.require(
            all(c is None or c >= 0 for c in caps),
            "max_tokens",
            f"max_tokens {self.max_tokens} is negative",
            "give a token count per split (0 leaves it empty), e.g. {factor: 102400, finetune: 65536}",
        )
        check.require(
            set(self.fractions) == set(SPLITS)
            and all(f >= 0 for f in self.fractions.values())
            and abs(sum(self.fractions.values()) - 1) <= 1e-6,
            "fractions",
            f"bad split fractions {self.fractions}",
            f"give non-negative fractions for {', '.join(SPLITS)} summing to 1",
        )
        check.done()

    def caps(self) -> dict[str, int | None]:
        """Tokens per split, each cut down to whole blocks (None: no cap)."""
        caps = (
            self.max_tokens if isinstance(self.max_tokens, dict) else dict.fromkeys(SPLITS, self.max_tokens)
        )
        return {s: (None if caps.get(s) is None else caps[s] - caps[s] % self.block_len) for s in SPLITS}


def build_corpus(
    args: CorpusArguments, tokenizer, out_dir: Path, progress: bool = True, overwrite: bool = False
) -> Path:
    """Tokenize ``args.source`` into disjoint, packed splits under ``out_dir``; return ``out_dir``.

    Reading stops once every split holds its ``args.max_tokens``. ``out_dir`` must be new, empty or,
    with ``overwrite``, an earlier corpus, and may not overlap a local source or the tokenizer's
    directory; it is locked while the corpus is built.
    """
    with claim_output(out_dir, CORPUS, overwrite=overwrite, inputs=_inputs(args.source, tokenizer)):
        return _build_corpus(args, tokenizer, out_dir, progress, overwrite)


def _inputs(spec: str, tokenizer) -> list[Path]:
    """What a corpus is built from on disk: a local source, the tokenizer's model directory."""
    paths = [] if spec == "stdlib" or spec.startswith("hf:") else [Path(spec)]
    tokenizer_dir = Path(getattr(tokenizer, "name_or_path", "") or "\0")
    return paths + ([tokenizer_dir] if tokenizer_dir.is_dir() else [])


def _build_corpus(args: CorpusArguments, tokenizer, out_dir: Path, progress: bool, overwrite: bool) -> Path:
    """The body of ``build_corpus``, run holding the output's claim."""
    import torch
    from safetensors.torch import save_file

    spec, block_len, caps = args.source, args.block_len, args.caps()
    fractions = {s: args.fractions[s] for s in SPLITS}  # in split order: split_of cuts in this order
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MemkfacError(
            "the tokenizer has no EOS token to separate documents", "use a tokenizer with eos_token set"
        )

    tokens: dict[str, list[int]] = {s: [] for s in SPLITS}
    n_docs = dict.fromkeys(SPLITS, 0)
    seen: set[str] = set()

    def full(split: str) -> bool:
        return caps[split] is not None and len(tokens[split]) >= caps[split]

    bar = tqdm(desc=f"tokenizing {spec}", unit="tok", disable=not progress)

    def flush(batch: list[tuple[str, str]]) -> None:
        ids = tokenizer([text for _, text in batch], add_special_tokens=False, verbose=False)["input_ids"]
        for (split, _), doc_ids in zip(batch, ids, strict=True):
            if not full(split):
                tokens[split].extend(doc_ids)
                tokens[split].append(eos)
                n_docs[split] += 1
        bar.update(sum(len(x) + 1 for x in ids))

    batch: list[tuple[str, str]] = []
    for text in iter_documents(spec, args.text_column):
        digest = _digest(text)
        split = split_of(text, fractions)
        if digest in seen or full(split):
            continue
        seen.add(digest)
        batch.append((split, text))
        if len(batch) == _TOKENIZE_BATCH:
            flush(batch)
            batch = []
            if all(full(s) or fractions[s] == 0 for s in SPLITS):
                break
    if batch:
        flush(batch)
    bar.close()

    meta = {
        "spec": spec,
        "text_column": args.text_column,
        "block_len": block_len,
        "max_tokens": caps,
        "fractions": fractions,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "vocab_size": len(tokenizer),
        "eos_token_id": eos,
        "splits": {},
    }
    with atomic_dir(out_dir, CORPUS, overwrite=overwrite, inputs=_inputs(spec, tokenizer)) as tmp:
        for split in SPLITS:
            ids = tokens[split]
            n_blocks = len(ids) // block_len
            if caps[split] is not None:
                n_blocks = min(n_blocks, caps[split] // block_len)
            blocks = torch.tensor(ids[: n_blocks * block_len], dtype=torch.int32).view(n_blocks, block_len)
            save_file({"blocks": blocks}, str(tmp / f"{split}.safetensors"))
            tokens_sha = hashlib.sha256(blocks.numpy().tobytes()).hexdigest()
            spec_json = json.dumps({k: meta[k] for k in ("spec", "text_column", "block_len")}, sort_keys=True)
            meta["splits"][split] = {
                "n_blocks": n_blocks,
                "n_documents": n_docs[split],
                "tokens": n_blocks * block_len,
                "tokens_sha256": tokens_sha,
                "fingerprint": hashlib.sha256(f"{spec_json}|{split}|{tokens_sha}".encode()).hexdigest(),
            }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def load_corpus_meta(corpus_dir: Path) -> dict:
    """The ``meta.json`` of a built corpus."""
    path = Path(corpus_dir) / "meta.json"
    if not path.is_file():
        raise MemkfacError(
            f"{corpus_dir} is not a built corpus (no meta.json)", "build it with `memkfac corpus build`"
        )
    meta = read_json_object(path, _REBUILD, "corpus meta", ("splits", "block_len"))
    if not isinstance(meta["splits"], dict):
        raise MemkfacError(f"corpus meta {path}: 'splits' is not an object", _REBUILD)
    return meta


def load_split(corpus_dir: Path, split: str) -> torch.LongTensor:
    """The packed blocks of one split: int64 (n_blocks, block_len)."""

    if split not in SPLITS:
        raise MemkfacError(f"unknown corpus split {split!r}", f"use one of {SPLITS}")
    load_corpus_meta(corpus_dir)
    path = Path(corpus_dir) / f"{split}.safetensors"
    if not path.is_file():
        raise MemkfacError(f"the corpus {corpus_dir} has no {split} split ({path.name} is missing)", _REBUILD)
    blocks = read_safetensors(path, _REBUILD, f"corpus split {split}").get("blocks")
    if blocks is None or blocks.ndim != 2 or blocks.is_floating_point():
        raise MemkfacError(f"corpus split {path} holds no (n_blocks, block_len) integer 'blocks'", _REBUILD)
    return blocks.long()


def corpus_fingerprint(corpus_dir: Path, split: str) -> str:
    """The fingerprint of one split: sha256 over the spec, the split name and its tokens."""
    splits = load_corpus_meta(corpus_dir)["splits"]
    if split not in SPLITS:
        raise MemkfacError(f"unknown corpus split {split!r}", f"use one of {SPLITS}")
    if not isinstance(splits.get(split), dict) or "fingerprint" not in splits[split]:
        raise MemkfacError(f"the corpus {corpus_dir} has no {split} split in its meta.json", _REBUILD)
    return splits[split]["fingerprint"]
