"""Materialization metadata the Dagster UI renders: row counts, column schemas, paths, plots."""

from __future__ import annotations

import base64
from pathlib import Path

import dagster as dg
import pyarrow as pa


def table_metadata(table: pa.Table, path: Path, prefix: str = "dagster") -> dict:
    """Row count (charted over time), column schema (Columns tab) and where the Parquet file is.

    The ``dagster/`` keys describe an asset's main table; give another ``prefix`` for further tables.
    """
    return {
        f"{prefix}/row_count": table.num_rows,
        f"{prefix}/column_schema": dg.TableSchema(
            columns=[dg.TableColumn(f.name, str(f.type), description=None) for f in table.schema]
        ),
        "path" if prefix == "dagster" else f"{prefix}/path": dg.MetadataValue.path(str(path)),
    }


def image_markdown(path: Path, title: str) -> dg.MetadataValue:
    """A PNG the engine wrote, embedded as a markdown image (the UI shows it under the asset)."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{data})")
