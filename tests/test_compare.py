"""The Table-1 comparison end to end on a tiny model: rows, tables, report, and cache reuse."""

from __future__ import annotations

import pytest
import torch

from memkfac import compare as compare_module
from memkfac.compare import CompareArguments, cost_share, matching_note, run_comparison
from memkfac.corpora import CorpusArguments, build_corpus
from memkfac.generation import greedy_continuations
from memkfac.models import load_model
from memkfac.probes import Probe
from memkfac.tables import read_table

TEXT = "\n\n".join(
    f"Record {i}: the customer Alice {i} paid {i * 7} dollars on day {i % 28}. def f(x): return x + {i}"
    for i in range(600)
)


def _probes(model, tok) -> list[Probe]:
    """Trained probes = the tiny model's own greedy continuations (recalled by construction)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 384, (10,), generator=g).tolist() for _ in range(12)]
    own = greedy_continuations(model, tok, prompts, 8, progress=False)
    probes = []
    for i, (p, o) in enumerate(zip(prompts, own, strict=True)):
        kind, split = (
            ("memorized", "sweep") if i < 4 else ("memorized", "holdout") if i < 8 else ("control", "holdout")
        )
        suffix = o if kind == "memorized" else torch.randint(1, 384, (8,), generator=g).tolist()
        probes.append(Probe(f"p{i}", tok.decode(p), tok.decode(suffix), kind, "test", split, p, suffix))
    return probes


@pytest.mark.slow
def test_comparison_on_tiny_model(tiny_model_dir, memkfac_home, tmp_path, monkeypatch):
    model, tok = load_model(tiny_model_dir)
    (tmp_path / "text.txt").write_text(TEXT)
    corpus = build_corpus(
        CorpusArguments(str(tmp_path / "text.txt"), block_len=32), tok, tmp_path / "corpus", progress=False
    )
    probes = _probes(model, tok)
    args = CompareArguments(
        layer_sets=((1, 2), (2, 3)),
        rhos=(0.99, 0.9, 0.5),
        factor_tokens=2048,
        sweep_blocks=4,
        eval_blocks=8,
        match_steps=3,
        bsn_epochs=2,
        retain_blocks=8,
        forget_steps=(2, 4, 8),
        forget_lrs=(1e-3,),
        relearn_steps=(2, 4),
        downstream_tasks=("copying",),
    )
    report = tmp_path / "table1.md"
    lines = []
    results = run_comparison(
        tiny_model_dir, probes, corpus, args, "tiny", report, progress=False, log=lines.append
    )

    assert [r.method for r in results] == [
        "base",
        "K-FAC",
        "per-side",
        "SVD",
        "random basis",
        "BalancedSubnet",
        "GA+GD",
        "NPO",
        "identity basis",
        "block deletion",
        "noise",
    ]
    base, kfac = results[0], results[1]
    assert base.trained["strict_pct"] == 100.0 and base.ndcg == pytest.approx(1.0)
    assert base.downstream["retention"] is None  # the base's own rows carry no retention
    assert kfac.downstream["ci_low"] <= kfac.downstream["retention"] <= kfac.downstream["ci_high"]
    assert kfac.setting.startswith("layers ") and "rho" in kfac.setting
    for r in results[2:]:  # every row edits the K-FAC layers; matched rows say how close they came
        assert r.setting.startswith(kfac.setting.split(",")[0]), r.setting
        assert r.perplexity > 0 and 0 <= r.mia["auc"] <= 1
        if r.method != "BalancedSubnet":
            share = cost_share(r.sweep["ppl"], kfac.sweep["ppl"], base.sweep["ppl"])
            assert (abs(share - 1) <= args.match_tolerance) == (r.note == ""), r
    assert {r.method for r in results if r.relearning} == {"K-FAC", "GA+GD", "NPO"}
    for r in results:
        if r.relearning:
            assert r.relearning["before_edit"] == 100.0 and set(r.relearning["recovered"]) == {"2", "4"}
    text = report.read_text()
    assert text.count("\n| ") >= 11 + 2 + 3 and "copying" in text and "| GA+GD |" in text
    assert "VerbMem" in text and "TPR@1%FPR" in text and "Relearning" in text
    assert report.with_suffix(".json").is_file()
    assert report.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert read_table("comparison").num_rows == 11
    assert set(read_table("memorization").column("variant").to_pylist()) == {r.variant for r in results}
    assert read_table("downstream").num_rows == 11
    assert any("logged to MLflow run" in line for line in lines), lines[-3:]

    # a rerun reuses factors, sweep points, edits, BalancedSubnet and downstream scores
    def fail(*a, **k):
        raise AssertionError("recomputed a cached step")

    monkeypatch.setattr(compare_module, "apply_edit", fail)
    monkeypatch.setattr(compare_module, "unlearn", fail)
    monkeypatch.setattr(compare_module, "_relearn_rows", fail)
    monkeypatch.setattr("memkfac.factors.collect_factors", fail)
    monkeypatch.setattr("memkfac.balanced_subnet.train_balanced_subnet", fail)
    monkeypatch.setattr("memkfac.downstream.run_downstream", fail)
    again = run_comparison(
        tiny_model_dir, probes, corpus, args, "tiny", report, progress=False, log=lines.append
    )
    assert [r.trained for r in again] == [r.trained for r in results]


def test_compare_command_rejects_probes_without_both_splits(tiny_model_dir, memkfac_home, tmp_path, capsys):
    from memkfac.cli import main
    from memkfac.probes import write_probe_set

    probes = write_probe_set(
        [Probe("a", "Customer record for Alice:", " email alice@example.com", split="holdout")],
        tmp_path / "only_holdout.jsonl",
    )
    argv = ["compare", str(tiny_model_dir), "--probes", str(probes), "--corpus", str(tmp_path), "--quiet"]
    assert main(argv) == 1
    assert "0 sweep and 1 holdout trained probes" in capsys.readouterr().err
    assert not (memkfac_home / "cache").exists()


def test_compare_arguments_are_checked():
    from memkfac.errors import MemkfacError

    with pytest.raises(MemkfacError, match="rho grid"):
        CompareArguments(rhos=(1.0,)).check()
    with pytest.raises(MemkfacError, match="unknown comparison method"):
        CompareArguments(methods=("lora",)).check()
    with pytest.raises(MemkfacError, match="forget_steps"):
        CompareArguments(forget_steps=(20, 10)).check()


def test_compare_command_line_maps_to_arguments():
    from memkfac.cli import build_parser
    from memkfac.cli.compare import compare_arguments

    argv = ["compare", "M", "--probes", "p.jsonl", "--corpus", "c", "--layers", "22-24", "26,27,28"]
    argv += ["--rhos", "0.99,0.95", "--methods", "svd,npo", "--tasks", "copying,arithmetic"]
    argv += ["--forget-steps", "5,10", "--no-relearn"]
    got = compare_arguments(build_parser().parse_args(argv), num_layers=30)
    assert got.layer_sets == ((22, 23, 24), (26, 27, 28))
    assert got.rhos == (0.99, 0.95) and got.methods == ("svd", "npo") and got.downstream
    assert got.forget_steps == (5, 10) and not got.relearn and got.mlflow
    assert got.downstream_tasks == ("copying", "arithmetic") and got.projections == ("gate", "up")
    defaults = compare_arguments(build_parser().parse_args(argv[:6]), num_layers=30)
    assert defaults == CompareArguments()


@pytest.mark.parametrize(
    "flags",
    [["--methods", "svd,lora"], ["--forget-steps", "10,5"], ["--forget-steps", "2.5"], ["--controls", "svd"]],
)
def test_compare_usage_errors_exit_2(flags, tiny_model_dir, tmp_path):
    from memkfac.cli import main

    argv = ["compare", str(tiny_model_dir), "--probes", "p.jsonl", "--corpus", str(tmp_path), "--quiet"]
    try:
        status = main([*argv, *flags])
    except SystemExit as e:  # argparse's own usage errors
        status = e.code
    assert status == 2


def test_report_marks_rows_and_shows_missing_metrics():
    from memkfac.compare import MethodResult, format_report

    base = MethodResult(
        "base",
        "base",
        "unedited",
        "m",
        {"ppl": 10.0},
        {"n_probes": 4, "strict_pct": 100.0, "loose_pct": 100.0, "avg_lev": 0.0, "verbmem": 0.9},
        perplexity=10.0,
        ndcg=1.0,
    )
    npo = MethodResult("NPO", "npo-l1", "no grid step before divergence", "", note="diverged at step 1")
    far = MethodResult(
        "noise",
        "noise-l1",
        "layers 1",
        "m",
        {"ppl": 12.0},
        base.trained,
        perplexity=12.0,
        ndcg=0.9,
        note=matching_note(12.0, 11.0, 10.0, 0.1, bracketed=False),
    )
    text = format_report(
        [base, npo, far], CompareArguments(), {"recall_removed": True, "strict_pct": 0.0, "ppl": 10.0}
    )
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert "diverged at step 1" in rows["NPO"] and rows["NPO"].count("–") >= 10
    assert "stays above it; the closest costs 200% of the K-FAC" in rows["noise"]
    assert "| 0.900 |" in rows["base"]  # VerbMem where the summary has it; – where it does not


@pytest.mark.slow
def test_unmatched_and_diverged_rows_are_kept_and_marked(tiny_model_dir, memkfac_home, tmp_path, monkeypatch):
    """GA+GD off the K-FAC perplexity by more than the tolerance, NPO diverging at its first step: both
    rows stay, marked."""
    from memkfac.forget_set import UnlearnResult, unlearn

    model, tok = load_model(tiny_model_dir)
    (tmp_path / "text.txt").write_text(TEXT)
    corpus = build_corpus(
        CorpusArguments(str(tmp_path / "text.txt"), block_len=32), tok, tmp_path / "corpus", progress=False
    )

    def npo_diverges(model, forget, retain, args, *rest):
        return (
            UnlearnResult(steps=0, diverged_at=1)
            if args.method == "npo"
            else unlearn(model, forget, retain, args, *rest)
        )

    monkeypatch.setattr(compare_module, "unlearn", npo_diverges)
    args = CompareArguments(
        layer_sets=((1, 2),),
        rhos=(0.5,),
        factor_tokens=2048,
        sweep_blocks=4,
        eval_blocks=4,
        methods=("ga_gd", "npo"),
        retain_blocks=4,
        forget_steps=(1, 2),
        forget_lrs=(0.5,),
        match_tolerance=1e-4,  # a random tiny model's perplexity hardly moves: ask for more than it gives
        relearn=False,
        downstream=False,
        mlflow=False,
    )
    results = run_comparison(
        tiny_model_dir,
        _probes(model, tok),
        corpus,
        args,
        "tiny",
        tmp_path / "r.md",
        progress=False,
        log=lambda _: None,
    )
    by_method = {r.method: r for r in results}
    assert list(by_method) == ["base", "K-FAC", "GA+GD", "NPO"]
    ga_gd = by_method["GA+GD"]
    assert ga_gd.note and ga_gd.note.endswith("of the K-FAC edit's perplexity increase"), ga_gd.note
    assert ga_gd.note.startswith(("did not reach target perplexity", "not matched"))
    assert by_method["NPO"].note == "diverged at step 1 (lr 0.5)" and by_method["NPO"].model_dir == ""
    text = (tmp_path / "r.md").read_text()
    assert "| NPO |" in text and "diverged at step 1 (lr 0.5)" in text and ga_gd.note in text


def test_matching_is_measured_on_the_k_fac_edits_perplexity_increase():
    # base 13.46, K-FAC 14.06: an increase of 0.60; tolerance 0.1 accepts increases of 0.54 to 0.66
    assert cost_share(14.06, 14.06, 13.46) == pytest.approx(1.0)
    assert cost_share(13.40, 14.06, 13.46) == pytest.approx(-0.1)
    assert matching_note(14.11, 14.06, 13.46, 0.1, bracketed=True) == ""  # 108%
    assert matching_note(14.01, 14.06, 13.46, 0.1, bracketed=False) == ""  # 92%: close enough
    # within 5% of the target perplexity, but a tenth of the edit's cost the wrong way: not matched
    assert matching_note(13.40, 14.06, 13.46, 0.1, bracketed=False) == (
        "did not reach target perplexity: every strength tried stays below it; the closest costs -10% "
        "of the K-FAC edit's perplexity increase"
    )
    assert matching_note(14.20, 14.06, 13.46, 0.1, bracketed=True) == (
        "not matched: the closest point costs 123% of the K-FAC edit's perplexity increase"
    )
    # an edit that costs nothing counts as costing 0.5% of the base perplexity (0.05 here)
    assert cost_share(10.04, 10.0, 10.0) == pytest.approx(0.8)


def test_forget_set_grid_raises_the_rate_until_a_run_reaches_the_target(
    tiny_model_dir, memkfac_home, tmp_path, monkeypatch
):
    """Each rate's run stops at the first grid step at or past the target; a higher rate is tried only
    while none has reached it; the run that reached it is refined between the grid steps around the
    target; the closest point of all runs is chosen."""
    from memkfac.compare import Comparison
    from memkfac.forget_set import UnlearnResult

    model, tok = load_model(tiny_model_dir)
    (tmp_path / "text.txt").write_text(TEXT)
    corpus = build_corpus(
        CorpusArguments(str(tmp_path / "text.txt"), block_len=32), tok, tmp_path / "corpus", progress=False
    )
    # sweep perplexity after n steps at each rate: 1e-4 never gets there, 1e-3 passes 14.0 at step 3
    ppl = {1e-4: {2: 13.0, 4: 13.1, 8: 13.2}, 1e-3: {2: 13.5, 3: 14.05, 4: 14.1, 8: 15.0}, 1e-2: {2: 30.0}}
    runs, now = [], {}

    def fake_unlearn(model, forget, retain, args, pad_id, progress, after_step):
        runs.append((args.lr, []))
        for step in range(1, args.steps + 1):
            now.update(lr=args.lr, step=step)
            runs[-1][1].append(step)
            if after_step(step):
                break
        return UnlearnResult(steps=step)

    monkeypatch.setattr(compare_module, "unlearn", fake_unlearn)
    measured = lambda *a, **k: {"perplexity": ppl[now["lr"]][now["step"]]}  # noqa: E731
    monkeypatch.setattr(compare_module, "perplexity", measured)
    args = CompareArguments(
        layer_sets=((1, 2),), sweep_blocks=4, eval_blocks=4, retain_blocks=4, forget_steps=(2, 4, 8)
    )
    c = Comparison(tiny_model_dir, _probes(model, tok), corpus, args, progress=False)
    config, point, bracketed, diverged = c.forget_set_grid("ga_gd", [1, 2], 14.0, log=lambda _: None)
    # the grid runs, then the refinement between steps 2 and 4, which stops at 3; no 1e-2 run
    assert [(lr, steps[-1]) for lr, steps in runs] == [(1e-4, 8), (1e-3, 4), (1e-3, 3)]
    assert (config.lr, config.steps, point["ppl"], bracketed, diverged) == (1e-3, 3, 14.05, True, [])
    runs.clear()  # cached: a second call trains nothing
    assert c.forget_set_grid("ga_gd", [1, 2], 14.0, log=lambda _: None)[1] == point and not runs


def test_steps_between_grid_steps():
    from memkfac.compare import _steps_between

    assert _steps_between(40, 80, 7) == (45, 50, 55, 60, 65, 70, 75)
    assert _steps_between(0, 3, 7) == (1, 2)  # whole steps only, none repeated
    assert _steps_between(4, 5, 7) == ()
