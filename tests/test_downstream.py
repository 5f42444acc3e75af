"""The generated downstream suite, an offline lm-eval run on a tiny model, and paired-bootstrap retention."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
import torch
import yaml

from memkfac.downstream import (
    MIN_ITEMS,
    DownstreamArguments,
    TaskResult,
    paired_bootstrap_retention,
    retention,
    run_downstream,
    write_task_suite,
)
from memkfac.errors import MemkfacError
from memkfac.tasks import GENERATORS, generate_items


@pytest.mark.parametrize("task", list(GENERATORS))
def test_generated_task_is_seeded_well_formed_and_large_enough(task):
    items = generate_items(task, MIN_ITEMS, seed=0)
    assert len(items) == MIN_ITEMS
    assert items == generate_items(task, MIN_ITEMS, seed=0)
    assert items != generate_items(task, MIN_ITEMS, seed=1)
    n_choices = GENERATORS[task][2]
    assert len({item["query"] for item in items}) == MIN_ITEMS
    for item in items:
        assert len(item["choices"]) == n_choices == len(set(item["choices"]))
        assert 0 <= item["gold"] < n_choices
    # every answer position is used, so always picking one position scores about chance
    assert len({item["gold"] for item in items}) == n_choices


def test_generated_gold_answers_are_right():
    for item in generate_items("arithmetic", MIN_ITEMS, seed=3):
        lines = item["query"].split("\n")
        assert len(lines) == 6  # 5 solved examples, then the question
        for line in lines[:-1]:
            a, op, b, _, c = line.split()
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)
        a, op, b, _ = lines[-1].split()
        assert item["choices"][item["gold"]] == str(int(a) + int(b) if op == "+" else int(a) - int(b))
    for item in generate_items("boolean_expressions", MIN_ITEMS, seed=3):
        expr = re.search(r"Q: (.*) is\n", item["query"]).group(1)
        assert set(expr.split()) <= {"True", "False", "and", "or", "not", "(", ")"}
        assert str(eval(expr)) == item["choices"][item["gold"]]  # only the tokens above, checked
    for item in generate_items("copying", MIN_ITEMS, seed=3):
        assert item["choices"][item["gold"]] == re.search(r"Code: (\S+)\n", item["query"]).group(1)
        assert len({len(c) for c in item["choices"]}) == 1  # equal length: no length bias in log-likelihood
    for item in generate_items("open_book", MIN_ITEMS, seed=3):
        assert item["choices"][item["gold"]] in item["query"]
    positions = {"leftmost": 0, "second from the left": 1, "rightmost": 2}
    for item in generate_items("logical_deduction", MIN_ITEMS, seed=3):
        objects = item["choices"]
        rules = []
        for x, where in re.findall(
            r"The (\w+ \w+) is the (leftmost|second from the left|rightmost)\.", item["query"]
        ):
            rules.append(lambda o, x=x, k=positions[where]: o[k] == x)
        for x, side, y in re.findall(
            r"The (\w+ \w+) is to the (left|right) of the (\w+ \w+)\.", item["query"]
        ):
            rules.append(lambda o, x=x, y=y, s=side: (o.index(x) < o.index(y)) == (s == "left"))
        assert len(rules) == item["query"].count(". ") + item["query"].count(".\n") - 1  # every clue parsed
        solutions = [o for o in itertools.permutations(objects) if all(rule(o) for rule in rules)]
        assert len(solutions) == 1  # the clues fix the order
        asked = re.search(r"Which \w+ is the ([\w ]+)\?", item["query"]).group(1)
        assert solutions[0][positions[asked]] == objects[item["gold"]]
    for item in generate_items("tracking_shuffled_objects", MIN_ITEMS, seed=3):
        holding = dict(re.findall(r"(\w+) has a (\w+) ball", item["query"]))
        for a, b in re.findall(r"(\w+) and (\w+) swap balls", item["query"]):
            holding[a], holding[b] = holding[b], holding[a]
        asked = re.search(r"the game, (\w+) has the$", item["query"]).group(1)
        assert item["choices"][item["gold"]] == f"{holding[asked]} ball"


def test_closed_book_tiers_use_their_own_countries():
    common = " ".join(i["query"] for i in generate_items("facts_common", MIN_ITEMS, 0))
    rare = " ".join(i["query"] for i in generate_items("facts_rare", MIN_ITEMS, 0))
    assert "France" in common and "France" not in rare
    assert "Bhutan" in rare and "Bhutan" not in common
    with pytest.raises(MemkfacError, match="distinct items"):
        generate_items("facts_rare", 10_000, 0)


def test_task_suite_files_are_valid_lm_eval_tasks(tmp_path):
    out = write_task_suite(tmp_path / "suite", n_items=MIN_ITEMS, seed=0)
    manifest = json.loads((out / "suite.json").read_text())
    assert set(manifest["tasks"]) == set(GENERATORS)
    for task in GENERATORS:
        config = yaml.safe_load((out / f"{task}.yaml").read_text())
        assert config["task"] == f"memkfac_{task}"
        assert config["output_type"] == "multiple_choice"
        lines = (out / config["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()
        assert [json.loads(line) for line in lines] == generate_items(task, MIN_ITEMS, 0)
    stamp = (out / "suite.json").stat().st_mtime_ns
    write_task_suite(out, n_items=MIN_ITEMS, seed=0)
    assert (out / "suite.json").stat().st_mtime_ns == stamp  # same suite: left untouched
    with pytest.raises(MemkfacError, match="too few"):
        write_task_suite(tmp_path / "small", n_items=50)


def _choice_logprob(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context)["input_ids"]
    full = tokenizer(context + continuation)["input_ids"]
    assert full[: len(ctx)] == ctx
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([full])).logits[0, :-1], dim=-1)
    targets = torch.tensor(full[len(ctx) :])
    return logprobs[len(ctx) - 1 :].gather(1, targets[:, None]).sum().item()


def test_lm_eval_runs_offline_on_tiny_model(tiny_model_dir, tmp_path):
    from memkfac.tiny import build_tiny_model

    args = DownstreamArguments(tasks=("copying",), n_items=MIN_ITEMS, batch_size=32)
    results = run_downstream(tiny_model_dir, args, task_dir=tmp_path / "tasks", progress=False)
    assert set(results) == {"copying"}
    for r in results.values():
        assert r.metric == "acc"
        assert np.array_equal(r.doc_ids, np.arange(MIN_ITEMS))
        assert set(np.unique(r.item_scores)) <= {0.0, 1.0}
        assert r.score == pytest.approx(r.item_scores.mean())
    # lm-eval's per-item verdicts agree with scoring every choice by hand
    model, tokenizer = build_tiny_model(arch="llama", seed=0)
    for doc_id, item in enumerate(generate_items("copying", MIN_ITEMS, seed=0)[:5]):
        scores = [_choice_logprob(model, tokenizer, item["query"], " " + c) for c in item["choices"]]
        assert results["copying"].item_scores[doc_id] == float(int(np.argmax(scores)) == item["gold"])


@pytest.mark.slow  # indexing lm-eval's whole task registry to look the name up takes a while
def test_unknown_task_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(MemkfacError, match="unknown downstream task"):
        run_downstream(tiny_model_dir, DownstreamArguments(tasks=("no_such_task",)), tmp_path / "t", False)


def test_shots_on_generated_tasks_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(MemkfacError, match="their own examples"):
        run_downstream(
            tiny_model_dir, DownstreamArguments(tasks=("arithmetic",), num_fewshot=5), tmp_path, False
        )


def test_paired_bootstrap_retention_hand_cases():
    base = np.array([1, 1, 0, 0] * 50, dtype=float)
    edited = np.array([1, 0, 0, 0] * 50, dtype=float)
    r, low, high = paired_bootstrap_retention(base, edited, n_boot=4000, seed=0)
    assert r == 0.5
    assert low < 0.5 < high and low > 0.3 and high < 0.7
    assert (r, low, high) == paired_bootstrap_retention(base, edited, n_boot=4000, seed=0)  # seeded
    # identical scores: every paired replicate has ratio exactly 1 (an unpaired bootstrap would spread)
    assert paired_bootstrap_retention(base, base, n_boot=500) == (1.0, 1.0, 1.0)
    # an edit that helps gives retention above 1
    assert paired_bootstrap_retention(edited, base, n_boot=500)[0] == 2.0
    assert all(np.isnan(paired_bootstrap_retention(np.zeros(10), np.ones(10))))
    with pytest.raises(MemkfacError, match="equal-length"):
        paired_bootstrap_retention(base, edited[:-1])


def test_retention_pairs_items_by_document_id():
    ids = np.arange(4)
    base = {"t": TaskResult("t", "math", "acc", 0.5, ids, np.array([1.0, 1.0, 0.0, 0.0]))}
    edited = {"t": TaskResult("t", "math", "acc", 0.25, ids, np.array([1.0, 0.0, 0.0, 0.0]))}
    (row,) = retention(base, edited, n_boot=200)
    assert (row.task, row.retention, row.n_items) == ("t", 0.5, 4)
    edited["t"].doc_ids = ids + 1
    with pytest.raises(MemkfacError, match="different items"):
        retention(base, edited)


@pytest.mark.slow
def test_downstream_command_writes_scores_then_retention(tiny_model_dir, memkfac_home, capsys):
    from memkfac.cli import main
    from memkfac.tables import read_table

    common = ["--tasks", "copying,boolean_expressions", "--n-boot", "200", "--quiet"]
    assert main(["downstream", str(tiny_model_dir), "--variant", "base", *common]) == 0
    assert main(["downstream", str(tiny_model_dir), "--variant", "same", "--base", "base", *common]) == 0
    assert "retention" in capsys.readouterr().out
    rows = {(r["variant"], r["task"]): r for r in read_table("downstream").to_pylist()}
    assert len(rows) == 4 and rows[("base", "copying")]["retention"] is None
    same = rows[("same", "copying")]
    assert same["probe_set"] == "suite-s0-n200" and same["n_items"] == MIN_ITEMS
    if same["base_score"] > 0:  # the same model scores the same items identically: retention exactly 1
        assert (same["retention"], same["retention_ci_low"], same["retention_ci_high"]) == (1.0, 1.0, 1.0)
    # a base that was never scored is a clear error, before any model runs
    assert main(["downstream", str(tiny_model_dir), "--variant", "x", "--base", "nope", *common]) == 1
    assert "run `memkfac downstream` on the base model" in capsys.readouterr().err


def test_command_output_flags_scores_at_chance():
    from memkfac.cli.downstream import format_rows

    row = dict(category="logic", n_items=200, retention=None, base_score=None)
    text = format_rows(
        [{**row, "task": "boolean_expressions", "score": 0.52}, {**row, "task": "copying", "score": 0.9}]
    )
    at_chance, above = text.splitlines()[2:4]
    assert "0.520*" in at_chance and "0.900 " in above and "*" not in above
    assert "retention is noise" in text
