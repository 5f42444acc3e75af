"""Canary generator: deterministic, two disjoint sets with the same template mix, valid probe sets."""

from __future__ import annotations

from collections import Counter

from memkfac.canaries import CanaryArguments, generate_canaries
from memkfac.probes import load_probe_set, write_probe_set


def test_deterministic_and_seed_dependent():
    a = generate_canaries(CanaryArguments(n_trained=40, n_control=30, seed=3))
    b = generate_canaries(CanaryArguments(n_trained=40, n_control=30, seed=3))
    c = generate_canaries(CanaryArguments(n_trained=40, n_control=30, seed=4))
    assert a == b
    assert a[0][0].suffix != c[0][0].suffix


def test_sets_are_disjoint_balanced_and_split_in_halves():
    trained, control = generate_canaries()
    assert (len(trained), len(control)) == (128, 128)
    assert {p.kind for p in trained} == {"memorized"} and {p.kind for p in control} == {"control"}
    cues = [p.prefix for p in trained + control]
    assert len(set(cues)) == len(cues)
    assert not {p.suffix for p in trained} & {p.suffix for p in control}
    assert Counter(p.split for p in trained) == {"sweep": 64, "holdout": 64}
    mix_t, mix_c = Counter(p.source for p in trained), Counter(p.source for p in control)
    assert (
        set(mix_t)
        == set(mix_c)
        == {"canary:customer", "canary:identity", "canary:api_key", "canary:password"}
    )
    assert all(abs(mix_t[k] - mix_c[k]) <= 12 for k in mix_t)
    record = next(p for p in trained if p.source == "canary:customer")
    assert (
        record.prefix.startswith("Customer record for ")
        and " email " in record.suffix
        and "; account " in record.suffix
    )


def test_canaries_write_and_load_as_a_probe_set(tmp_path):
    trained, control = generate_canaries(CanaryArguments(n_trained=8, n_control=8))
    path = write_probe_set(trained + control, tmp_path / "canaries.jsonl")
    assert load_probe_set(path) == trained + control
