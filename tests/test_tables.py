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


def _attack_row(recovered: float | None, seed: int) -> dict:
    return dict(
        arm="relearn",
        seed=seed,
        steps=10,
        kind="memorized",
        n_probes=4,
        strict_pct=25.0,
        loose_pct=50.0,
        avg_lev=0.3,
        strict_pct_before_edit=100.0,
        recovered=recovered,
    )


def test_a_history_table_appends_each_run_and_never_overwrites(memkfac_home):
    import duckdb

    from memkfac.tables import HISTORY_TABLES

    assert "resurgence" in HISTORY_TABLES
    paths = []
    for run_id, seed in (("r1", 1), ("r2", 2)):
        t = make_table("resurgence", [_attack_row(0.25, seed)], variant="base", probe_set="c", run_id=run_id)
        paths.append(write_table("resurgence", t))
    partition = memkfac_home / "evals/resurgence/variant=base/probe_set=c"
    assert paths == [partition / "part-r1.parquet", partition / "part-r2.parquet"]
    rows = read_table("resurgence").to_pylist()
    assert sorted((r["run_id"], r["seed"]) for r in rows) == [("r1", 1), ("r2", 2)]
    # dbt's source glob (dbt_reports/models/sources.yml) reads every run
    glob = (memkfac_home / "evals/resurgence/*/*/part-*.parquet").as_posix()
    assert duckdb.sql(f"select count(distinct seed) from read_parquet('{glob}')").fetchall() == [(2,)]
    again = make_table("resurgence", [_attack_row(0.5, 3)], variant="base", probe_set="c", run_id="r1")
    with pytest.raises(MemkfacError, match="run r1 of history table 'resurgence' is already written"):
        write_table("resurgence", again)
    two_runs = pa.concat_tables(
        [
            make_table("resurgence", [_attack_row(None, s)], variant="base", probe_set="c", run_id=f"x{s}")
            for s in (1, 2)
        ]
    )
    with pytest.raises(MemkfacError, match="one run at a time"):
        write_table("resurgence", two_runs)
    assert read_table("resurgence").num_rows == 2
    with pytest.raises(MemkfacError, match="pass run_id for a history table"):
        table_path("resurgence", "base", "c")
    with pytest.raises(MemkfacError, match="pass run_id for a history table"):
        table_path("perplexity", "base", "heldout", run_id="r1")
