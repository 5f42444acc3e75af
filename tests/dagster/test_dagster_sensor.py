"""The input-files sensor: runless observations of changed inputs, new probe sets as partitions."""

from __future__ import annotations

import json
import os

import dagster as dg

from resources.store import ArtifactStore

PROBE = {
    "id": "p1",
    "prefix": "Customer record for Ann Lee:",
    "suffix": " email ann@example.org",
    "kind": "memorized",
}


def _tick(defs, instance, store, cursor):
    sensor = defs.resolve_sensor_def("input_files_sensor")
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"store": store}, definitions=defs
    )
    result = sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def _events(result) -> dict:
    return {
        (e.asset_key.to_user_string(), e.partition): e.tags["dagster/data_version"]
        for e in result.asset_events
    }


def test_sensor_observes_changes_and_registers_probe_sets(tiny_defs, tiny_home):
    defs, _, _ = tiny_defs
    instance = dg.DagsterInstance.ephemeral()
    store = ArtifactStore(home=str(tiny_home))

    first = _tick(defs, instance, store, None)
    assert set(_events(first)) == {("model_files", "tiny-llama"), ("corpus_files", None)}
    assert first.dynamic_partitions_requests == []

    store.probes_dir.mkdir(parents=True)
    (store.probes_dir / "pii.jsonl").write_text(json.dumps(PROBE) + "\n")
    (store.probes_dir / "bad name.jsonl").write_text(json.dumps(PROBE) + "\n")  # not a valid partition key
    second = _tick(defs, instance, store, first.cursor)
    assert set(_events(second)) == {("probe_set_files", "pii")}
    assert [list(r.partition_keys) for r in second.dynamic_partitions_requests] == [["pii"]]
    assert instance.get_dynamic_partitions("probe_set") == ["pii"]

    third = _tick(defs, instance, store, second.cursor)
    assert third.asset_events == [] and third.dynamic_partitions_requests == []

    weights = tiny_home / "inputs" / "tiny-llama" / "model.safetensors"
    old = _events(first)[("model_files", "tiny-llama")]
    mtime = weights.stat().st_mtime_ns
    weights.write_bytes(
        weights.read_bytes()[:-4] + b"\x00\x00\x00\x40"
    )  # last float (a norm weight, 1.0) -> 2.0
    os.utime(weights, ns=(mtime + 10**9, mtime + 10**9))  # a later write (filesystems may round mtimes)
    fourth = _tick(defs, instance, store, third.cursor)
    (version,) = [v for (k, _), v in _events(fourth).items() if k == "model_files"]
    assert version != old
    assert set(_events(fourth)) == {("model_files", "tiny-llama")}
