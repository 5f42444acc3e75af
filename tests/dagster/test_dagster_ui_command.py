"""`make ui` / `make mlflow-ui` (``python -m jobs.ui``) read what the main job wrote."""

from __future__ import annotations

import sys

from jobs.ui import WORKSPACE, main, make_command, ui_command


def test_the_dagster_ui_reads_the_main_jobs_instance_and_config(tiny_home):
    argv, env, _ = ui_command("dagster", "127.0.0.1", 3100)
    assert argv == [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(WORKSPACE),
        "-h",
        "127.0.0.1",
        "-p",
        "3100",
    ]
    assert env["MEMKFAC_HOME"] == str(tiny_home.resolve())
    assert env["MEMKFAC_CONFIG"].endswith("configs/tiny.yaml")
    assert env["DAGSTER_HOME"] == str((tiny_home.parent / "dagster").resolve())  # as tiny_env sets it
    assert (tiny_home.parent / "dagster" / "dagster.yaml").is_file()  # the main job's pool limits


def test_the_dagster_home_defaults_to_the_one_the_main_job_uses(tiny_home, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME")
    _, env, _ = ui_command("dagster", "127.0.0.1", 3000)
    assert env["DAGSTER_HOME"] == str(tiny_home.resolve() / "dagster")


def test_the_mlflow_ui_reads_the_pipelines_store(tiny_home, monkeypatch):
    argv, _, reads = ui_command("mlflow", "127.0.0.1", 5100)
    store = f"sqlite:///{tiny_home.resolve() / 'mlflow' / 'mlflow.db'}"
    assert argv[1:4] == ["-m", "mlflow", "ui"] and argv[argv.index("--backend-store-uri") + 1] == store
    assert reads == store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/mlflow.db")
    assert ui_command("mlflow", "127.0.0.1", 5100)[2] == "sqlite:////srv/mlflow.db"


def test_a_bad_config_is_reported_without_starting_a_ui(tiny_home, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {}\nno_such_section: 1\n")
    monkeypatch.setenv("MEMKFAC_CONFIG", str(bad))
    assert main(["mlflow"]) == 2
    assert "error:" in capsys.readouterr().err


def test_the_ui_hint_is_plain_make_on_the_defaults(tmp_path, monkeypatch):
    from resources.settings import Settings

    for name in ("MEMKFAC_HOME", "MEMKFAC_CONFIG", "DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env()
    assert make_command("ui", settings, settings.home / "dagster") == "make ui"


def test_the_ui_hint_passes_on_the_variables_the_main_job_was_given(tiny_home, monkeypatch):
    from resources.settings import Settings

    settings = Settings.from_env()
    dagster_dir = tiny_home.parent / "dagster"  # not $MEMKFAC_HOME/dagster: tiny_env sets its own
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/my store.db")
    command = make_command("mlflow-ui", settings, dagster_dir)
    assert command == (
        f"MEMKFAC_HOME={tiny_home.resolve()} MEMKFAC_CONFIG={settings.config_path} "
        f"DAGSTER_HOME={dagster_dir} MLFLOW_TRACKING_URI='sqlite:////srv/my store.db' make mlflow-ui"
    )
    monkeypatch.setenv("DAGSTER_HOME", str(tiny_home / "dagster"))  # the default, though set
    assert "DAGSTER_HOME" not in make_command("ui", settings, tiny_home / "dagster")


def test_the_main_job_ends_with_the_make_targets_of_the_uis(tiny_home, monkeypatch, capsys):
    from jobs import main as main_job

    monkeypatch.setattr(main_job, "run_pipeline", lambda *a, **k: [])
    assert main_job.main([]) == 0
    out = capsys.readouterr().out
    assert "Where to look" in out
    assert f"MEMKFAC_CONFIG={WORKSPACE.parent / 'configs' / 'tiny.yaml'}" in out
    assert "make ui" in out and "make mlflow-ui" in out
