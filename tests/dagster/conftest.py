"""Fixtures of the Dagster tests: a tiny pipeline (configs/tiny.yaml) in a fresh data root and instance."""

from __future__ import annotations

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


@pytest.fixture
def tiny_home(tmp_path, monkeypatch):
    """A data root holding the tiny model that configs/tiny.yaml names; env points at both."""
    from memkfac.tiny import build_tiny_model

    home = tmp_path / "home"
    build_tiny_model(home / "inputs" / "tiny-llama", arch="llama", seed=0)
    monkeypatch.setenv("MEMKFAC_HOME", str(home))
    monkeypatch.setenv("MEMKFAC_CONFIG", str(TINY_CONFIG))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "dagster").mkdir()
    return home


@pytest.fixture
def tiny_defs(tiny_home):
    """``(defs, config, settings)`` of the tiny pipeline."""
    from definitions import build_definitions
    from resources.config import load_config
    from resources.settings import Settings

    settings = Settings.from_env()
    config = load_config(settings.config_path)
    return build_definitions(config, settings), config, settings
