"""Observable source assets: the inputs the pipeline does not build, versioned by content hash.

- ``model_files[model]``: a local model directory's weight files (``model_fingerprint``); a builtin
  model is pinned by the sha256 of its GGUF; a hub id by the id itself (``hub:<id>``: a new upstream
  revision is not noticed; pin one by pointing at a downloaded directory instead).
- ``corpus_files``: a local corpus file or directory (sha256); ``stdlib`` is versioned by the Python
  version whose standard library it reads; a ``hf:`` dataset by its spec.
- ``probe_set_files[probe_set]``: ``MEMKFAC_HOME/probes/<probe_set>.jsonl``.
- ``canary_file``: the user's canary probe set named by ``canaries.file`` (sha256); only defined when
  that key is set (generated canaries have no input file: their settings are the code version).

``jobs/sensors.py`` reports these versions as runless observations (no run is launched); the
observe functions here let the UI's "Observe" button do the same.
"""

import platform
from pathlib import Path

import dagster as dg

from assets.partitions import Partitions
from memkfac.fingerprint import model_fingerprint, sha256_dir, sha256_file
from memkfac.models import BUILTIN_MODELS, is_hub_id
from resources.config import PipelineConfig
from resources.store import ArtifactStore

GROUP = "sources"
CANARY_FILE = "canary_file"  # the source asset of canaries.file, an input of the canaries asset


def model_version(source: str) -> str | None:
    """Content version of a model spec, or None when there is nothing local to hash."""
    if source in BUILTIN_MODELS:
        return BUILTIN_MODELS[source].sha256
    path = Path(source)
    if path.is_dir():
        return model_fingerprint(path)
    if is_hub_id(source):
        return f"hub:{source}"
    return None


def corpus_version(source: str) -> str:
    """Content version of a corpus spec."""
    path = Path(source)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return sha256_dir(path)
    if source == "stdlib":
        return f"stdlib-python-{platform.python_version()}"
    return f"spec:{source}"


def probe_file_versions(store: ArtifactStore) -> dict[str, str]:
    """``{probe_set: sha256}`` of every ``*.jsonl`` in the probe directory with a valid name."""
    from memkfac.errors import MemkfacError
    from memkfac.paths import safe_name

    versions = {}
    for path in sorted(store.probes_dir.glob("*.jsonl")) if store.probes_dir.is_dir() else []:
        try:
            versions[safe_name(path.stem, "probe-set name")] = sha256_file(path)
        except MemkfacError:
            continue  # the sensor logs invalid names; they never become partitions
    return versions


def build(config: PipelineConfig, parts: Partitions) -> list:
    @dg.observable_source_asset(
        name="model_files",
        partitions_def=parts.model,
        group_name=GROUP,
        description="Weight files of each configured base model (data version: their sha256).",
    )
    def model_files():
        versions = {m: v for m, c in config.models.items() if (v := model_version(c.source)) is not None}
        return dg.DataVersionsByPartition(versions)

    @dg.observable_source_asset(
        name="corpus_files",
        group_name=GROUP,
        description="The general text the corpus splits are cut from (data version: its content hash).",
    )
    def corpus_files():
        return dg.DataVersion(corpus_version(config.corpus.source))

    @dg.observable_source_asset(
        name="probe_set_files",
        partitions_def=parts.probe_set,
        group_name=GROUP,
        description="Probe-set JSONL files under MEMKFAC_HOME/probes (data version: sha256 of each file).",
    )
    def probe_set_files(context, store: ArtifactStore):
        known = set(context.instance.get_dynamic_partitions(parts.probe_set.name))
        return dg.DataVersionsByPartition({p: v for p, v in probe_file_versions(store).items() if p in known})

    sources = [model_files, corpus_files, probe_set_files]
    path = config.canary_file
    if path is not None:

        @dg.observable_source_asset(
            name=CANARY_FILE,
            group_name=GROUP,
            description=f"The user's canary probe set {path} (canaries.file; data version: its sha256).",
        )
        def canary_file():
            return dg.DataVersion(sha256_file(path))

        sources.append(canary_file)
    return sources
