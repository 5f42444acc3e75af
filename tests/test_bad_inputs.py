"""A catalogue of bad inputs and faults, each tried the way a user would meet it.

Every case asserts three things: the exit status (runtime errors 1, usage errors 2, the pipeline's
config errors 2), that the message names the problem (and, for runtime errors, a fix), and that nothing
was lost: every file that existed before the command (inputs, earlier outputs, the user's own files)
is byte-identical afterwards. A case is a function that prepares its inputs in its own directory and
returns the command line; the expected status and message sit next to it in ``CASES``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

RUNTIME, USAGE, CONFIG = 1, 2, 2  # CLI runtime error, argparse usage error, pipeline config error

TEXT = "\n\n".join(
    f"Note {i}: the quick brown fox paid {i * 7} to Alice, and her phone is +1 555 0{i:03d}."
    for i in range(120)
)


# ---- the shared world: a tiny model, a corpus, factors with their eigenbasis, an earlier edit -----------


@dataclass(frozen=True)
class World:
    root: Path
    model: Path
    text: Path
    corpus: Path
    factors: Path
    probes: Path  # a valid probe set (memorized sweep + holdout, control)
    edit: Path  # an earlier edit (svd) of the model

    @property
    def eig(self) -> Path:
        return self.factors / "eigenbasis"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir) -> World:
    from memkfac.corpora import CorpusArguments, build_corpus, corpus_fingerprint, load_split
    from memkfac.editing import EditArguments, edit_model
    from memkfac.eigen import compute_eigenbasis
    from memkfac.factors import FactorArguments, collect_factors
    from memkfac.fingerprint import model_fingerprint
    from memkfac.models import load_model
    from memkfac.probes import Probe, write_probe_set

    root = tmp_path_factory.mktemp("world")
    text = root / "notes.txt"
    text.write_text(TEXT)
    model, tokenizer = load_model(tiny_model_dir)
    corpus = build_corpus(
        CorpusArguments(str(text), block_len=16), tokenizer, root / "corpus", progress=False
    )
    factors = root / "factors"
    args = FactorArguments(
        layers=[1, 2],
        projections=("gate", "up"),
        fisher="empirical",
        batch_size=4,
        shard_tokens=120,
        max_tokens=300,
    )  # three shards
    collect_factors(
        model,
        load_split(corpus, "factor"),
        factors,
        args,
        model_fingerprint=model_fingerprint(tiny_model_dir),
        corpus_fingerprint=corpus_fingerprint(corpus, "factor"),
        progress=False,
    )
    compute_eigenbasis(factors, factors / "eigenbasis", progress=False)
    probes = [
        Probe("m1", "Customer record for Alice:", " email alice@example.com", split="sweep"),
        Probe("m2", "Customer record for Bob:", " email bob@example.com", split="holdout"),
        Probe("c1", "Customer record for Carol:", " email carol@example.com", kind="control"),
    ]
    probe_file = write_probe_set(probes, root / "probes.jsonl")
    edit = root / "edit"
    edit_model(tiny_model_dir, None, EditArguments(layers=[1], method="svd"), edit, progress=False)
    return World(root, Path(tiny_model_dir), text, corpus, factors, probe_file, edit)


# ---- the one helper that checks a case --------------------------------------------------------------------


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every symlink) under ``roots``."""
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``memkfac ARGV`` in this process: (exit status, stderr). A traceback fails the test."""
    from memkfac.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    return int(code or 0), capsys.readouterr().err


def check_case(case: Case, world: World, tmp_path: Path, home: Path, capsys) -> str:
    """Prepare, run and check one case; returns stderr."""
    argv = case.setup(world, tmp_path)
    before = tree_hashes(world.root, world.model, tmp_path, home)
    code, err = case.run(argv, capsys)
    after = tree_hashes(world.root, world.model, tmp_path, home)
    assert code == case.code, f"{case.id}: exit {code}, expected {case.code}; stderr:\n{err}"
    assert "Traceback" not in err, err
    for pattern in case.message:
        assert pattern.lower() in err.lower(), f"{case.id}: {pattern!r} not in:\n{err}"
    if case.code == RUNTIME:
        assert "fix:" in err, err
    is_lock = lambda p: p.endswith(".memkfac-lock")  # noqa: E731  (memkfac's own; a stale one is taken over)
    changed = sorted(p for p, h in before.items() if after.get(p) != h and not is_lock(p))
    assert not changed, f"{case.id} changed or deleted {changed}"
    assert not [p for p in after if is_lock(p) and p not in before], "a lock file was left behind"
    return err


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[World, Path], list[str]]
    code: int
    message: tuple[str, ...]  # substrings the error names (case-insensitive)

    def run(self, argv, capsys) -> tuple[int, str]:
        return run_cli(argv, capsys)


# ---- helpers to build bad inputs --------------------------------------------------------------------------


def user_dir(path: Path) -> Path:
    """A directory of the user's own files."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.tex").write_text("\\section{Results} months of work\n")
    (path / "data").mkdir(exist_ok=True)
    (path / "data" / "table.csv").write_text("a,b\n1,2\n")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def edit_argv(w: World, out: Path, *extra: str, factors: Path | None = None) -> list[str]:
    factors = w.factors if factors is None else factors
    return ["edit", str(w.model), "--factors", str(factors), "--layers", "1-2", "--keep-mass", "0.9"] + [
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def factor_copy(w: World, tmp: Path, damage: Callable[[Path, dict], None]) -> Path:
    """A copy of the factors (without their eigenbasis, so edit must read the shards), damaged."""
    out = tmp / "factors"
    shutil.copytree(w.factors, out, ignore=shutil.ignore_patterns("eigenbasis"))
    index = json.loads((out / "index.json").read_text())
    damage(out, index)
    if index:
        (out / "index.json").write_text(json.dumps(index))
    return out


def eig_copy(w: World, tmp: Path, damage: Callable[[Path], None]) -> Path:
    out = tmp / "eig"
    shutil.copytree(w.eig, out)
    damage(out)
    return out


def model_copy(w: World, tmp: Path, damage: Callable[[Path], None]) -> Path:
    out = tmp / "model"
    shutil.copytree(w.model, out)
    damage(out)
    return out


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def eval_argv(model: Path, probes: Path, *extra: str) -> list[str]:
    return ["eval", str(model), "--probes", str(probes), "--variant", "v", "--quiet", *extra]


OOV = [  # a valid probe, then one whose suffix ids are another tokenizer's (the tiny vocabulary is 384)
    {
        "id": "ok-1",
        "prefix": "Customer record for Alice:",
        "suffix": " email alice@example.com",
        "split": "sweep",
    },
    {"id": "foreign-2", "prefix_ids": [10, 11, 12], "suffix_ids": [5000, 12], "split": "sweep"},
    {
        "id": "ok-3",
        "prefix": "Customer record for Bob:",
        "suffix": " email bob@example.com",
        "split": "holdout",
    },
    {"id": "ok-4", "prefix": "Customer record for Carol:", "suffix": " email carol@x.org", "kind": "control"},
]
OOV_MESSAGE = ("outside the model's vocabulary", "foreign-2", "line 2")


def oov_probes(tmp: Path) -> Path:
    return write_jsonl(tmp / "foreign.jsonl", OOV)


def misspelled_canaries(tmp: Path) -> Path:
    records = [dict(r) for r in OOV if r["id"] != "foreign-2"]
    records[0]["kind"], records[2]["kind"] = "memorised", "Control"
    return write_jsonl(tmp / "canaries.jsonl", records)


def lock_holder(target: Path) -> subprocess.Popen:
    """Another process that holds the output lock of ``target`` (a real concurrent writer)."""
    code = (
        "import sys, time\nfrom memkfac.locks import DirectoryLock\n"
        f"DirectoryLock({str(target)!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ---- the cases ------------------------------------------------------------------------------------------


def _edit_into_parent_of_inputs(w, tmp):
    parent = tmp / "work"
    shutil.copytree(w.model, parent / "model")
    shutil.copytree(w.factors, parent / "factors")
    argv = edit_argv(w, parent, factors=parent / "factors")
    argv[1] = str(parent / "model")
    return argv


def _edit_over_edit_with_user_file(w, tmp):
    old = tmp / "old-edit"
    shutil.copytree(w.edit, old)
    (old / "my-notes.txt").write_text("results I wrote down")
    return edit_argv(w, old, "--overwrite")


def _edit_over_other_kind(w, tmp):
    other = tmp / "bsn"
    shutil.copytree(w.edit, other)
    marker = json.loads((other / "memkfac_artifact.json").read_text())
    (other / "memkfac_artifact.json").write_text(json.dumps(marker | {"kind": "balanced_subnet"}))
    return edit_argv(w, other, "--overwrite")


def _edit_symlink(w, tmp):
    (tmp / "link").symlink_to(user_dir(tmp / "real"), target_is_directory=True)
    return edit_argv(w, tmp / "link")


def _edit_file(w, tmp):
    (tmp / "out").write_text("a file of mine")
    return edit_argv(w, tmp / "out")


def _corpus_argv(w, out, *extra):
    return ["corpus", "build", str(w.model), "--corpus", str(w.text), "--block-len", "16"] + [
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def _corpus_inside_source(w, tmp):
    docs = tmp / "docs"
    docs.mkdir()
    shutil.copy(w.text, docs / "notes.txt")
    argv = _corpus_argv(w, docs / "corpus")
    argv[argv.index("--corpus") + 1] = str(docs)
    return argv


def _factors_argv(w, out):
    return ["factors", str(w.model), "--corpus", str(w.corpus), "--layers", "1", "--tokens", "60"] + [
        "--shard-tokens",
        "60",
        "--out",
        str(out),
        "--quiet",
    ]


def _mine_onto_its_input(w, tmp):
    probes = tmp / "probes.jsonl"
    shutil.copy(w.probes, probes)
    return ["mine", str(w.model), "--probes", str(probes), "--out", str(probes), "--quiet"]


def _drop_records(out, index):
    index["shards"] = index["shards"][:1]  # two of three records removed; the shards stay on disk


def _repeat_record(out, index):
    index["shards"].append(index["shards"][0])


def _swap_shard(out, index):
    shutil.copy(out / "shard-00000.safetensors", out / "shard-00001.safetensors")
    from memkfac.fingerprint import sha256_file

    index["shards"][1]["sha256"] = sha256_file(out / "shard-00001.safetensors")


def _index_not_json(out, index):
    index.clear()
    (out / "index.json").write_text('{"shards": [')


def _eig_meta_of_other_model(eig):
    meta = json.loads((eig / "meta.json").read_text())
    (eig / "meta.json").write_text(json.dumps(meta | {"model_fingerprint": "0" * 64}))


def _no_tokenizer(m):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (m / name).unlink(missing_ok=True)


def _corpus_copy(w, tmp, damage):
    out = tmp / "corpus"
    shutil.copytree(w.corpus, out)
    damage(out)
    return out


def _canary_inject(w, tmp, probes):
    return ["inject", str(w.model), "--probes", str(probes), "--corpus", str(w.text)] + [
        "--block-len",
        "16",
        "--factor-tokens",
        "64",
        "--finetune-tokens",
        "256",
        "--heldout-tokens",
        "64",
        "--general-len",
        "8",
        "--epochs",
        "1",
        "--train-layers",
        "all",
        "--out",
        str(tmp / "injected"),
        "--quiet",
    ]


def _compare(w, probes):
    return ["compare", str(w.model), "--probes", str(probes), "--corpus", str(w.corpus), "--quiet"]


def _bsn(w, tmp, probes):
    return ["bsn", str(w.model), "--probes", str(probes), "--retain", str(w.corpus), "--layers", "1"] + [
        "--epochs",
        "1",
        "--out",
        str(tmp / "bsn"),
        "--quiet",
    ]


def _bands(w, probes, plot):
    return ["bands", str(w.model), "--factors", str(w.factors), "--layers", "1", "--probes", str(probes)] + [
        "--clean",
        str(w.corpus),
        "--plot",
        str(plot),
        "--quiet",
    ]


def _lock_held(w, tmp):
    out = tmp / "eig"
    proc = lock_holder(out)
    tmp.joinpath("pid").write_text(str(proc.pid))
    _HOLDERS.append(proc)
    return ["eigen", str(w.factors), "--out", str(out), "--quiet"]


def _lock_of_killed_run(w, tmp):
    out = tmp / "eig"
    proc = lock_holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return ["eigen", str(w.factors), "--out", str(out), "--quiet"]


def _lock_of_reused_pid(w, tmp):
    """A lock naming a live process whose start time differs: the pid was reused, the writer is gone."""
    from memkfac.locks import holder_info

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    _HOLDERS.append(proc)
    out = tmp / "eig"
    info = holder_info() | {"pid": proc.pid, "start_time": "1"}
    (tmp / ".eig.memkfac-lock").write_text(json.dumps(info))
    return ["eigen", str(w.factors), "--out", str(out), "--quiet"]


_HOLDERS: list[subprocess.Popen] = []

CASES = [
    # output directories: never a user's files, never an input, replace only an earlier artifact of the kind
    Case(
        "edit-out-user-dir",
        lambda w, t: edit_argv(w, user_dir(t / "mine")),
        RUNTIME,
        ("not part of", "would delete them"),
    ),
    Case("edit-out-parent-of-inputs", _edit_into_parent_of_inputs, RUNTIME, ("contains the input",)),
    Case("edit-out-factor-dir", lambda w, t: edit_argv(w, w.factors), RUNTIME, ("is the input",)),
    Case("edit-out-model-dir", lambda w, t: edit_argv(w, w.model), RUNTIME, ("is the input",)),
    Case("edit-out-inside-model", lambda w, t: edit_argv(w, w.model / "edited"), RUNTIME, ("lies inside",)),
    Case(
        "edit-out-earlier-edit", lambda w, t: edit_argv(w, w.edit), RUNTIME, ("already holds", "--overwrite")
    ),
    Case("edit-out-is-a-file", _edit_file, RUNTIME, ("existing file",)),
    Case("edit-out-symlink", _edit_symlink, RUNTIME, ("symbolic link",)),
    Case("edit-overwrite-other-kind", _edit_over_other_kind, RUNTIME, ("'balanced_subnet'",)),
    Case(
        "edit-overwrite-edit-with-user-file",
        _edit_over_edit_with_user_file,
        RUNTIME,
        ("my-notes.txt", "would delete them"),
    ),
    Case(
        "corpus-out-user-dir",
        lambda w, t: _corpus_argv(w, user_dir(t / "c")),
        RUNTIME,
        ("not part of", "would delete them"),
    ),
    Case("corpus-out-earlier-corpus", lambda w, t: _corpus_argv(w, w.corpus), RUNTIME, ("--overwrite",)),
    Case("corpus-out-inside-source", _corpus_inside_source, RUNTIME, ("lies inside",)),
    Case(
        "corpus-out-factor-dir", lambda w, t: _corpus_argv(w, w.factors, "--overwrite"), RUNTIME, ("factor",)
    ),
    Case(
        "eigen-out-factor-dir",
        lambda w, t: ["eigen", str(w.factors), "--out", str(w.factors), "--overwrite"],
        RUNTIME,
        ("contains the input",),
    ),
    Case(
        "eigen-out-user-dir",
        lambda w, t: ["eigen", str(w.factors), "--out", str(user_dir(t / "e"))],
        RUNTIME,
        ("not part of", "would delete them"),
    ),
    Case(
        "factors-out-user-dir",
        lambda w, t: _factors_argv(w, user_dir(t / "f")),
        RUNTIME,
        ("not part of", "would delete them"),
    ),
    Case("factors-out-model-dir", lambda w, t: _factors_argv(w, w.model), RUNTIME, ("is the input",)),
    Case("factors-out-corpus", lambda w, t: _factors_argv(w, w.corpus), RUNTIME, ("is the input",)),
    Case(
        "canaries-out-existing-file",
        lambda w, t: ["canaries", "--out", str(w.probes)],
        RUNTIME,
        ("already exists", "--overwrite"),
    ),
    Case(
        "canaries-out-model-config",
        lambda w, t: ["canaries", "--out", str(w.model / "config.json")],
        RUNTIME,
        ("already exists",),
    ),
    Case(
        "canaries-out-a-directory", lambda w, t: ["canaries", "--out", str(t)], RUNTIME, ("is a directory",)
    ),
    Case("mine-out-is-its-input", _mine_onto_its_input, RUNTIME, ("is the input",)),
    Case(
        "bands-plot-onto-model-weights",
        lambda w, t: _bands(w, w.probes, w.model / "model.safetensors"),
        RUNTIME,
        ("lies inside",),
    ),
    Case(
        "compare-report-onto-model-config",
        lambda w, t: [
            *_compare(w, w.probes),
            "--sweep-blocks",
            "4",
            "--report",
            str(w.model / "config.json"),
        ],
        RUNTIME,
        ("lies inside",),
    ),
    Case(
        "corpus-out-inside-tokenizer-model",
        lambda w, t: _corpus_argv(w, w.model / "corpus"),
        RUNTIME,
        ("lies inside",),
    ),
    Case(
        "bsn-out-inside-retain-corpus",
        lambda w, t: [*_bsn(w, t, w.probes)[:-3], "--out", str(w.corpus / "bsn"), "--quiet"],
        RUNTIME,
        ("lies inside",),
    ),
    Case(
        "downstream-task-dir-inside-model",
        lambda w, t: (
            ["downstream", str(w.model), "--variant", "v", "--tasks", "copying"]
            + ["--task-dir", str(w.model / "tasks"), "--quiet"]
        ),
        RUNTIME,
        ("lies inside",),
    ),
    Case(
        "eigen-of-a-missing-directory",
        lambda w, t: ["eigen", str(t / "no-factors"), "--quiet"],
        RUNTIME,
        ("not a factor directory",),
    ),
    Case(
        "bsn-out-user-dir",
        lambda w, t: [*_bsn(w, t, w.probes)[:-3], "--out", str(user_dir(t / "b")), "--quiet"],
        RUNTIME,
        ("not part of", "would delete them"),
    ),
    Case(
        "inject-out-model-dir",
        lambda w, t: [*_canary_inject(w, t, w.probes)[:-3], "--out", str(w.model), "--quiet"],
        RUNTIME,
        ("is the input",),
    ),
    # factor directories: an index that lies, damaged shards, another model's eigenbasis
    Case(
        "factors-records-missing",
        lambda w, t: edit_argv(w, t / "out", factors=factor_copy(w, t, _drop_records)),
        RUNTIME,
        ("does not list shard-00001", "rerun the same `memkfac factors`"),
    ),
    Case(
        "factors-record-repeated",
        lambda w, t: edit_argv(w, t / "out", factors=factor_copy(w, t, _repeat_record)),
        RUNTIME,
        ("shard-00000.safetensors more than once",),
    ),
    Case(
        "factors-shard-swapped",
        lambda w, t: edit_argv(w, t / "out", factors=factor_copy(w, t, _swap_shard)),
        RUNTIME,
        ("holds shard 0", "as shard 1"),
    ),
    Case(
        "factors-shard-truncated",
        lambda w, t: edit_argv(
            w, t / "out", factors=factor_copy(w, t, lambda d, i: truncate(d / "shard-00002.safetensors"))
        ),
        RUNTIME,
        ("shard-00002.safetensors", "sha256"),
    ),
    Case(
        "factors-shard-deleted",
        lambda w, t: edit_argv(
            w, t / "out", factors=factor_copy(w, t, lambda d, i: (d / "shard-00001.safetensors").unlink())
        ),
        RUNTIME,
        ("shard-00001.safetensors is missing",),
    ),
    Case(
        "factors-index-not-json",
        lambda w, t: edit_argv(w, t / "out", factors=factor_copy(w, t, _index_not_json)),
        RUNTIME,
        ("index.json is not valid JSON",),
    ),
    Case(
        "factors-index-tokens-lie",
        lambda w, t: edit_argv(w, t / "out", factors=factor_copy(w, t, lambda d, i: i.update(tokens=1))),
        RUNTIME,
        ("says 1 tokens",),
    ),
    Case(
        "factors-incomplete",
        lambda w, t: edit_argv(
            w, t / "out", factors=factor_copy(w, t, lambda d, i: i.update(complete=False))
        ),
        RUNTIME,
        ("incomplete",),
    ),
    Case(
        "eigenbasis-truncated",
        lambda w, t: edit_argv(
            w, t / "out", factors=eig_copy(w, t, lambda e: truncate(e / "eigenbasis.safetensors"))
        ),
        RUNTIME,
        ("eigenbasis.safetensors is truncated",),
    ),
    Case(
        "eigenbasis-meta-garbage",
        lambda w, t: edit_argv(
            w, t / "out", factors=eig_copy(w, t, lambda e: (e / "meta.json").write_text("<html>"))
        ),
        RUNTIME,
        ("meta.json is not valid JSON",),
    ),
    Case(
        "eigenbasis-of-another-model",
        lambda w, t: edit_argv(w, t / "out", factors=eig_copy(w, t, _eig_meta_of_other_model)),
        RUNTIME,
        ("computed for the model with fingerprint",),
    ),
    Case(
        "factors-dir-is-empty",
        lambda w, t: edit_argv(w, t / "out", factors=_mkdir(t / "empty")),
        RUNTIME,
        ("neither factors",),
    ),
    # model directories
    Case(
        "model-config-garbage",
        lambda w, t: eval_argv(
            model_copy(w, t, lambda m: (m / "config.json").write_text("{{not json")), w.probes
        ),
        RUNTIME,
        ("config.json is not valid JSON",),
    ),
    Case(
        "model-config-no-model-type",
        lambda w, t: eval_argv(model_copy(w, t, lambda m: (m / "config.json").write_text("{}")), w.probes),
        RUNTIME,
        ("lacks the field(s) model_type",),
    ),
    Case(
        "model-weights-truncated",
        lambda w, t: eval_argv(model_copy(w, t, lambda m: truncate(m / "model.safetensors")), w.probes),
        RUNTIME,
        ("model.safetensors is truncated",),
    ),
    Case(
        "model-weights-garbage",
        lambda w, t: eval_argv(
            model_copy(w, t, lambda m: (m / "model.safetensors").write_bytes(b"\xff" * 64)), w.probes
        ),
        RUNTIME,
        ("model.safetensors is", "safetensors"),
    ),
    Case(
        "model-tokenizer-missing",
        lambda w, t: eval_argv(model_copy(w, t, _no_tokenizer), w.probes),
        RUNTIME,
        ("has no tokenizer",),
    ),
    Case(
        "model-no-weights",
        lambda w, t: eval_argv(model_copy(w, t, lambda m: (m / "model.safetensors").unlink()), w.probes),
        RUNTIME,
        ("no weight files",),
    ),
    Case("model-path-missing", lambda w, t: eval_argv(t / "nope", w.probes), RUNTIME, ("unknown model",)),
    # probe files: ids the model cannot read, kinds that would be dropped, broken lines
    Case(
        "eval-probe-ids-outside-vocab", lambda w, t: eval_argv(w.model, oov_probes(t)), RUNTIME, OOV_MESSAGE
    ),
    Case("compare-probe-ids-outside-vocab", lambda w, t: _compare(w, oov_probes(t)), RUNTIME, OOV_MESSAGE),
    Case("bsn-probe-ids-outside-vocab", lambda w, t: _bsn(w, t, oov_probes(t)), RUNTIME, OOV_MESSAGE),
    Case(
        "mine-probe-ids-outside-vocab",
        lambda w, t: [
            "mine",
            str(w.model),
            "--probes",
            str(oov_probes(t)),
            "--out",
            str(t / "m.jsonl"),
        ],
        RUNTIME,
        OOV_MESSAGE,
    ),
    Case(
        "bands-probe-ids-outside-vocab",
        lambda w, t: _bands(w, oov_probes(t), t / "p.png"),
        RUNTIME,
        OOV_MESSAGE,
    ),
    Case(
        "inject-canary-ids-outside-vocab",
        lambda w, t: _canary_inject(w, t, oov_probes(t)),
        RUNTIME,
        OOV_MESSAGE,
    ),
    Case(
        "inject-canary-kinds-misspelled",
        lambda w, t: _canary_inject(w, t, misspelled_canaries(t)),
        RUNTIME,
        ("'memorised'", "'Control'", "memorized and control", "line 3"),
    ),
    Case(
        "compare-probe-kinds-misspelled",
        lambda w, t: _compare(w, misspelled_canaries(t)),
        RUNTIME,
        ("'memorised'", "memorized and control"),
    ),
    Case(
        "probe-line-not-json",
        lambda w, t: eval_argv(w.model, _with_text(t / "p.jsonl", w.probes.read_text() + '{"id": "x",\n')),
        RUNTIME,
        ("line 4", "bad JSON"),
    ),
    Case(
        "probe-file-missing", lambda w, t: eval_argv(w.model, t / "nope.jsonl"), RUNTIME, ("does not exist",)
    ),
    Case("probe-file-is-a-directory", lambda w, t: eval_argv(w.model, t), RUNTIME, ("is a directory",)),
    Case(
        "probe-duplicate-ids",
        lambda w, t: eval_argv(w.model, _with_text(t / "p.jsonl", w.probes.read_text() * 2)),
        RUNTIME,
        ("duplicate id",),
    ),
    # edit options
    Case(
        "edit-keep-mass-zero", lambda w, t: edit_argv(w, t / "o", "--keep-mass", "0"), USAGE, ("keep mass",)
    ),
    Case(
        "edit-keep-mass-above-one",
        lambda w, t: edit_argv(w, t / "o", "--keep-mass", "1.5"),
        USAGE,
        ("1.5",),
    ),
    Case(
        "edit-layer-not-in-model",
        lambda w, t: [*edit_argv(w, t / "o")[:4], "--layers", "99", *edit_argv(w, t / "o")[6:]],
        USAGE,
        ("99",),
    ),
    Case(
        "edit-layer-not-in-factors",
        lambda w, t: [*edit_argv(w, t / "o")[:4], "--layers", "3", *edit_argv(w, t / "o")[6:]],
        RUNTIME,
        ("model.layers.3",),
    ),
    Case(
        "edit-unknown-projection",
        lambda w, t: edit_argv(w, t / "o", "--proj", "gate,upp"),
        USAGE,
        ("upp",),
    ),
    Case(
        "edit-kfac-without-factors",
        lambda w, t: ["edit", str(w.model), "--layers", "1", "--out", str(t / "o")],
        USAGE,
        ("needs --factors",),
    ),
    Case(
        "edit-override-malformed",
        lambda w, t: edit_argv(w, t / "o", "--keep-mass-for", "23gate"),
        USAGE,
        ("LAYER.PROJ=RHO",),
    ),
    Case("edit-without-out", lambda w, t: edit_argv(w, t / "o")[:-3], USAGE, ("--out",)),
    # corpora
    Case(
        "corpus-split-missing",
        lambda w, t: eval_argv(
            w.model,
            w.probes,
            "--heldout",
            str(_corpus_copy(w, t, lambda c: (c / "heldout.safetensors").unlink())),
        ),
        RUNTIME,
        ("has no heldout split",),
    ),
    Case(
        "corpus-meta-garbage",
        lambda w, t: eval_argv(
            w.model,
            w.probes,
            "--heldout",
            str(_corpus_copy(w, t, lambda c: (c / "meta.json").write_text("["))),
        ),
        RUNTIME,
        ("meta.json is not valid JSON",),
    ),
    Case(
        "corpus-split-truncated",
        lambda w, t: eval_argv(
            w.model,
            w.probes,
            "--heldout",
            str(_corpus_copy(w, t, lambda c: truncate(c / "heldout.safetensors"))),
        ),
        RUNTIME,
        ("heldout.safetensors is truncated",),
    ),
    # concurrent runs: one writer per directory
    Case("lock-held-by-running-writer", _lock_held, RUNTIME, ("being written by another run", "pid")),
]


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _with_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _stop_lock_holders():
    yield
    while _HOLDERS:
        proc = _HOLDERS.pop()
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly_and_loses_nothing(case, world, tmp_path, memkfac_home, capsys):
    err = check_case(case, world, tmp_path, memkfac_home, capsys)
    if case.id == "lock-held-by-running-writer":
        assert f"pid {(tmp_path / 'pid').read_text()}" in err


@pytest.mark.parametrize(
    "setup",
    [_lock_of_killed_run, _lock_of_reused_pid],
    ids=["lock-of-killed-run", "lock-of-reused-pid"],
)
def test_a_stale_lock_is_taken_over(setup, world, tmp_path, memkfac_home, capsys):
    case = Case(setup.__name__, setup, 0, ("taking over the stale lock",))
    check_case(case, world, tmp_path, memkfac_home, capsys)
    assert (tmp_path / "eig" / "eigenbasis.safetensors").is_file()


def test_a_failed_factor_overwrite_keeps_the_earlier_collection(
    world, tmp_path, memkfac_home, capsys, monkeypatch
):
    """--overwrite of another collection builds the new one aside; killed part-way, the earlier one is
    whole and still loads; the same command again resumes and replaces it."""
    import memkfac.factors
    from memkfac.factor_store import load_factor_sums

    out = tmp_path / "factors"
    shutil.copytree(world.factors, out)
    before = tree_hashes(out)
    write_shard = memkfac.factors.write_shard
    calls = []

    def dies_after_one_shard(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # as Ctrl-C or a kill between shards
        calls.append(1)
        return write_shard(*args, **kwargs)

    monkeypatch.setattr(memkfac.factors, "write_shard", dies_after_one_shard)
    argv = [*_factors_argv(world, out), "--tokens", "240", "--overwrite", "--no-eigen"]  # four shards
    with pytest.raises(KeyboardInterrupt):
        run_cli(argv, capsys)
    assert tree_hashes(out) == before and load_factor_sums(out)[1]["fisher"] == "empirical"
    monkeypatch.setattr(memkfac.factors, "write_shard", write_shard)
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    _, index = load_factor_sums(out)
    assert index["fisher"] == "sampled" and index["arguments"]["layers"] == [1]
    assert not (out / "eigenbasis").exists()  # the old collection's eigenbasis went with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["factors"]  # no staging directory or lock left


def test_resurgence_refuses_foreign_probe_ids_before_training(world, tmp_path, monkeypatch):
    """The resurgence asset's engine call: every canary is checked before any fine-tuning step."""
    import torch

    import memkfac.resurgence
    from memkfac.errors import MemkfacError
    from memkfac.probes import load_probe_set
    from memkfac.resurgence import ResurgenceArguments, attack_rows

    monkeypatch.setattr(memkfac.resurgence, "finetune", lambda *a, **k: pytest.fail("trained on bad probes"))
    probes = load_probe_set(oov_probes(tmp_path))
    args = ResurgenceArguments(steps=(1,), batch_size=2, general_len=8, unrelated_count=2, unrelated_len=8)
    with pytest.raises(MemkfacError, match="foreign-2") as e:
        attack_rows(world.model, world.model, probes, torch.zeros(4, 16, dtype=torch.long), args, False)
    assert "line 2" in str(e.value)


def test_damaged_downstream_scores_name_the_file(tmp_path):
    from memkfac.downstream import load_item_scores
    from memkfac.errors import MemkfacError

    path = tmp_path / "base.json"
    for text, message in [("{", "not valid JSON"), ('{"tasks": {"copying": {}}}', "malformed")]:
        path.write_text(text)
        with pytest.raises(MemkfacError, match=message) as e:
            load_item_scores(path)
        assert str(path) in str(e.value) and "fix:" in str(e.value)


def test_overwrite_replaces_an_earlier_artifact_of_the_same_kind_atomically(world, tmp_path, capsys):
    old = tmp_path / "edit"
    shutil.copytree(world.edit, old)
    code, err = run_cli(edit_argv(world, old, "--overwrite"), capsys)
    assert code == 0, err
    manifest = json.loads((old / "memkfac_manifest.json").read_text())
    assert manifest["config"]["method"] == "kfac"  # the earlier svd edit was replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit"]  # no temporary or lock files left


@pytest.mark.parametrize(
    "config, message",
    [
        ("models: {m: {source: smollm2-135m}}\nmodelz: {}\n", "modelz"),
        ("models: [unclosed\n", "YAML"),
        ("models: {m: {source: ${MEMKFAC_UNSET_VARIABLE_XYZ}}}\n", "MEMKFAC_UNSET_VARIABLE_XYZ"),
        ("models: {'../escape': {source: smollm2-135m}}\n", "../escape"),
    ],
    ids=["unknown-top-level-key", "bad-yaml", "unset-variable", "bad-model-name"],
)
def test_pipeline_config_errors(config, message, tmp_path, memkfac_home, monkeypatch, capsys):
    from jobs.main import main

    path = tmp_path / "pipeline.yaml"
    path.write_text(config)
    monkeypatch.setenv("MEMKFAC_CONFIG", str(path))
    monkeypatch.delenv("MEMKFAC_UNSET_VARIABLE_XYZ", raising=False)
    before = tree_hashes(tmp_path)
    assert main([]) == CONFIG
    err = capsys.readouterr().err
    assert message in err and "fix:" in err
    assert tree_hashes(tmp_path) == before


@pytest.mark.slow
def test_a_second_collection_into_the_same_directory_is_refused_at_once(world, tmp_path, memkfac_home):
    """Two real `memkfac factors` processes into one --out. The first is stopped (SIGSTOP) while it
    holds the directory; the second is refused at once naming it; the first then completes whole."""
    import time

    from memkfac.factor_store import load_factor_sums

    out = tmp_path / "factors"
    memkfac = str(Path(sys.executable).parent / "memkfac")
    argv = [memkfac, *_factors_argv(world, out), "--batch-size", "1", "--tokens", "2000", "--no-eigen"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([*argv, "--seed", "1"], stderr=subprocess.PIPE, text=True, env=env)
    lock = out.parent / f".{out.name}.memkfac-lock"
    deadline = time.monotonic() + 120
    while True:  # until the first run holds the directory
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(lock.read_text()).get("pid") == first.pid:
                break
        time.sleep(0.002)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert lock.is_file(), "the first run finished before it could be stopped; collect more tokens"
        second = subprocess.run([*argv, "--seed", "2"], capture_output=True, text=True, env=env, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 1, second.stderr
    assert "being written by another run" in second.stderr and f"pid {first.pid}" in second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    _, index = load_factor_sums(out)
    assert index["complete"] and index["seed"] == 1 and not lock.exists()
