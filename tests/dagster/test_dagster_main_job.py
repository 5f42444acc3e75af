"""The main job's robustness: a failed step, then Ctrl-C, then a rerun that completes the graph.

One tiny home goes through three invocations of ``jobs.main.run_pipeline``:
1. factor collection raises: the job finishes the rest, skips what reads the factors, names the step;
2. factor collection gets SIGINT (Ctrl-C): the job stops at once;
3. nothing injected: automation alone would request nothing (it handled those partitions in its
   saved cursor), yet the rerun completes the graph and recomputes nothing that had succeeded.
The factor runner runs behind a harmless launcher prefix throughout. The other tests are fast: the
exit statuses of ``main`` and the clean-up of runs a killed main job left behind.
"""

import os
import signal
import socket
import time

import dagster as dg
import pytest

from jobs.main import PipelineInterrupted
from tests.dagster.conftest import tiny_pipeline


def _raise(self, context, extras):
    raise RuntimeError("factor collection failed")


def _ctrl_c(self, context, extras):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)  # Dagster turns the signal into an interrupt of this step well before


def _materializations(instance, key: str) -> int:
    return len(instance.fetch_materializations(dg.AssetKey.from_user_string(key), limit=100).records)


@pytest.fixture(scope="module")
def invocations(tmp_path_factory):
    from jobs.main import run_pipeline
    from resources.factor_runner import SubprocessFactorRunner

    root = tmp_path_factory.mktemp("main_job")
    with tiny_pipeline(root, MEMKFAC_FACTOR_LAUNCHER="env MEMKFAC_LAUNCHED=1") as p:
        defs, instance, store = p["defs"], p["instance"], p["store"]
        out = {"instance": instance, "config": p["config"], "logs": ([], [], [])}

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(SubprocessFactorRunner, "collect", _raise)
            out["failed"] = run_pipeline(defs, instance, store, log=out["logs"][0].append)
        out["runs_after_failure"] = instance.get_runs()

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(SubprocessFactorRunner, "collect", _ctrl_c)
            with pytest.raises(PipelineInterrupted) as interrupted:
                run_pipeline(defs, instance, store, log=out["logs"][1].append)
        out["interrupted"] = interrupted.value
        out["runs_after_interrupt"] = instance.get_runs()

        out["resumed"] = run_pipeline(defs, instance, store, log=out["logs"][2].append)
        yield out


@pytest.mark.slow
def test_failed_step_is_named_and_what_reads_it_skipped(invocations):
    assert invocations["failed"] == ["kfac_factors[tiny-llama]"], invocations["logs"][0]
    assert "  kfac_eigenbasis[tiny-llama]: skipped, an input failed" in invocations["logs"][0]
    selected = {k.to_user_string() for r in invocations["runs_after_failure"] for k in r.asset_selection}
    assert "kfac_factors" in selected and "subject_model" in selected
    assert "kfac_eigenbasis" not in selected


@pytest.mark.slow
def test_interrupt_stops_at_once(invocations):
    assert invocations["interrupted"].step == "kfac_factors[tiny-llama]", invocations["logs"][1]
    started = invocations["runs_after_interrupt"][: -len(invocations["runs_after_failure"])]
    assert len(started) == 1, invocations["logs"][1]  # the interrupted run; no later level started
    assert started[0].asset_selection == {dg.AssetKey("kfac_factors")}
    assert started[0].status == dg.DagsterRunStatus.FAILURE


@pytest.mark.slow
def test_rerun_completes_the_graph(invocations):
    instance, config = invocations["instance"], invocations["config"]
    assert invocations["resumed"] == [], invocations["logs"][2]
    assert instance.get_materialized_partitions(dg.AssetKey("edited_model")) == set(config.variants)
    assert _materializations(instance, "reports/recall_vs_perplexity") == 1


@pytest.mark.slow
def test_rerun_recomputes_nothing_that_had_succeeded(invocations):
    instance = invocations["instance"]
    for key in ("canaries", "base_model", "corpus", "subject_model", "downstream_base", "kfac_factors"):
        assert _materializations(instance, key) == 1, (key, invocations["logs"][2])


def test_main_exit_status_names_failed_steps(tiny_home, monkeypatch, capsys):
    from jobs import main

    monkeypatch.setattr(main, "run_pipeline", lambda *a, **k: ["kfac_factors[tiny-llama]"])
    assert main.main([]) == 1
    err = capsys.readouterr().err
    assert "FAILED after" in err and "kfac_factors[tiny-llama]" in err


@pytest.mark.parametrize(
    ("interrupt", "where"),
    [
        (KeyboardInterrupt(), "between steps"),
        (PipelineInterrupted("kfac_factors[tiny-llama]"), "kfac_factors[tiny-llama]"),
    ],
)
def test_main_exit_status_130_on_interrupt(tiny_home, monkeypatch, capsys, interrupt, where):
    from jobs import main

    def interrupted(*args, **kwargs):
        raise interrupt

    monkeypatch.setattr(main, "run_pipeline", interrupted)
    assert main.main([]) == 130
    err = capsys.readouterr().err
    assert f"Interrupted ({where})" in err and "rerun the same command to resume" in err


def test_runs_of_a_killed_main_job_are_failed_and_their_pool_slots_freed(tmp_path):
    import subprocess

    from jobs.main import PID_TAG, fail_abandoned_runs

    gone = subprocess.Popen(["true"])
    gone.wait()
    instance = dg.DagsterInstance.local_temp(str(tmp_path))
    storage = instance.event_log_storage
    storage.set_concurrency_slots("compute", 1)
    runs = {
        "killed": {PID_TAG: f"{socket.gethostname()}:{gone.pid}"},
        "running": {PID_TAG: f"{socket.gethostname()}:{os.getpid()}"},
        "other host": {PID_TAG: f"not-{socket.gethostname()}:{gone.pid}"},
        "not ours": {},
    }
    for name, tags in runs.items():
        instance.add_run(
            dg.DagsterRun(job_name="__ASSET_JOB", run_id=name, status=dg.DagsterRunStatus.STARTED, tags=tags)
        )
    storage.claim_concurrency_slot("compute", "killed", "kfac_factors")
    assert storage.get_concurrency_info("compute").active_slot_count == 1

    log: list[str] = []
    fail_abandoned_runs(instance, log.append)

    status = {name: instance.get_run_by_id(name).status for name in runs}
    assert status == {
        "killed": dg.DagsterRunStatus.FAILURE,
        "running": dg.DagsterRunStatus.STARTED,
        "other host": dg.DagsterRunStatus.STARTED,
        "not ours": dg.DagsterRunStatus.STARTED,
    }
    assert storage.get_concurrency_info("compute").active_slot_count == 0
    assert len(log) == 1 and "killed main job" in log[0]
