"""Fixed schemas, validation naming the column, atomic hive-layout writes that duckdb reads."""

from __future__ import annotations

import pyarrow as pa
import pytest

from memkfac.errors import MemkfacError
from memkfac.tables import SCHEMAS, make_table, read_table, table_path, write_table


def _ppl_row(ppl=20.0):
    return dict(
        n_blocks=4,
        block_len=16,
        n_tokens=60,
        mean_nll=3.0,
        perplexity=ppl,
        perplexity_batch_mean=ppl + 1,
        batch_size=2,
        data_fingerprint="abc",
    )


def test_every_schema_starts_with_the_keys():
    for schema in SCHEMAS.values():
        assert schema.names[:4] == ["variant", "probe_set", "run_id", "created_at"]
    assert {
        "memorization",
        "memorization_summary",
        "perplexity",
        "ndcg",
        "downstream",
        "band_activation",
        "mia",
    } <= set(SCHEMAS)
    assert "resurgence" in SCHEMAS


def test_write_and_read_hive_layout(memkfac_home):
    import duckdb

    for variant, ppl in (("base", 20.0), ("kfac-r0.9", 22.5)):
        t = make_table("perplexity", [_ppl_row(ppl)], variant=variant, probe_set="heldout", run_id="r1")
        path = write_table("perplexity", t)
        assert (
            path
            == memkfac_home / "evals/perplexity" / f"variant={variant}" / "probe_set=heldout/part.parquet"
        )
    glob = (memkfac_home / "evals/perplexity/*/*/part.parquet").as_posix()
    got = duckdb.sql(
        f"select variant, perplexity from read_parquet('{glob}', hive_partitioning=true) order by 1"
    )
    assert got.fetchall() == [("base", 20.0), ("kfac-r0.9", 22.5)]
    assert read_table("perplexity").num_rows == 2
    # rewriting a partition replaces it; nothing temporary stays behind
    t = make_table("perplexity", [_ppl_row(30.0)], variant="base", probe_set="heldout", run_id="r2")
    write_table("perplexity", t)
    assert sorted(read_table("perplexity").column("run_id").to_pylist()) == ["r1", "r2"]
    assert not list(memkfac_home.rglob(".tmp-*"))


def test_wrong_schema_names_the_column(tmp_path):
    good = make_table("perplexity", [_ppl_row()], variant="base", probe_set="heldout", run_id="r")
    wrong_type = good.set_column(
        good.schema.get_field_index("n_blocks"), "n_blocks", pa.array(["4"], type=pa.string())
    )
    with pytest.raises(MemkfacError, match="'n_blocks' has type string"):
        write_table("perplexity", wrong_type, root=tmp_path)
    with pytest.raises(MemkfacError, match="lacks column 'mean_nll'"):
        write_table("perplexity", good.drop_columns(["mean_nll"]), root=tmp_path)
    with pytest.raises(MemkfacError, match="unknown column 'bogus'"):
        write_table("perplexity", good.append_column("bogus", pa.array([1])), root=tmp_path)
    with pytest.raises(MemkfacError, match="unknown evaluation table"):
        write_table("perplexities", good, root=tmp_path)
    with pytest.raises(MemkfacError, match="partition"):
        write_table("perplexity", good, root=tmp_path, variant="other")
    with pytest.raises(MemkfacError, match="missing columns \\['n_blocks'\\]"):
        make_table(
            "perplexity",
            [{k: v for k, v in _ppl_row().items() if k != "n_blocks"}],
            variant="b",
            probe_set="p",
            run_id="r",
        )
    with pytest.raises(MemkfacError, match="invalid variant"):
        table_path("perplexity", "../escape", "heldout", tmp_path)
    assert not (tmp_path / "evals").exists()
