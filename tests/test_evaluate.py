"""One variant's evaluation end to end on a tiny model: tables, reference cache and `memkfac eval`."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from memkfac.cli import main
from memkfac.corpora import CorpusArguments, build_corpus
from memkfac.evaluate import EvalArguments, HeldOut, evaluate_model, reference_topk, write_tables
from memkfac.models import load_model
from memkfac.probes import Probe, write_probe_set

TEXT = "\n\n".join(
    f"Record {i}: the customer Alice {i} paid {i * 7} dollars on day {i % 28}. def f(x): return x + {i}"
    for i in range(400)
)


@pytest.fixture(scope="module")
def corpus_dir(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("corpus")
    (root / "text.txt").write_text(TEXT)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return build_corpus(
        CorpusArguments(str(root / "text.txt"), block_len=24, max_tokens=600),
        tok,
        root / "built",
        progress=False,
    )


def _probes():
    return [
        Probe("m0", "Customer record for Alice:", " email alice@example.com", split="sweep"),
        Probe("m1", "The quick brown fox", " jumps over the lazy dog"),
        Probe("c0", "Customer record for Bob:", " phone +1 555 0100", kind="control"),
    ]


def test_evaluate_model_tables(tiny_model_dir, corpus_dir, memkfac_home):
    model, tok = load_model(tiny_model_dir)
    heldout = HeldOut.from_corpus(corpus_dir, max_blocks=4)
    assert heldout.blocks.shape == (4, 24) and heldout.name == "built-heldout"
    reference = reference_topk(tiny_model_dir, heldout, k=10, progress=False)
    assert reference.shape == (4, 24, 10)
    assert len(list((memkfac_home / "cache" / "topk").glob("*.safetensors"))) == 1
    args = EvalArguments(stress=True, stress_t=2)
    tables = evaluate_model(
        model,
        tok,
        _probes(),
        variant="base",
        probe_set="tiny",
        args=args,
        heldout=heldout,
        reference=reference,
        progress=False,
    )
    assert set(tables) == {
        "memorization",
        "memorization_summary",
        "mia",
        "mia_auc",
        "positional_stress",
        "perplexity",
        "ndcg",
    }
    assert tables["memorization"].num_rows == 3 and tables["positional_stress"].num_rows == 3
    assert tables["ndcg"].column("ndcg")[0].as_py() == pytest.approx(1.0)  # the model against itself
    assert tables["perplexity"].column("probe_set")[0].as_py() == "built-heldout"
    assert len({t.column("run_id")[0].as_py() for t in tables.values()}) == 1
    paths = write_tables(tables)
    assert paths["ndcg"] == memkfac_home / "evals/ndcg/variant=base/probe_set=built-heldout/part.parquet"
    assert pq.read_table(paths["memorization"]).num_rows == 3


def test_probe_set_without_controls_writes_an_empty_auc_table(tiny_model_dir, memkfac_home):
    """No controls, no AUC: the table is still written, with no rows, so no stale one survives."""
    model, tok = load_model(tiny_model_dir)
    memorized = [p for p in _probes() if p.kind == "memorized"]
    tables = evaluate_model(model, tok, memorized, variant="base", probe_set="tiny", progress=False)
    assert tables["mia"].num_rows == 2 and tables["mia_auc"].num_rows == 0
    assert pq.read_table(write_tables(tables)["mia_auc"]).num_rows == 0


def test_eval_command(tiny_model_dir, corpus_dir, memkfac_home, tmp_path, capsys):
    probes = write_probe_set(_probes(), tmp_path / "canaries.jsonl")
    argv = [
        "eval",
        str(tiny_model_dir),
        "--probes",
        str(probes),
        "--variant",
        "base",
        "--heldout",
        str(corpus_dir),
    ]
    assert main(argv + ["--reference", str(tiny_model_dir), "--max-blocks", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "memorized" in out and "nDCG@10 1.0000" in out and "perplexity" in out
    assert (memkfac_home / "evals/memorization/variant=base/probe_set=canaries/part.parquet").is_file()
    assert main(["eval", str(tiny_model_dir), "--probes", str(probes), "--variant", "../x", "--quiet"]) == 2
    assert "argument --variant: invalid name '../x'" in capsys.readouterr().err
    assert (
        main(["eval", str(tiny_model_dir), "--probes", str(probes), "--variant", "b", "--reference", "x"])
        == 2
    )


def test_memorization_and_mia_share_one_teacher_forced_pass(tiny_model_dir, monkeypatch):
    """With MIA on, one teacher-forced pass serves both tables, and gives what separate passes give."""
    import memkfac.memorization as memorization
    import memkfac.mia as mia

    model, tok = load_model(tiny_model_dir)
    separate = {
        "memorization": memorization.memorization_table(model, tok, _probes(), "base", "tiny", "r"),
        "mia": mia.mia_tables(model, tok, _probes(), "base", "tiny", "r")[0],
    }
    calls = []
    real = mia.suffix_token_stats

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mia, "suffix_token_stats", counted)
    monkeypatch.setattr(memorization, "suffix_token_stats", counted)
    tables = evaluate_model(
        model, tok, _probes(), variant="base", probe_set="tiny", run_id="r", progress=False
    )
    assert len(calls) == 1
    for name, table in separate.items():
        assert tables[name].drop(["created_at"]) == table.drop(["created_at"]), name
