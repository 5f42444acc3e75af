"""The dbt project of the reports, and its manifest.

``@dbt_assets`` needs ``dbt_reports/target/manifest.json`` at import time. ``ensure_manifest`` runs
``dbt parse`` (offline, about 10 s) when the manifest is missing or older than a project file, under
``dagster dev``, pytest, CI, ``dagster definitions validate`` and the main job alike. (Not
``DbtProject.prepare_if_dev``: it only acts under ``dagster dev`` and looks for ``dbt`` on PATH, which
a virtualenv that is not activated lacks.)
"""

from __future__ import annotations

from pathlib import Path

from dagster_dbt import DbtCliResource, DbtProject

from resources.settings import DBT_EXECUTABLE, DBT_PROJECT_DIR

dbt_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)


def ensure_manifest(project: DbtProject = dbt_project) -> Path:
    """Parse the project when its manifest is missing or stale; return the manifest path."""
    manifest = Path(project.manifest_path)
    sources = [
        p
        for p in Path(project.project_dir).rglob("*")
        if p.suffix in (".sql", ".yml") and "target" not in p.parts
    ]
    if not manifest.is_file() or max(p.stat().st_mtime for p in sources) > manifest.stat().st_mtime:
        DbtCliResource(project_dir=project, dbt_executable=DBT_EXECUTABLE).cli(
            ["parse", "--quiet"], target_path=Path("target")
        ).wait()
    return manifest
