"""Materialization metadata the Dagster UI renders: row counts, column schemas, paths, plots."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
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


def plot_markdown(draw: Callable, title: str, size: tuple[float, float] = (5.0, 3.2)) -> dg.MetadataValue:
    """Render ``draw(ax)`` with matplotlib (Agg) to a small PNG embedded as a markdown image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=90)
    try:
        draw(ax)
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return dg.MetadataValue.md(
        f"![{title}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"
    )


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
