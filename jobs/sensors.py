"""Sensors: the automation sensor, the input-files sensor and the registry watch, RUNNING on a fresh
instance.

``registry_watch`` lists the MLflow registry every ``watch.interval_seconds`` and requests one
``watch_history`` run per registered version downstream of an edit that it has not seen before (the
cursor holds the versions seen); an unreachable registry skips the tick and says why.

``comparison_reports`` records each new or changed ``memkfac compare`` report under
``MEMKFAC_HOME/reports`` as a runless materialization of ``comparison_report`` (figure and tables in
its metadata), so the UI shows what a comparison run outside the graph found.

``input_files_sensor`` checks the base-model directories, the corpus, the probe directory and the
user's canary file (``canaries.file``, when set) on every tick. It re-hashes a file only when its size
or mtime changed (the cursor remembers both), and reports each new content version as a runless
observation of the matching source asset; a new probe-set file also becomes a ``probe_set``
partition. Declarative automation (``memkfac_automation``) then requests exactly the downstream
partitions whose inputs changed: an edited canary file rematerializes the canaries, the subject
model and everything after it.
"""

import json
from pathlib import Path

import dagster as dg

from assets.comparisons import COMPARISON_ASSET, report_files, report_materialization
from assets.partitions import Partitions
from assets.sources import CANARY_FILE, corpus_version, model_version, probe_file_versions
from assets.watch import REGISTRY_VERSIONS, WATCH_ASSET, partition_key
from memkfac.fingerprint import WEIGHT_SUFFIXES, sha256_file
from resources.config import PipelineConfig
from resources.mlflow_registry import MlflowRegistry
from resources.store import ArtifactStore


def _stat_signature(paths: list[Path]) -> str:
    """Cheap change detector: names, sizes and mtimes."""
    parts = []
    for p in sorted(paths):
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def input_versions(config: PipelineConfig, store: ArtifactStore, cursor: dict) -> tuple[dict, dict]:
    """Current content versions of every input, reusing the cursor's hash where the stat is unchanged.

    Returns ``(versions, new_cursor)``; versions maps ``"model/<m>"``, ``"corpus"``, ``"canary_file"``
    (when configured and present) and ``"probe_set/<p>"`` to a data version.
    """
    watched: dict[str, tuple[list[Path], object]] = {}
    for name, m in config.models.items():
        path = Path(m.source)
        files = (
            [p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
            if path.is_dir()
            else []
        )
        watched[f"model/{name}"] = (files, lambda s=m.source: model_version(s))
    corpus = Path(config.corpus.source)
    watched["corpus"] = (
        [corpus]
        if corpus.is_file()
        else [p for p in corpus.rglob("*") if p.is_file()]
        if corpus.is_dir()
        else [],
        lambda: corpus_version(config.corpus.source),
    )
    canaries = config.canary_file
    if canaries is not None:  # a deleted file has no version: the canaries asset reports the error
        watched[CANARY_FILE] = (
            [canaries] if canaries.is_file() else [],
            lambda: sha256_file(canaries) if canaries.is_file() else None,
        )
    versions, new_cursor = {}, {}
    for key, (files, version_of) in watched.items():
        sig = _stat_signature(files)
        old = cursor.get(key)
        version = old[1] if old and old[0] == sig else version_of()
        if version is not None:
            versions[key] = version
            new_cursor[key] = [sig, version]
    probe_files = sorted(store.probes_dir.glob("*.jsonl")) if store.probes_dir.is_dir() else []
    sig = _stat_signature(probe_files)
    old = cursor.get("probe_sets")
    probe_versions = old[1] if old and old[0] == sig else probe_file_versions(store)
    new_cursor["probe_sets"] = [sig, probe_versions]
    versions.update({f"probe_set/{p}": v for p, v in probe_versions.items()})
    return versions, new_cursor


SENSOR_NAME = "input_files_sensor"


def build_input_files_sensor(config: PipelineConfig, parts: Partitions) -> dg.SensorDefinition:
    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Hashes base models, the corpus, probe-set files and the user's canary file; reports "
        "changes as observations and registers new probe sets as partitions.",
    )
    def input_files_sensor(context: dg.SensorEvaluationContext, store: ArtifactStore) -> dg.SensorResult:
        cursor = json.loads(context.cursor) if context.cursor else {}
        previous = cursor.pop("versions", {})
        versions, new_cursor = input_versions(config, store, cursor)
        known = set(context.instance.get_dynamic_partitions(parts.probe_set.name))
        new_sets = sorted(
            k.split("/", 1)[1] for k in versions if k.startswith("probe_set/") and k[10:] not in known
        )
        events = []
        for key, version in versions.items():
            if previous.get(key) == version:
                continue
            kind, _, partition = key.partition("/")
            asset = {
                "model": "model_files",
                "corpus": "corpus_files",
                "probe_set": "probe_set_files",
                CANARY_FILE: CANARY_FILE,
            }[kind]
            events.append(
                dg.AssetObservation(
                    asset_key=asset, partition=partition or None, tags={"dagster/data_version": version}
                )
            )
        new_cursor["versions"] = versions
        return dg.SensorResult(
            asset_events=events,
            dynamic_partitions_requests=[parts.probe_set.build_add_request(new_sets)] if new_sets else [],
            cursor=json.dumps(new_cursor, sort_keys=True),
        )

    return input_files_sensor


WATCH_SENSOR_NAME = "registry_watch"


def build_registry_watch_sensor(config: PipelineConfig) -> dg.SensorDefinition:
    @dg.sensor(
        name=WATCH_SENSOR_NAME,
        minimum_interval_seconds=config.watch.interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        asset_selection=[WATCH_ASSET],
        description="Finds registered versions fine-tuned from an edit (memkfac.parent tag) and versions "
        "of a memkfac lineage without lineage tags; requests one watch_history evaluation of each, once.",
    )
    def registry_watch(context: dg.SensorEvaluationContext, mlflow: MlflowRegistry):
        from memkfac.registry import watched_versions
        from memkfac.watch import is_registry_error

        try:
            found = [partition_key(w.name, w.version) for w in watched_versions(mlflow.client())]
        except Exception as e:
            if not is_registry_error(e):
                raise
            context.log.warning(f"registry watch: {mlflow.tracking_uri} unreachable: {e}")
            return dg.SkipReason(f"the MLflow registry at {mlflow.tracking_uri} is unreachable: {e}")
        seen = set(json.loads(context.cursor)) if context.cursor else set()
        new = [key for key in found if key not in seen]
        if not new:
            return dg.SkipReason(f"no new version among {len(found)} watched")
        return dg.SensorResult(
            run_requests=[dg.RunRequest(partition_key=key, run_key=key) for key in new],
            dynamic_partitions_requests=[REGISTRY_VERSIONS.build_add_request(new)],
            cursor=json.dumps(sorted(seen | set(new))),
        )

    return registry_watch


COMPARISON_SENSOR_NAME = "comparison_reports"


def build_comparison_sensor() -> dg.SensorDefinition:
    @dg.sensor(
        name=COMPARISON_SENSOR_NAME,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Records each new or changed `memkfac compare` report under MEMKFAC_HOME/reports as a "
        f"materialization of {COMPARISON_ASSET}, with its figure and tables.",
    )
    def comparison_reports(context: dg.SensorEvaluationContext, store: ArtifactStore) -> dg.SensorResult:
        seen = json.loads(context.cursor) if context.cursor else {}
        # a report's version changes when the report, its rows or its figure is rewritten
        found = {str(r): _stat_signature(files) for r, files in report_files(store.root / "reports").items()}
        events = [report_materialization(Path(p)) for p, version in found.items() if seen.get(p) != version]
        return dg.SensorResult(asset_events=events, cursor=json.dumps(found, sort_keys=True))

    return comparison_reports


def build_automation_sensor() -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        "memkfac_automation",
        target=dg.AssetSelection.all(include_sources=True),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description="Evaluates every automation condition (input changes, code versions, weekly cron).",
    )
