"""The MLflow model registry as memkfac uses it: one registered model per base model, lineage in tags.

Every edit of base model ``<model>`` is a version of the registered model ``memkfac-<model>``
(``registered_name``): the prefix keeps memkfac's lineages apart from other projects' models in a
shared team registry. Each version carries its lineage as tags (``TAG_*`` below): the base model's
weight fingerprint, the factor index sha256 (curvature edits), the edit's arguments as JSON, the probe
set it removed and that file's sha256, the variant. A fine-tune someone registers (under any name)
says where it came from with ``memkfac.parent = models:/<name>/<version>``; the watch evaluates every
version whose parent chain reaches an edited version.

Aliases are unique per registered model in MLflow: setting ``champion`` on one version takes it off
the version that held it. ``candidate`` marks the newest edit.

Only MlflowClient calls here (no global MLflow state): callers pass a client built for their URI.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CANDIDATE = "candidate"  # alias of the newest version of a lineage
CHAMPION = "champion"  # alias of the version the reports chose (lowest recall within the utility budget)
PREFIX = "memkfac-"

TAG_MODEL = "memkfac.model"  # the base model's key in the pipeline config
TAG_VARIANT = "memkfac.variant"  # <model>__<edit>
TAG_EDIT = "memkfac.edit"  # the edit's name; "finetune" for a user's fine-tune
TAG_BASE_FINGERPRINT = "memkfac.base_fingerprint"  # sha256 of the unedited weights
TAG_FACTOR_INDEX = "memkfac.factor_index_sha256"  # sha256 of the K-FAC factor index; "" without curvature
TAG_EDIT_CONFIG = "memkfac.edit_config"  # the edit's arguments, JSON
TAG_PROBE_SET = "memkfac.probe_set"  # the probe set the edit removed
TAG_PROBE_FINGERPRINT = "memkfac.probe_fingerprint"  # sha256 of that probe set's validated file
TAG_PARENT = "memkfac.parent"  # models:/<name>/<version> the version was fine-tuned from
TAG_ALERT = "memkfac.resurgence_alert"  # set by the watch: "recites k of n removed canaries"
LINEAGE_TAGS = (
    TAG_MODEL,
    TAG_VARIANT,
    TAG_BASE_FINGERPRINT,
    TAG_EDIT_CONFIG,
    TAG_PROBE_SET,
    TAG_PROBE_FINGERPRINT,
)
FINETUNE_EDIT = "finetune"
MAX_PARENT_DEPTH = 20  # fine-tunes of fine-tunes: a longer chain is taken for a cycle


def registered_name(model: str) -> str:
    """The registered model that holds every edit of base model ``model``."""
    return f"{PREFIX}{model}"


def version_uri(name: str, version: str | int) -> str:
    return f"models:/{name}/{version}"


def parse_version_uri(uri: str) -> tuple[str, str] | None:
    """``models:/<name>/<version>`` -> ``(name, version)``; None for anything else (aliases included)."""
    if not uri.startswith("models:/"):
        return None
    name, _, version = uri[len("models:/") :].rpartition("/")
    return (name, version) if name and version.isdigit() else None


def lineage_tags(
    *,
    model: str,
    variant: str,
    edit: str,
    base_fingerprint: str,
    factor_index_sha256: str | None,
    edit_config: Mapping,
    probe_set: str,
    probe_fingerprint: str,
) -> dict[str, str]:
    """The tags of an edited version (``register_version``)."""
    return {
        TAG_MODEL: model,
        TAG_VARIANT: variant,
        TAG_EDIT: edit,
        TAG_BASE_FINGERPRINT: base_fingerprint,
        TAG_FACTOR_INDEX: factor_index_sha256 or "",
        TAG_EDIT_CONFIG: json.dumps(dict(edit_config), sort_keys=True, default=str),
        TAG_PROBE_SET: probe_set,
        TAG_PROBE_FINGERPRINT: probe_fingerprint,
    }


def register_version(
    client,
    name: str,
    source: str,
    run_id: str | None,
    tags: Mapping[str, str],
    aliases: tuple[str, ...] = (CANDIDATE,),
) -> str:
    """Register ``source`` (e.g. ``runs:/<run>/model``) as a new version of ``name`` (created if
    missing) with ``tags``; move ``aliases`` to it. Returns the version number."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    version = str(client.create_model_version(name, source, run_id=run_id, tags=dict(tags)).version)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version)
    return version


def log_transformers_model(client, run_id: str, model_dir: Path) -> None:
    """Log a Hugging Face checkpoint (``save_pretrained`` directory with its tokenizer) in MLflow's
    transformers flavor as the run's ``model`` artifact (what ``register_version`` registers)."""
    import mlflow.transformers
    import torch
    import transformers

    from memkfac.models import load_model

    # The dict form, not a checkpoint path: mlflow 3.17's path form breaks on transformers 5.
    model, tokenizer = load_model(model_dir)
    with tempfile.TemporaryDirectory(prefix="memkfac-mlflow-") as tmp:
        out = Path(tmp) / "model"
        mlflow.transformers.save_model(
            {"model": model, "tokenizer": tokenizer},
            str(out),
            task="text-generation",
            # explicit: inferring them imports optional packages (torchvision) that are not installed
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"transformers=={transformers.__version__}",
            ],
        )
        client.log_artifacts(run_id, str(out), "model")


def latest_version_of_variant(client, name: str, variant: str) -> str | None:
    """The newest version of ``name`` registered for ``variant`` (None if there is none)."""
    versions = [
        int(v.version)
        for v in client.search_model_versions(f"name = '{name}'")
        if v.tags.get(TAG_VARIANT) == variant and TAG_PARENT not in v.tags
    ]
    return str(max(versions)) if versions else None


def set_champion(client, name: str, version: str) -> None:
    """Put ``champion`` on ``version`` of ``name``: MLflow aliases are unique per registered model, so
    the version that held it loses it."""
    client.set_registered_model_alias(name, CHAMPION, version)


def versions_with_alias(client, name: str, alias: str) -> list[str]:
    """The versions of ``name`` that carry ``alias`` (at most one in MLflow; listed to check it)."""
    versions = [
        client.get_model_version(name, v.version) for v in client.search_model_versions(f"name = '{name}'")
    ]
    return sorted((str(v.version) for v in versions if alias in v.aliases), key=int)  # search omits aliases


@dataclass(frozen=True)
class WatchedVersion:
    """A registered version the watch should evaluate: a fine-tune (it has a parent), or a version in
    a memkfac lineage without the lineage tags (reported as such)."""

    name: str
    version: str

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"


def watched_versions(client) -> list[WatchedVersion]:
    """Every version with a ``memkfac.parent`` tag, and every version of a ``memkfac-*`` model that
    has neither a parent nor a variant tag; ordered by name and version."""
    found = []
    for v in _all_versions(client):
        tags = v.tags or {}
        in_lineage = v.name.startswith(PREFIX)
        if TAG_PARENT in tags or (in_lineage and TAG_VARIANT not in tags):
            found.append(WatchedVersion(v.name, str(v.version)))
    return sorted(found, key=lambda w: (w.name, int(w.version)))


def _all_versions(client):
    token = None
    while True:
        page = client.search_model_versions(max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


class LineageProblem(Exception):
    """Why a watched version cannot be evaluated: ``status`` (history column) and a message."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def edited_ancestor(client, name: str, version: str):
    """The edited version that ``name/version`` descends from through ``memkfac.parent`` tags.

    Raises ``LineageProblem``: ``no_lineage`` (no parent tag), ``parent_not_edited`` (the chain ends
    at a version that is not a memkfac edit, or at a parent URI that does not resolve).
    """
    from mlflow.exceptions import MlflowException

    current = client.get_model_version(name, version)
    for depth in range(MAX_PARENT_DEPTH):
        parent_uri = (current.tags or {}).get(TAG_PARENT)
        if parent_uri is None and depth == 0:
            raise LineageProblem(
                "no_lineage",
                f"{version_uri(name, version)} has no {TAG_PARENT} tag: register a fine-tune with "
                f"{TAG_PARENT}=models:/<name>/<version> of the edited version it came from",
            )
        if parent_uri is None:
            raise LineageProblem(
                "parent_not_edited",
                f"the parents of {version_uri(name, version)} end at "
                f"{version_uri(current.name, current.version)}, which is not a memkfac edit",
            )
        parsed = parse_version_uri(parent_uri)
        if parsed is None:
            raise LineageProblem(
                "parent_not_edited",
                f"{TAG_PARENT} of {version_uri(name, version)} is {parent_uri!r}, "
                "not models:/<name>/<version>",
            )
        try:
            current = client.get_model_version(*parsed)
        except MlflowException as e:
            if "RESOURCE_DOES_NOT_EXIST" not in str(e.error_code):
                raise
            raise LineageProblem(
                "parent_not_edited", f"the parent {parent_uri} of {version_uri(name, version)} does not exist"
            ) from e
        if _is_edit(current.tags or {}):
            return current
    raise LineageProblem(
        "parent_not_edited",
        f"no memkfac edit within {MAX_PARENT_DEPTH} parents of {version_uri(name, version)}",
    )


def _is_edit(tags: Mapping[str, str]) -> bool:
    return all(t in tags for t in LINEAGE_TAGS) and tags.get(TAG_EDIT) != FINETUNE_EDIT


def finetune_tags(parent: str) -> dict[str, str]:
    """The tags of a user's fine-tune of ``parent`` (a ``models:/<name>/<version>`` URI)."""
    if parse_version_uri(parent) is None:
        from memkfac.errors import MemkfacError

        raise MemkfacError(
            f"parent {parent!r} is not a registered version URI",
            "give models:/<name>/<version>, e.g. models:/memkfac-tiny-llama/3",
        )
    return {TAG_PARENT: parent, TAG_EDIT: FINETUNE_EDIT}


def serves_artifacts(tracking_uri: str) -> bool:
    """A tracking server keeps artifacts where it was told to (``--artifacts-destination``)."""
    return tracking_uri.startswith(("http://", "https://"))


def experiment_id_for(client, experiment: str, tracking_uri: str, artifact_root: str | None = None) -> str:
    """The id of ``experiment``, created if missing. With a local store (sqlite, a directory) its
    artifacts go to ``artifact_root`` (default: ``artifacts/`` beside the sqlite file), never to the
    working directory; a tracking server chooses its own."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if not serves_artifacts(tracking_uri):
        if not artifact_root and tracking_uri.startswith("sqlite:///"):
            artifact_root = str(Path(tracking_uri[len("sqlite:///") :]).parent / "artifacts")
        location = Path(artifact_root).resolve().as_uri() if artifact_root else None
    return client.create_experiment(experiment, artifact_location=location)


def register_finetune(
    tracking_uri: str, model_dir: Path, parent: str, name: str | None = None, experiment: str = "memkfac"
) -> str:
    """Log ``model_dir`` (a fine-tune of the version ``parent``) in the transformers flavor and register
    it as a new version of ``name`` (default: the parent's registered model) tagged for the watch.
    Returns its ``models:/<name>/<version>`` URI. No alias moves: ``candidate`` stays on the newest edit."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from memkfac.errors import MemkfacError

    tags = finetune_tags(parent)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:  # an unknown parent fails before any upload
        client.get_model_version(*parse_version_uri(parent))
    except MlflowException as e:
        raise MemkfacError(
            f"the parent {parent} is not in the registry at {tracking_uri}: {e.message}",
            "give the URI of a registered edit (the MLflow UI lists them under memkfac-<model>)",
        ) from e
    name = name or parse_version_uri(parent)[0]
    experiment_id = experiment_id_for(client, experiment, tracking_uri)
    run_id = client.create_run(
        experiment_id, run_name=f"finetune of {parent}", tags={"kind": "finetune"}
    ).info.run_id
    try:
        log_transformers_model(client, run_id, Path(model_dir))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return version_uri(
        name, register_version(client, name, f"runs:/{run_id}/model", run_id, tags, aliases=())
    )
