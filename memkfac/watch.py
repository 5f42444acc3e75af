"""The resurgence watch: evaluate a registered fine-tune of an edited model and append it to history.

Someone pulls an edit from the registry, fine-tunes it and registers the result with a
``memkfac.parent`` tag (``memkfac.registry``). ``watch_version`` pulls that version by URI, finds the
edit it descends from, and measures on that edit's probe set: strict and loose recall on the removed
canaries (kind ``memorized``) and on the controls, held-out perplexity and the MIA AUC (loss score).
Each evaluation is one new Parquet file under ``MEMKFAC_HOME/evals/watch_history/``: rows are keyed
by (registered model, version, evaluated_at) and never overwritten. A version that cannot be
evaluated (no lineage, a parent that is not an edit, files missing or unloadable, the probe set
changed, the registry unreachable) gets a row with that ``status`` and a message, not an exception,
so one bad version never stops the watch for the others.

When the removed canaries' strict recall passes ``max_recall_pct``, the version gets the MLflow tag
``memkfac.resurgence_alert = "recites k of n removed canaries"``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from memkfac.arguments import Checks
from memkfac.paths import atomic_file, memkfac_home, safe_name

log = logging.getLogger(__name__)

HISTORY = "watch_history"
OK = "ok"
# the other statuses: no_lineage, parent_not_edited, load_failed, probe_set_changed, registry_unreachable
MIA_SCORE = "loss"  # the MIA score reported in the history (the full set is in the mia tables)


@dataclass
class WatchArguments:
    interval_seconds: int = 300  # how often the sensor lists the registry
    max_recall_pct: float = 20.0  # strict recall of removed canaries above which a version is flagged

    def __post_init__(self):
        check = Checks()
        check.at_least("interval_seconds", self.interval_seconds, 30)
        check.require(
            0 <= self.max_recall_pct <= 100,
            "max_recall_pct",
            f"max_recall_pct {self.max_recall_pct} is outside [0, 100]",
            "give a percentage of removed canaries, e.g. 20.0",
        )
        check.done()


HISTORY_SCHEMA = pa.schema(
    [
        pa.field("registered_model", pa.string(), nullable=False),
        pa.field("version", pa.string(), nullable=False),
        pa.field("evaluated_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok, or why it was skipped
        pa.field("message", pa.string()),
        pa.field("parent", pa.string()),  # the version's memkfac.parent
        pa.field("lineage", pa.string()),  # models:/<name>/<version> of the edit it descends from
        pa.field("variant", pa.string()),  # that edit's variant
        pa.field("probe_set", pa.string()),
        pa.field("removed_n", pa.int64()),  # removed canaries (kind memorized)
        pa.field("removed_strict_k", pa.int64()),  # of them, recited exactly
        pa.field("removed_strict_pct", pa.float64()),
        pa.field("removed_loose_pct", pa.float64()),
        pa.field("control_n", pa.int64()),
        pa.field("control_strict_pct", pa.float64()),
        pa.field("control_loose_pct", pa.float64()),
        pa.field("perplexity", pa.float64()),  # on the base model's held-out corpus blocks
        pa.field("mia_auc", pa.float64()),  # loss-score AUC, memorized vs control
        pa.field("max_recall_pct", pa.float64()),
        pa.field("alert", pa.bool_()),  # removed_strict_pct > max_recall_pct
    ]
)


@dataclass(frozen=True)
class WatchInputs:
    """Where the watch finds what an edit was measured on: the validated probe file of a probe set and
    the corpus directory of a base model (the pipeline's store layout)."""

    probe_file: Callable[[str], Path]
    corpus_dir: Callable[[str], Path]
    heldout_blocks: int | None = 64


def alert_text(recited: int, removed: int) -> str:
    return f"recites {recited} of {removed} removed canaries"


def watch_version(
    tracking_uri: str,
    name: str,
    version: str,
    inputs: WatchInputs,
    args: WatchArguments,
    eval_args=None,
    root: Path | None = None,
) -> dict:
    """Evaluate registered version ``name/version`` and append its history row; returns the row.

    Never raises for a bad version or an unreachable registry: the row's ``status`` says what happened.
    """
    from mlflow import MlflowClient

    row = {f.name: None for f in HISTORY_SCHEMA} | {
        "registered_model": name,
        "version": str(version),
        "max_recall_pct": args.max_recall_pct,
        "alert": False,
    }
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        row |= _evaluate(client, tracking_uri, name, str(version), inputs, eval_args)
    except _Skipped as e:
        row |= e.known | {"status": e.status, "message": str(e)}
    except Exception as e:  # the registry (or its network) failing: recorded, the watch goes on
        if not is_registry_error(e):
            raise
        row |= {"status": "registry_unreachable", "message": f"{type(e).__name__}: {e}"}
    if row["status"] == OK and row["removed_strict_pct"] > args.max_recall_pct:
        row["alert"] = True
        row["message"] = alert_text(row["removed_strict_k"], row["removed_n"])
        try:
            from memkfac.registry import TAG_ALERT

            client.set_model_version_tag(name, str(version), TAG_ALERT, row["message"])
        except Exception as e:
            if not is_registry_error(e):
                raise
            row["message"] += f" (the MLflow tag could not be set: {e})"
    if row["status"] != OK:
        log.warning("watch: %s/%s skipped (%s): %s", name, version, row["status"], row["message"])
    append_history(row, root)
    return row


class _Skipped(Exception):
    """A version the watch cannot evaluate: its status, why, and the history columns already known."""

    def __init__(self, status: str, message: str, known: dict | None = None):
        super().__init__(message)
        self.status, self.known = status, known or {}


def is_registry_error(e: Exception) -> bool:
    """An MLflow error or a failed connection: the registry, not the version, is at fault."""
    from mlflow.exceptions import MlflowException

    return isinstance(e, MlflowException | ConnectionError | OSError)


def _evaluate(client, tracking_uri: str, name: str, version: str, inputs: WatchInputs, eval_args) -> dict:
    from memkfac.evaluate import EvalArguments, HeldOut, evaluate_model
    from memkfac.fingerprint import sha256_file
    from memkfac.memorization import summarize
    from memkfac.probes import load_probe_set
    from memkfac.registry import (
        TAG_MODEL,
        TAG_PARENT,
        TAG_PROBE_FINGERPRINT,
        TAG_PROBE_SET,
        TAG_VARIANT,
        LineageProblem,
        edited_ancestor,
        version_uri,
    )

    parent = client.get_model_version(name, version).tags.get(TAG_PARENT)
    try:
        edit = edited_ancestor(client, name, version)
    except LineageProblem as e:
        raise _Skipped(e.status, str(e), {"parent": parent}) from e
    found = {
        "parent": parent,
        "lineage": version_uri(edit.name, edit.version),
        "variant": edit.tags[TAG_VARIANT],
        "probe_set": edit.tags[TAG_PROBE_SET],
    }
    probe_file = inputs.probe_file(edit.tags[TAG_PROBE_SET])
    if not probe_file.is_file() or sha256_file(probe_file) != edit.tags[TAG_PROBE_FINGERPRINT]:
        raise _Skipped(
            "probe_set_changed",
            f"the probe set {edit.tags[TAG_PROBE_SET]!r} that {found['lineage']} removed is no longer "
            f"{probe_file} with sha256 {edit.tags[TAG_PROBE_FINGERPRINT][:12]}: restore it to watch "
            "this lineage",
            found,
        )
    probes = load_probe_set(probe_file)
    heldout = HeldOut.from_corpus(inputs.corpus_dir(edit.tags[TAG_MODEL]), inputs.heldout_blocks)
    with tempfile.TemporaryDirectory(prefix="memkfac-watch-") as tmp:
        try:
            model, tokenizer = _load_version(tracking_uri, name, version, Path(tmp))
        except _Skipped as e:
            raise _Skipped(e.status, str(e), found) from e
        eval_args = eval_args or EvalArguments()
        tables = evaluate_model(
            model,
            tokenizer,
            probes,
            variant=f"{name}/{version}",
            probe_set=found["probe_set"],
            args=dataclasses.replace(eval_args, mia=True, stress=False),
            heldout=heldout,
            progress=False,
        )
    per_probe = tables["memorization"].to_pylist()
    removed = [r for r in per_probe if r["kind"] == "memorized"]
    summary = {(r["kind"], r["split"]): r for r in summarize(per_probe, eval_args.loose_threshold)}
    control = summary.get(("control", "all"), {})
    auc = [r["auc"] for r in tables["mia_auc"].to_pylist() if r["score"] == MIA_SCORE]
    return found | {
        "status": OK,
        "removed_n": len(removed),
        "removed_strict_k": sum(r["strict"] for r in removed),
        "removed_strict_pct": summary.get(("memorized", "all"), {}).get("strict_pct", 0.0),
        "removed_loose_pct": summary.get(("memorized", "all"), {}).get("loose_pct", 0.0),
        "control_n": control.get("n_probes", 0),
        "control_strict_pct": control.get("strict_pct"),
        "control_loose_pct": control.get("loose_pct"),
        "perplexity": tables["perplexity"].column("perplexity")[0].as_py(),
        "mia_auc": auc[0] if auc else None,
    }


def _load_version(tracking_uri: str, name: str, version: str, tmp: Path):
    """Download the version's transformers-flavor artifact and load it with ``memkfac.models.load_model``."""
    from memkfac.models import load_model
    from memkfac.registry import version_uri

    try:
        return load_model(download_transformers_model(tracking_uri, name, version, tmp))
    except Exception as e:  # missing files, a damaged checkpoint, another flavor: whatever it is, skipped
        raise _Skipped("load_failed", f"{version_uri(name, version)} could not be loaded: {e}") from e


def download_transformers_model(tracking_uri: str, name: str, version: str, dest: Path) -> Path:
    """Download a transformers-flavor model version into ``dest``; returns a directory that
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` both read.

    The flavor stores weights under ``model/`` and the tokenizer under ``components/tokenizer/``; the
    tokenizer files are copied next to the weights.
    """
    import mlflow.artifacts
    from mlflow import MlflowClient

    source = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version_download_uri(
        name, version
    )
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(dest), tracking_uri=tracking_uri
        )
    )
    weights = local / "model" if (local / "model" / "config.json").is_file() else local
    tokenizer = local / "components" / "tokenizer"
    if tokenizer.is_dir():
        for f in tokenizer.iterdir():
            if f.is_file() and not (weights / f.name).exists():
                shutil.copy2(f, weights / f.name)
    return weights


def history_dir(root: Path | None = None) -> Path:
    return (memkfac_home() if root is None else Path(root)) / "evals" / HISTORY


def append_history(row: dict, root: Path | None = None) -> Path:
    """Write ``row`` as a new file ``watch_history/<model>/<version>/<time>-<random>.parquet``."""
    row = row | {"evaluated_at": row.get("evaluated_at") or dt.datetime.now(dt.UTC)}
    table = pa.Table.from_pylist([row], schema=HISTORY_SCHEMA)
    folder = history_dir(root) / safe_name(row["registered_model"], "registered model") / row["version"]
    path = folder / f"{row['evaluated_at']:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_history(root: Path | None = None) -> pa.Table:
    """Every history row (empty with the schema if none), oldest first."""
    files = sorted(history_dir(root).glob("*/*/*.parquet"))
    if not files:
        return HISTORY_SCHEMA.empty_table()
    table = pa.concat_tables(pq.read_table(f, schema=HISTORY_SCHEMA) for f in files)
    return table.sort_by("evaluated_at")
