"""Fixtures of the Dagster tests: a tiny pipeline (configs/tiny.yaml) in a fresh data root and instance."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

PROJECT = Path(__file__).resolve().parents[2]
TINY_CONFIG = PROJECT / "configs" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """The machine is shared: one intra-op thread here and in subprocesses (Pipes, dbt)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_env(root: Path) -> dict[str, str]:
    """Build the tiny model that configs/tiny.yaml names into ``root/home``; the env pointing at it."""
    from memkfac.tiny import build_tiny_model

    home = root / "home"
    build_tiny_model(home / "inputs" / "tiny-llama", arch="llama", seed=0)
    dagster_home = root / "dagster"
    dagster_home.mkdir()
    return {"MEMKFAC_HOME": str(home), "MEMKFAC_CONFIG": str(TINY_CONFIG), "DAGSTER_HOME": str(dagster_home)}


@contextlib.contextmanager
def tiny_pipeline(root: Path, **env: str) -> Iterator[dict]:
    """The tiny pipeline in ``root`` for module-scoped fixtures: its env (plus ``env``), one thread, a
    fresh Dagster instance. Yields ``defs``, ``config``, ``settings``, ``instance``, ``store``, ``home``."""
    import dagster as dg

    from definitions import build_definitions
    from resources.config import load_config
    from resources.settings import Settings
    from resources.store import ArtifactStore

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in {**tiny_env(root), "OMP_NUM_THREADS": "1", **env}.items():
                mp.setenv(name, value)
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            settings = Settings.from_env()
            config = load_config(settings.config_path)
            yield {
                "defs": build_definitions(config, settings),
                "config": config,
                "settings": settings,
                "instance": dg.DagsterInstance.local_temp(str(root / "dagster")),
                "store": ArtifactStore(home=str(root / "home")),
                "home": root / "home",
            }
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def tiny_home(tmp_path, monkeypatch):
    """A data root holding the tiny model that configs/tiny.yaml names; env points at both."""
    for name, value in tiny_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


@pytest.fixture
def tiny_defs(tiny_home):
    """``(defs, config, settings)`` of the tiny pipeline."""
    from definitions import build_definitions
    from resources.config import load_config
    from resources.settings import Settings

    settings = Settings.from_env()
    config = load_config(settings.config_path)
    return build_definitions(config, settings), config, settings
