"""UI smoke test: `dagster dev` started from Python, queried over GraphQL, launching a run that succeeds.

Started with subprocess.Popen in its own session and stopped with SIGINT (a backgrounded `dagster dev &`
from a shell ignores SIGINT and SIGTERM and orphans its children).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from tests.dagster.conftest import PROJECT

pytestmark = pytest.mark.slow

STARTUP_S = 240  # cold start on 2 busy cores: code server, webserver, daemon
RUN_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = json.loads(response.read())
    assert "errors" not in payload, payload
    return payload["data"]


def _wait_until(predicate, timeout_s: float, what: str, proc):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"dagster dev exited with {proc.returncode} while waiting for {what}"
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@contextlib.contextmanager
def serving(
    command: Callable[[int], list[str]], env: dict[str, str]
) -> Iterator[tuple[int, subprocess.Popen]]:
    """``command(port)``, a `dagster dev`, in its own session until its code location answers; yields
    ``(port, process)`` and stops it with SIGINT."""
    port = _free_port()
    proc = subprocess.Popen(
        command(port),
        cwd=PROJECT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_until(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5).status == 200,
            STARTUP_S,
            "the webserver",
            proc,
        )
        _wait_until(
            lambda: _graphql(port, "{ assetNodes { id } }")["assetNodes"],
            STARTUP_S,
            "the code location",
            proc,
        )
        yield port, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
  }
}"""


def test_dagster_dev_serves_the_graph_and_runs_an_asset(tiny_home, tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster")}
    command = [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p"]
    with serving(lambda port: [*command, str(port)], env) as (port, proc):
        nodes = _graphql(port, "{ assetNodes { assetKey { path } } }")["assetNodes"]
        keys = {"/".join(n["assetKey"]["path"]) for n in nodes}
        assert {"kfac_factors", "edited_model", "memorization_eval", "reports/recall_vs_perplexity"} <= keys

        repos = _graphql(
            port,
            "{ repositoriesOrError { ... on RepositoryConnection { nodes { name "
            "sensors { name sensorState { status } } schedules { name scheduleState { status } } } } } }",
        )["repositoriesOrError"]["nodes"]
        sensors = {s["name"]: s["sensorState"]["status"] for r in repos for s in r["sensors"]}
        schedules = {s["name"]: s["scheduleState"]["status"] for r in repos for s in r["schedules"]}
        assert sensors == {
            "memkfac_automation": "RUNNING",
            "input_files_sensor": "RUNNING",
            "registry_watch": "RUNNING",
            "comparison_reports": "RUNNING",
        }
        assert schedules == {"weekly_resurgence": "RUNNING"}

        params = {
            "selector": {
                "repositoryLocationName": "memkfac",
                "repositoryName": "__repository__",
                "jobName": "__ASSET_JOB",
                "assetSelection": [{"path": ["canaries"]}],
            },
            "mode": "default",
        }
        launched = _graphql(port, LAUNCH, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        status_query = "query Status($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
        status = _wait_until(
            lambda: (
                (s := _graphql(port, status_query, {"id": run_id})["runOrError"]["status"])
                in ("SUCCESS", "FAILURE", "CANCELED")
                and s
            ),
            RUN_S,
            "the run",
            proc,
        )
        assert status == "SUCCESS"
        assert (tiny_home / "probes" / "canaries.jsonl").is_file()
