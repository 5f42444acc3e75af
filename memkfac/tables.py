"""The evaluation tables: one fixed Parquet schema each, written atomically in a hive layout.

Every table starts with the same key columns (variant, probe_set, run_id, created_at) and lives at
``MEMKFAC_HOME/evals/<table>/variant=<v>/probe_set=<p>/part.parquet``; dbt reads them with
``read_parquet(..., hive_partitioning=true)``. ``probe_set`` names the evaluation data: a probe set
for memorization and MIA tables, the held-out text for perplexity and nDCG, the task suite for
downstream scores. A partition holds the latest run; ``run_id`` and ``created_at`` say which. A
history table (``HISTORY_TABLES``) keeps every run instead: one file per run,
``part-<run_id>.parquet`` in the partition, never overwritten; readers glob ``part-*.parquet``.

Write rows with ``make_table`` (which fills the keys and casts to the schema) and ``write_table``
(which validates: a wrong schema is an error naming the column).
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from memkfac.errors import MemkfacError
from memkfac.paths import atomic_file, memkfac_home, safe_name

KEY_FIELDS = [
    pa.field("variant", pa.string(), nullable=False),  # model variant: base, kfac-l22-24-r0.9, ...
    pa.field("probe_set", pa.string(), nullable=False),  # evaluation data: probe set / text / suite
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
]
_PROBE_FIELDS = [
    pa.field("probe_id", pa.string()),
    pa.field("kind", pa.string()),
    pa.field("split", pa.string()),
]


def _schema(*fields: pa.Field) -> pa.Schema:
    return pa.schema(KEY_FIELDS + list(fields))


SCHEMAS: dict[str, pa.Schema] = {
    # One row per probe: greedy continuation of |suffix| tokens scored against the gold suffix.
    "memorization": _schema(
        *_PROBE_FIELDS,
        pa.field("source", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("suffix_tokens", pa.int32()),  # L
        pa.field("generated", pa.string()),
        pa.field("generated_ids", pa.list_(pa.int32())),
        pa.field("strict", pa.bool_()),  # d == 0
        pa.field("loose", pa.bool_()),  # 1 - d/L >= loose_threshold
        pa.field("levenshtein", pa.int32()),  # d, token-level edit distance
        pa.field("normalized_distance", pa.float64()),  # d / L
        pa.field("exact_prefix_len", pa.int32()),  # tokens reproduced before the first mistake
        pa.field("verbmem", pa.float64()),  # MUSE VerbMem: ROUGE-L F1 of the continuation, [0, 1]
        pa.field("exact_memorization", pa.float64()),  # teacher-forced argmax accuracy, [0, 1]
        pa.field("extraction_strength", pa.float64()),  # 1 - k*/L, [0, 1]
    ),
    # Paper Table 1 aggregates per (kind, split); split "all" pools the splits of a kind.
    "memorization_summary": _schema(
        pa.field("kind", pa.string()),
        pa.field("split", pa.string()),
        pa.field("n_probes", pa.int64()),
        pa.field("strict_pct", pa.float64()),
        pa.field("loose_pct", pa.float64()),
        pa.field("avg_lev", pa.float64()),  # mean normalized distance (higher = less memorized)
        pa.field("mean_exact_prefix_len", pa.float64()),
        pa.field("loose_threshold", pa.float64()),
        pa.field("verbmem", pa.float64()),  # means of the per-probe columns, each in [0, 1]
        pa.field("exact_memorization", pa.float64()),
        pa.field("extraction_strength", pa.float64()),
    ),
    # Paper App. G: the longest exact-match run under perturbed prompts, per probe.
    "positional_stress": _schema(
        *_PROBE_FIELDS,
        pa.field("t", pa.int32()),
        pa.field("n_variants", pa.int32()),
        pa.field("original_match_len", pa.int32()),
        pa.field("perturbed_match_len", pa.int32()),  # maximum over the perturbed prompts
        pa.field("best_variant", pa.string()),  # "left+i" (i gold tokens appended) or "right-m" (last m)
    ),
    "perplexity": _schema(
        pa.field("n_blocks", pa.int64()),
        pa.field("block_len", pa.int32()),
        pa.field("n_tokens", pa.int64()),  # predicted tokens: n_blocks * (block_len - 1)
        pa.field("mean_nll", pa.float64()),  # nats per token
        pa.field("perplexity", pa.float64()),  # exp(mean_nll)
        pa.field("perplexity_batch_mean", pa.float64()),  # official code: mean of per-batch exp(loss)
        pa.field("batch_size", pa.int32()),
        pa.field("data_fingerprint", pa.string()),
    ),
    "ndcg": _schema(
        pa.field("reference", pa.string()),  # the unedited model whose top-k lists are the truth
        pa.field("k", pa.int32()),
        pa.field("n_positions", pa.int64()),
        pa.field("ndcg", pa.float64()),  # paper App. C formula
        pa.field("ndcg_official", pa.float64()),  # official code: relevance from the reference rank
        pa.field("data_fingerprint", pa.string()),
    ),
    # One row per probe: membership-inference scores of the gold suffix given the prefix.
    "mia": _schema(
        *_PROBE_FIELDS,
        pa.field("n_tokens", pa.int32()),
        pa.field("loss", pa.float64()),  # mean suffix NLL, nats
        pa.field("zlib_ratio", pa.float64()),  # loss / zlib-compressed bytes of the suffix text
        pa.field("min_k", pa.float64()),  # Min-K% (k=20%): mean of the lowest k% token log-probs
        pa.field("min_k_pp", pa.float64()),  # Min-K%++ (k=20%)
    ),
    # AUC and TPR at 1% FPR of each MIA score separating members (kind memorized) from non-members
    # (kind control).
    "mia_auc": _schema(
        pa.field("score", pa.string()),
        pa.field("member_kind", pa.string()),
        pa.field("nonmember_kind", pa.string()),
        pa.field("n_members", pa.int64()),
        pa.field("n_nonmembers", pa.int64()),
        pa.field("auc", pa.float64()),
        pa.field("tpr_at_1pct_fpr", pa.float64()),  # exact, from the empirical ROC curve
    ),
    # Downstream task scores (lm-eval) and retention against the base model with bootstrap CIs.
    "downstream": _schema(
        pa.field("task", pa.string()),
        pa.field("category", pa.string()),
        pa.field("metric", pa.string()),
        pa.field("n_items", pa.int64()),
        pa.field("score", pa.float64()),
        pa.field("base_score", pa.float64()),  # null for the base model itself
        pa.field("retention", pa.float64()),  # score / base_score
        pa.field("retention_ci_low", pa.float64()),
        pa.field("retention_ci_high", pa.float64()),
        pa.field("n_bootstrap", pa.int32()),
        pa.field("seed", pa.int64()),
    ),
    # Paper Fig. 2/4: mean |v^T x| per curvature-mass band and data source.
    "band_activation": _schema(
        pa.field("layer", pa.int32()),
        pa.field("proj", pa.string()),
        pa.field("basis", pa.string()),  # kfac | svd
        pa.field("band", pa.string()),  # top10 | 10-25 | 25-50 | bottom50
        pa.field("source", pa.string()),  # memorized | clean | a task name
        pa.field("n_tokens", pa.int64()),
        pa.field("mean_activation", pa.float64()),
        pa.field("ratio_to_clean", pa.float64()),
    ),
    # Recall after N fine-tuning steps of an edited (or base) model, per attack arm; every run kept.
    "resurgence": _schema(
        pa.field("arm", pa.string()),  # what was fine-tuned on: retain | relearn | unrelated
        pa.field("seed", pa.int64()),  # the run's batch-order seed (a scheduled run draws its own)
        pa.field("steps", pa.int64()),
        pa.field("kind", pa.string()),
        pa.field("n_probes", pa.int64()),
        pa.field("strict_pct", pa.float64()),
        pa.field("loose_pct", pa.float64()),
        pa.field("avg_lev", pa.float64()),
        pa.field("strict_pct_before_edit", pa.float64()),  # the unedited model's recall, no fine-tuning
        pa.field("recovered", pa.float64()),  # strict_pct / strict_pct_before_edit
    ),
    # Paper Table 1: one row per method at its chosen strength (written by memkfac.compare).
    "comparison": _schema(
        pa.field("method", pa.string()),
        pa.field("setting", pa.string()),  # layers, projections, strength as chosen on the sweep split
        pa.field("trained_strict_pct", pa.float64()),
        pa.field("trained_loose_pct", pa.float64()),
        pa.field("trained_avg_lev", pa.float64()),
        pa.field("trained_verbmem", pa.float64()),  # the field's metrics: null where not computed
        pa.field("trained_exact_memorization", pa.float64()),
        pa.field("trained_extraction_strength", pa.float64()),
        # the sweep split: the forget set of GA+GD, NPO and BalancedSubnet, where K-FAC's rho was chosen
        pa.field("sweep_strict_pct", pa.float64()),
        pa.field("sweep_ppl", pa.float64()),  # the perplexity each row was matched on
        pa.field("control_strict_pct", pa.float64()),
        pa.field("control_loose_pct", pa.float64()),
        pa.field("control_avg_lev", pa.float64()),
        pa.field("perplexity", pa.float64()),
        pa.field("ndcg", pa.float64()),
        pa.field("downstream_retention", pa.float64()),  # mean over tasks; null if not run
        pa.field("downstream_ci_low", pa.float64()),
        pa.field("downstream_ci_high", pa.float64()),
        pa.field("mia_auc", pa.float64()),  # LOSS attack, held-out trained probes vs controls
        pa.field("mia_tpr_at_1pct_fpr", pa.float64()),
        pa.field("note", pa.string()),  # unmatched perplexity, divergence; empty if none
    ),
}


# Tables whose partitions keep every run (one file per run_id) rather than the latest.
HISTORY_TABLES = frozenset({"resurgence"})


def new_run_id() -> str:
    """A sortable unique run id: UTC time plus random hex."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def _schema_of(table_name: str) -> pa.Schema:
    if table_name not in SCHEMAS:
        raise MemkfacError(f"unknown evaluation table {table_name!r}", f"use one of {sorted(SCHEMAS)}")
    return SCHEMAS[table_name]


def make_table(table_name: str, rows: list[dict], *, variant: str, probe_set: str, run_id: str) -> pa.Table:
    """Build a table of ``table_name``'s schema from row dicts (keys filled in, values cast).

    Each row must have exactly the schema's non-key columns; a missing or extra column is an error.
    """
    schema = _schema_of(table_name)
    created_at = dt.datetime.now(dt.UTC)
    keys = {"variant": variant, "probe_set": probe_set, "run_id": run_id, "created_at": created_at}
    wanted = set(schema.names) - set(keys)
    for i, row in enumerate(rows):
        if set(row) != wanted:
            missing, extra = sorted(wanted - set(row)), sorted(set(row) - wanted)
            raise MemkfacError(
                f"row {i} of table {table_name!r} has missing columns {missing} and unknown columns {extra}",
                f"give exactly the columns of memkfac.tables.SCHEMAS[{table_name!r}]",
            )
    columns = {
        name: [keys[name]] * len(rows) if name in keys else [r[name] for r in rows] for name in schema.names
    }
    try:
        return pa.Table.from_pydict(columns, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise MemkfacError(
            f"table {table_name!r}: a value does not fit its column: {e}", "fix the row values"
        ) from e


def validate_table(table_name: str, table: pa.Table) -> None:
    """Raise ``MemkfacError`` naming the first column that differs from the table's schema."""
    schema = _schema_of(table_name)
    for field in schema:
        if field.name not in table.schema.names:
            raise MemkfacError(
                f"table {table_name!r} lacks column {field.name!r} ({field.type})",
                "build the table with memkfac.tables.make_table",
            )
        got = table.schema.field(field.name).type
        if got != field.type:
            raise MemkfacError(
                f"table {table_name!r} column {field.name!r} has type {got}, expected {field.type}",
                "build the table with memkfac.tables.make_table",
            )
    extra = [n for n in table.schema.names if n not in schema.names]
    if extra:
        raise MemkfacError(
            f"table {table_name!r} has unknown column {extra[0]!r}", "drop it or add it to SCHEMAS"
        )
    if table.schema.names != schema.names:
        raise MemkfacError(
            f"table {table_name!r} has its columns out of order", "use make_table or table.select"
        )
    for field in KEY_FIELDS:
        if table.column(field.name).null_count:
            raise MemkfacError(f"table {table_name!r} key column {field.name!r} has nulls", "fill every key")


def table_path(
    table_name: str, variant: str, probe_set: str, root: Path | None = None, run_id: str | None = None
) -> Path:
    """``root/evals/<table>/variant=<v>/probe_set=<p>/part.parquet`` (root defaults to MEMKFAC_HOME);
    ``part-<run_id>.parquet`` for a history table, whose runs each have their own file."""
    _schema_of(table_name)
    if (table_name in HISTORY_TABLES) != (run_id is not None):
        raise MemkfacError(
            f"table {table_name!r}: a file per run is for history tables {sorted(HISTORY_TABLES)} only",
            "pass run_id for a history table and for no other",
        )
    root = memkfac_home() if root is None else Path(root)
    v, p = safe_name(variant, "variant"), safe_name(probe_set, "probe set")
    name = "part.parquet" if run_id is None else f"part-{safe_name(run_id, 'run id')}.parquet"
    return root / "evals" / table_name / f"variant={v}" / f"probe_set={p}" / name


def write_table(
    table_name: str,
    table: pa.Table,
    root: Path | None = None,
    variant: str | None = None,
    probe_set: str | None = None,
) -> Path:
    """Validate ``table`` and write it atomically to its partition; returns the file path.

    ``variant`` and ``probe_set`` default to the table's (single) key values and must match them. A
    history table's rows are one run (one ``run_id``), appended next to the partition's earlier runs;
    writing a run that is already there is an error.
    """
    validate_table(table_name, table)
    for key, given in (("variant", variant), ("probe_set", probe_set)):
        values = set(table.column(key).to_pylist())
        if len(values) > 1 or (given is not None and values and values != {given}):
            raise MemkfacError(
                f"table {table_name!r} column {key!r} holds {sorted(values)}, but its partition is {given!r}",
                f"write one {key} per call, equal to the partition",
            )
    if table.num_rows == 0 and (variant is None or probe_set is None):
        raise MemkfacError(f"empty table {table_name!r} without a partition", "pass variant and probe_set")
    variant = variant if variant is not None else table.column("variant")[0].as_py()
    probe_set = probe_set if probe_set is not None else table.column("probe_set")[0].as_py()
    run_id = None
    if table_name in HISTORY_TABLES:
        run_ids = set(table.column("run_id").to_pylist())
        if len(run_ids) != 1:
            raise MemkfacError(
                f"history table {table_name!r} is appended one run at a time; these rows hold run ids "
                f"{sorted(run_ids)}",
                "write the rows of one run per call (make_table gives them one run_id)",
            )
        (run_id,) = run_ids
    path = table_path(table_name, variant, probe_set, root, run_id)
    if run_id is not None and path.exists():
        raise MemkfacError(
            f"run {run_id} of history table {table_name!r} is already written ({path})",
            "give each run a new run id (memkfac.tables.new_run_id); a history is never overwritten",
        )
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_table(table_name: str, root: Path | None = None) -> pa.Table:
    """All partitions of one table, every run of a history table (empty with the schema if none
    were written)."""
    schema = _schema_of(table_name)
    root = memkfac_home() if root is None else Path(root)
    name = "part-*.parquet" if table_name in HISTORY_TABLES else "part.parquet"
    files = sorted((root / "evals" / table_name).glob(f"variant=*/probe_set=*/{name}"))
    if not files:
        return schema.empty_table()
    return pa.concat_tables(pq.read_table(f, schema=schema) for f in files)
