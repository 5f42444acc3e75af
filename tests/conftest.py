"""Shared fixtures: tiny real-architecture models built from a config, offline, in milliseconds."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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


@contextlib.contextmanager
def postgres_database(prefix: str, what: str) -> Iterator[str]:
    """A fresh database ``<prefix>_<random>`` on the PostgreSQL at 127.0.0.1:5432 (user postgres, trust
    auth), dropped afterwards; yields its SQLAlchemy URL. Skips ``what``, saying why, when PostgreSQL
    is unreachable."""
    import uuid

    try:
        import psycopg2

        admin = psycopg2.connect(
            host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3
        )
    except Exception as e:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is unreachable, {what} is skipped: {e}")
    admin.autocommit = True
    database = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f"create database {database}")
    try:
        # +psycopg2: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3 (see pyproject.toml)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f"drop database if exists {database} with (force)")
        admin.close()


@pytest.fixture(scope="session")
def postgres_mlflow_server(tmp_path_factory):
    """``mlflow server`` on a fresh PostgreSQL database, artifacts served from a temporary directory:
    the team setup of scripts/team-mlflow-server.sh. Yields its URI; skips without PostgreSQL."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with contextlib.ExitStack() as stack:
        database = stack.enter_context(postgres_database("watch_test", "the MLflow server variant"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        root = tmp_path_factory.mktemp("mlflow-server")
        log = stack.enter_context(open(root / "server.log", "w"))
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "mlflow", "server", "--backend-store-uri", database),
                *("--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"),
                *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        stack.callback(server.wait, timeout=60)
        stack.callback(server.terminate)
        uri = f"http://127.0.0.1:{port}"
        while True:  # up when /health answers; a server that exits fails the tests with its log
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield uri


@pytest.fixture(params=["sqlite", "postgres-server"])
def registry_uri(request, tmp_path):
    """An MLflow tracking/registry URI: the embedded sqlite default, then the team server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlflow.db'}"
    return request.getfixturevalue("postgres_mlflow_server")
