"""Probe sets: the native and official formats, every validation error with its line, atomic writes."""

from __future__ import annotations

import json

import pytest

from memkfac.probes import (
    Probe,
    ProbeSetError,
    load_probe_set,
    probes_from_dataset,
    split_text,
    write_probe_set,
)


def _write(path, lines: list) -> object:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
    return path


def test_native_format_and_text_split(tmp_path):
    path = _write(
        tmp_path / "p.jsonl",
        [
            {
                "id": "a",
                "prefix": "Customer record for Ann Lee:",
                "suffix": " ann@example.org",
                "split": "sweep",
            },
            {"id": 7, "text": "one two three four five six seven eight nine ten", "kind": "quote"},
            {"id": "t", "prefix": "", "suffix": "", "prefix_ids": [1, 2, 3], "suffix_ids": [4, 5]},
        ],
    )
    a, b, t = load_probe_set(path)
    assert (a.kind, a.split, a.suffix) == ("memorized", "sweep", " ann@example.org")
    assert (b.id, b.prefix, b.suffix, b.kind, b.split) == (
        "7",
        "one two",
        " three four five six seven eight nine ten",
        "quote",
        "holdout",
    )
    assert t.suffix_ids == [4, 5]


def test_split_text_rule():
    assert split_text("a b  c\n", suffix_words=1) == ("a b", "  c")
    with pytest.raises(ValueError, match="needs more than 3"):
        split_text("a b c", suffix_words=3)


def test_official_formats_load(tmp_path):
    dolma = _write(
        tmp_path / "olmo_7b_dolma_dedup_val.jsonl",
        [
            {
                "prefix_len": 2,
                "suffix_len": 2,
                "prefix_text": "Save for",
                "suffix_text": " later now",
                "prefix_ids": [10, 11],
                "suffix_ids": [12, 13],
                "doc_index": 3,
                "start": 325,
                "model": "allenai/OLMo-2-1124-7B",
                "corpus": "dolmo",
                "dolma_name": "v1_6-sample",
                "seed": 17,
            },
            {"prefix_ids": [1, 2], "suffix_ids": [3, 4], "doc_index": 4, "start": 0},
        ],
    )
    d, ids_only = load_probe_set(dolma)
    assert (d.id, d.prefix, d.suffix, d.source, d.prefix_ids) == (
        "3-325",
        "Save for",
        " later now",
        "v1_6-sample",
        [10, 11],
    )
    assert (ids_only.id, ids_only.suffix_ids) == ("4-0", [3, 4])
    quotes = _write(
        tmp_path / "olmolarge8_bfloat16.jsonl",
        [
            {
                "id": 76001,
                "author": "Mark Twain",
                "topic": "life",
                "full_quote": "The secret of getting ahead is getting started.",
                "prefix": "The secret of getting ahead",
                "target_suffix": " is getting started.",
                "generated_suffix": " is getting started.",
            }
        ],
    )
    (q,) = load_probe_set(quotes)
    assert (q.id, q.kind, q.source, q.prefix + q.suffix) == (
        "76001",
        "quote",
        "Mark Twain",
        "The secret of getting ahead is getting started.",
    )


def test_every_error_is_listed_with_its_line(tmp_path):
    ok = {"id": "ok", "prefix": "p", "suffix": " a long enough suffix"}
    path = _write(
        tmp_path / "bad.jsonl",
        [
            ok,  # 1
            b"{not json\n",  # 2
            {"prefix": "p", "suffix": " suffix text"},  # 3 missing id
            {"id": "ok", "prefix": "p", "suffix": " another suffix"},  # 4 duplicate
            {"id": "e", "prefix": "p", "suffix": "   "},  # 5 empty suffix
            {"id": "s", "prefix": "p", "suffix": " ab"},  # 6 too short
            b'{"id": "u", "prefix": "\xff", "suffix": " x"}\n',  # 7 invalid UTF-8
            {"id": "x", "prefix": "p", "suffix": " fine suffix", "split": "train"},  # 8 unknown split
            {"id": "m", "prefix": "p"},  # 9 missing suffix
            {"id": "long", "prefix": "p" * 300, "suffix": " fine suffix"},  # 10 over-long line
            {"id": "i", "prefix": "p", "suffix": "", "prefix_ids": [1], "suffix_ids": [2]},  # 11 one token
            [1, 2],  # 12 not an object
            {"id": "w", "text": "too few words"},  # 13 text too short
        ],
    )
    with pytest.raises(ProbeSetError) as info:
        load_probe_set(path, max_line_bytes=200)
    err = info.value
    where = [w for w, _ in err.errors]
    assert where == [f"line {n}" for n in range(2, 14)]
    text = str(err)
    for expected in (
        "line 2: bad JSON",
        "line 3: missing field 'id'",
        "line 4: duplicate id 'ok' (first at line 1)",
        "line 5: empty suffix",
        "line 6: suffix ' ab' is too short",
        "line 7: invalid UTF-8",
        "line 8: unknown split 'train'",
        "line 9: missing field 'suffix'",
        "line 10: line is",
        "line 11: suffix_ids has 1 token(s)",
        "line 12: expected a JSON object",
        "line 13: 'text' is too short",
        "12 error(s); the probe set was not loaded",
        "fix:",
    ):
        assert expected in text, expected


def test_empty_and_missing_files(tmp_path):
    from memkfac.errors import MemkfacError

    with pytest.raises(ProbeSetError, match="no probes"):
        load_probe_set(_write(tmp_path / "empty.jsonl", []))
    with pytest.raises(MemkfacError, match="does not exist"):
        load_probe_set(tmp_path / "nope.jsonl")


def test_write_round_trips_and_refuses_invalid_sets(tmp_path):
    probes = [
        Probe("a", "Name: Ann", " ann@example.org", kind="memorized", split="sweep", source="canaries"),
        Probe("b", "", "", prefix_ids=[1, 2], suffix_ids=[3, 4], kind="control"),
    ]
    path = write_probe_set(probes, tmp_path / "out.jsonl")
    assert load_probe_set(path) == probes
    with pytest.raises(ProbeSetError, match="duplicate id 'a'"):
        write_probe_set([probes[0], probes[0]], tmp_path / "dup.jsonl")
    assert not (tmp_path / "dup.jsonl").exists()


def test_probes_from_a_dataset_with_a_column_mapping(tmp_path):
    path = _write(
        tmp_path / "qa.jsonl",
        [
            {"qid": "q1", "question": "Capital of France?", "answer": " Paris, the city"},
            {"qid": "q2", "question": "Capital of Peru?", "answer": " ab"},
        ],
    )
    with pytest.raises(ProbeSetError, match="row 1: suffix ' ab' is too short"):
        probes_from_dataset(str(path), {"id": "qid", "prefix": "question", "suffix": "answer"})
    _write(
        path,
        [{"id": "shadowed", "qid": "q1", "question": "Capital of France?", "answer": " Paris, the city"}],
    )
    (p,) = probes_from_dataset(str(path), {"id": "qid", "prefix": "question", "suffix": "answer"})
    assert (p.id, p.prefix, p.suffix) == ("q1", "Capital of France?", " Paris, the city")


def test_cli_validate_lists_every_error_and_exits_2(tmp_path, capsys):
    from memkfac.cli import main

    good = _write(
        tmp_path / "good.jsonl", [{"id": "a", "prefix": "p", "suffix": " long enough", "kind": "control"}]
    )
    assert main(["probes", "validate", str(good)]) == 0
    assert "1 probes, valid" in capsys.readouterr().out
    bad = _write(
        tmp_path / "bad.jsonl", [{"id": "a", "suffix": " x y z"}, {"id": "a", "prefix": "p", "suffix": ""}]
    )
    assert main(["probes", "validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "line 1: missing field 'prefix'" in err and "line 2: empty suffix" in err


def test_cli_canaries_writes_a_valid_probe_set(tmp_path, capsys):
    from memkfac.cli import main

    out = tmp_path / "c.jsonl"
    assert main(["canaries", "--n-trained", "6", "--n-control", "4", "--out", str(out)]) == 0
    probes = load_probe_set(out)
    assert [p.kind for p in probes].count("memorized") == 6 and len(probes) == 10
