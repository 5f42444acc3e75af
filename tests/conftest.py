"""Shared fixtures: tiny real-architecture models built from a config, offline, in milliseconds."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama (hidden 32, MLP 64, 4 layers) with its byte-level tokenizer."""
    from memkfac.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(out, arch="llama", seed=0)
    return out


@pytest.fixture
def memkfac_home(tmp_path, monkeypatch):
    """An empty data root for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("MEMKFAC_HOME", str(home))
    return home
