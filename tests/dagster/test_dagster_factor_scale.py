"""The factor asset at scale, through the real runners: torchrun with 2 processes gives the shards of 1,
a killed run resumes from its completed shards, and the same asset runs as a job of a real one-node
Slurm cluster (scripts/slurm-local.sh), where scancel fails it clearly and a rerun resumes.

On a config derived from configs/tiny.yaml with 16 small shards (batch 2), no canary injection.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml

from tests.dagster.conftest import PROJECT, TINY_CONFIG, tiny_env

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
DELAY_HELPER = Path(__file__).resolve().parent / "shard_delay"  # sitecustomize: a pause after each shard
SLURM_SCRIPT = PROJECT / "scripts" / "slurm-local.sh"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data root with the tiny model, its corpus and the derived config; upstream assets materialized."""
    root = tmp_path_factory.mktemp("scale")
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    raw["models"][MODEL]["inject_canaries"] = False
    raw["factors"] |= {"batch_size": 2, "shard_tokens": 60}  # 2 blocks a shard: 16 shards
    (root / "config.yaml").write_text(yaml.safe_dump(raw))
    tiny_env(root)  # builds the model
    with _environment(root):
        result = _execute(["base_model", "corpus", "subject_model"])
    assert result.success, failure_text(result)
    return root


@contextlib.contextmanager
def _environment(root: Path, **env: str):
    """The data root's variables and ``env``; every other factor setting at its default."""
    base = {
        "MEMKFAC_HOME": str(root / "home"),
        "MEMKFAC_CONFIG": str(root / "config.yaml"),
        "DAGSTER_HOME": str(root / "dagster"),
        "OMP_NUM_THREADS": "1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith(("MEMKFAC_", "MLFLOW_"))]:
            mp.delenv(name)
        for name, value in (base | env).items():
            mp.setenv(name, value)
        yield


def _execute(assets: list[str]):
    """Materialize ``assets`` of the model partition with definitions built from the environment now."""
    from definitions import build_definitions
    from resources.config import load_config
    from resources.settings import Settings

    settings = Settings.from_env()
    defs = build_definitions(load_config(settings.config_path), settings)
    instance = dg.DagsterInstance.local_temp(os.environ["DAGSTER_HOME"])
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey(a) for a in assets],
        partition_key=MODEL,
        raise_on_error=False,
    )


def with_compute(root: Path, name: str, compute: dict) -> str:
    """The derived config with ``compute`` as its compute section, written as ``root/<name>.yaml``."""
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load((root / "config.yaml").read_text()) | {"compute": compute}))
    return str(path)


def factors(root: Path, **env: str):
    """Run kfac_factors (and its check) with ``env``; return the result."""
    with _environment(root, **env):
        return _execute(["kfac_factors"])


def factor_dir(root: Path) -> Path:
    return root / "home" / "factors" / MODEL


def shard_records(root: Path) -> list[dict]:
    import json

    index = json.loads((factor_dir(root) / "index.json").read_text())
    assert index["complete"]
    return index["shards"]


def failure_text(result) -> str:
    return "\n".join(e.step_failure_data.error.to_string() for e in result.all_events if e.is_step_failure)


def inodes(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in factor_dir(root).glob("shard-*.safetensors")}


def when_shards(root: Path, n: int, action, timeout: float = 300) -> threading.Thread:
    """Run ``action()`` in a thread once ``n`` shards are on disk."""

    def watch():
        deadline = time.monotonic() + timeout
        while len(list(factor_dir(root).glob("shard-*.safetensors"))) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def slow_shards(seconds: float) -> str:
    return f"PYTHONPATH={DELAY_HELPER} MEMKFAC_TEST_SHARD_DELAY={seconds}"


@pytest.fixture(scope="module")
def one_process(root):
    """The shards of one local process: the reference every other way of running must reproduce."""
    result = factors(root)
    assert result.success, failure_text(result)
    records = shard_records(root)
    assert len(records) == 16
    return records


def test_two_torchrun_processes_give_the_shards_of_one(root, one_process, monkeypatch):
    import json
    import shutil
    import tempfile
    import types

    from resources import factor_runner

    messages = []

    class KeptMessages(tempfile.TemporaryDirectory):
        def cleanup(self):
            path = Path(self.name) / "messages.jsonl"
            messages.extend(json.loads(line)["method"] for line in path.read_text().splitlines())
            super().cleanup()

    monkeypatch.setattr(factor_runner, "tempfile", types.SimpleNamespace(TemporaryDirectory=KeptMessages))
    shutil.rmtree(factor_dir(root))
    result = factors(root, MEMKFAC_CONFIG=with_compute(root, "two", {"processes": 2}))
    assert result.success, failure_text(result)
    assert shard_records(root) == one_process  # same files, same sha256, same tokens and blocks
    metadata = result.asset_materializations_for_node("kfac_factors")[0].metadata
    assert metadata["processes"].value == 2 and metadata["device"].value == "cpu"
    # one process (rank 0) opened the channel, reported, closed; rank 1 wrote nothing to it
    assert [m for m in messages if m != "log"] == ["opened", "report_asset_materialization", "closed"]


def test_a_killed_process_fails_the_asset_and_a_rerun_resumes(root, one_process):
    """SIGKILL one torchrun worker mid-run (as the OOM killer would): torchrun stops the other, the asset
    fails saying the shards are kept, and rematerializing recomputes only the missing shards."""
    import shutil

    shutil.rmtree(factor_dir(root))

    def kill_rank_1():
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("RANK") == "1" and "pipes_collect_factors" in " ".join(proc.cmdline()):
                    proc.send_signal(signal.SIGKILL)

    watcher = when_shards(root, 4, kill_rank_1)
    result = factors(root, MEMKFAC_FACTOR_PROCESSES="2", MEMKFAC_FACTOR_ENV=slow_shards(1.0))
    watcher.join()
    assert not result.success
    message = failure_text(result)
    assert "stopped by SIGTERM" in message and "rematerialize kfac_factors to resume" in message
    kept = inodes(root)
    assert 4 <= len(kept) < 16

    result = factors(root, MEMKFAC_FACTOR_PROCESSES="2")
    assert result.success, failure_text(result)
    assert shard_records(root) == one_process
    assert {name: inode for name, inode in inodes(root).items() if name in kept} == kept  # not rewritten


def test_more_processes_than_gpus_or_no_cuda_is_refused_naming_the_setting(root):
    result = factors(root, MEMKFAC_FACTOR_DEVICE="cuda", MEMKFAC_FACTOR_PROCESSES="2")
    assert not result.success
    message = failure_text(result)
    import torch

    if torch.cuda.is_available():
        assert "MEMKFAC_FACTOR_PROCESSES is 2 but this node has" in message
    else:
        assert "MEMKFAC_FACTOR_DEVICE is 'cuda' but CUDA is not available here" in message


# --- Slurm ---------------------------------------------------------------------------------------------


def slurm_status() -> tuple[bool, str]:
    if not SLURM_SCRIPT.is_file():
        return False, f"{SLURM_SCRIPT} is missing"
    run = subprocess.run([str(SLURM_SCRIPT), "status"], capture_output=True, text=True)
    return run.returncode == 0, " | ".join((run.stdout + run.stderr).strip().splitlines())


SLURM_JOB = {"partition": "memkfac", "time": "0:10:00"}  # compute.slurm of the one-node cluster


@pytest.fixture(scope="module")
def slurm(root):
    up, status = slurm_status()
    if not up:
        print(f"\nSlurm tests skipped; scripts/slurm-local.sh status says:\n{status}")
        pytest.skip(f"no local Slurm cluster (start one: sudo scripts/slurm-local.sh start): {status}")
    return {"MEMKFAC_ENV": "slurm", "MEMKFAC_CONFIG": with_compute(root, "slurm", {"slurm": SLURM_JOB})}


def job_record(job: str) -> str:
    """What Slurm itself says about ``job``: scontrol while it remembers it, else the completion log."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
    if shown.returncode == 0:
        return shown.stdout
    log = Path("/var/log/slurm/jobcomp.log")
    return next((line for line in log.read_text().splitlines() if line.startswith(f"JobId={job} ")), "")


def test_factors_as_a_slurm_job_match_the_local_run(root, one_process, slurm):
    import shutil

    shutil.rmtree(factor_dir(root))
    job = {"processes": 2, "slurm": SLURM_JOB | {"cpus": 1}}  # the job's resources from the config
    result = factors(root, MEMKFAC_ENV="slurm", MEMKFAC_CONFIG=with_compute(root, "slurm2", job))
    assert result.success, failure_text(result)
    assert shard_records(root) == one_process
    metadata = result.asset_materializations_for_node("kfac_factors")[0].metadata
    job = metadata["slurm_job_id"].value
    record = job_record(job)
    assert "JobState=COMPLETED" in record and "memkfac-factors-tiny-llama" in record, record


def test_scancel_fails_the_asset_clearly_and_a_rerun_resumes(root, one_process, slurm):
    import shutil

    shutil.rmtree(factor_dir(root))
    jobs = []

    def scancel():
        listed = subprocess.run(
            ["squeue", "-h", "-n", "memkfac-factors-tiny-llama", "-o", "%i"], capture_output=True, text=True
        )
        jobs.extend(listed.stdout.split())
        subprocess.run(["scancel", *jobs], check=True)

    watcher = when_shards(root, 3, scancel)
    result = factors(root, **slurm, MEMKFAC_FACTOR_ENV=slow_shards(1.5))
    watcher.join()
    assert not result.success and len(jobs) == 1
    message = failure_text(result)
    assert f"Slurm job {jobs[0]} did not complete: it was cancelled" in message, message
    assert "are kept: remove the cause and rematerialize kfac_factors" in message
    assert "JobState=CANCELLED" in job_record(jobs[0])
    kept = inodes(root)
    assert 3 <= len(kept) < 16

    result = factors(root, **slurm)
    assert result.success, failure_text(result)
    assert shard_records(root) == one_process
    assert {name: inode for name, inode in inodes(root).items() if name in kept} == kept


@pytest.mark.parametrize(
    ("where", "setting"),
    [("config", "compute.slurm.partition"), ("environment", "MEMKFAC_SLURM_PARTITION")],
)
def test_a_partition_that_does_not_exist_is_named_with_the_fix(root, slurm, where, setting):
    if where == "config":
        job = {"slurm": SLURM_JOB | {"partition": "no-such-partition"}}
        result = factors(root, **(slurm | {"MEMKFAC_CONFIG": with_compute(root, "bad-partition", job)}))
    else:  # the variable wins over compute.slurm.partition (memkfac, which exists)
        result = factors(root, **(slurm | {"MEMKFAC_SLURM_PARTITION": "no-such-partition"}))
    assert not result.success
    message = failure_text(result)
    assert f"{setting} is 'no-such-partition', which is not a partition" in message, message
    assert "it has: memkfac" in message
