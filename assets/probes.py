"""Probe sets: each probe-set file, validated, copied to where every step that reads it reads it.

``probes/<name>.jsonl`` is the inbox (a user drops a file there; the canaries asset writes
``canaries.jsonl``); ``ArtifactStore.validated_probes(name)`` is the validated copy.
"""

from collections import Counter

import dagster as dg

from assets.automation import BUILD
from assets.partitions import Partitions
from resources.config import PipelineConfig
from resources.store import ArtifactStore

GROUP = "probes"


def build(config: PipelineConfig, parts: Partitions) -> list:
    @dg.asset(
        partitions_def=parts.probe_set,
        # every partition reads its file; the canaries' file is written by the canaries asset
        deps=[dg.AssetDep("probe_set_files"), dg.AssetDep("canaries")],
        group_name=GROUP,
        kinds={"json"},
        code_version="probe-sets-v1",
        automation_condition=BUILD,
        description="A probe set validated whole (every error with its line) and frozen for evaluation.",
    )
    def probe_sets(context: dg.AssetExecutionContext, store: ArtifactStore) -> dg.MaterializeResult:
        from memkfac.fingerprint import sha256_file
        from memkfac.probes import load_probe_set, write_probe_set

        name = context.partition_key
        probes = load_probe_set(store.probe_file(name))
        out = write_probe_set(probes, store.validated_probes(name), overwrite=True)
        by_kind = Counter(p.kind for p in probes)
        by_split = Counter(f"{p.kind}/{p.split}" for p in probes)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": len(probes),
                "path": dg.MetadataValue.path(str(out)),
                "by_kind": dg.MetadataValue.json(dict(by_kind)),
                "by_kind_split": dg.MetadataValue.json(dict(by_split)),
            },
            data_version=dg.DataVersion(sha256_file(out)),
        )

    return [probe_sets]
