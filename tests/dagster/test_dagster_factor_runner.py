"""The factor runner as settings bind it: a launcher prefix and extra environment reach the Pipes child."""

import dagster as dg
import pytest

from memkfac.errors import MemkfacError
from resources.factor_runner import FactorRunner
from resources.settings import Settings, build_resources

CHILD = """
import os
from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as pipes:
    pipes.report_asset_materialization(metadata={
        "launched": os.environ.get("MEMKFAC_LAUNCHED", "no"),
        "extra": os.environ.get("MEMKFAC_EXTRA", "no"),
        "tokens": pipes.get_extra("tokens"),
    })
"""


@dg.asset
def collected(context: dg.AssetExecutionContext, factor_runner: FactorRunner) -> dg.MaterializeResult:
    return factor_runner.collect(context, extras={"tokens": 7})


def test_launcher_and_env_reach_the_child(tiny_home, tmp_path, monkeypatch):
    from resources import factor_runner
    from resources.config import load_config

    child = tmp_path / "child.py"
    child.write_text(CHILD)
    monkeypatch.setattr(factor_runner, "ENTRYPOINT", child)
    monkeypatch.setenv("MEMKFAC_FACTOR_LAUNCHER", "env MEMKFAC_LAUNCHED=1")
    monkeypatch.setenv("MEMKFAC_FACTOR_ENV", "'MEMKFAC_EXTRA=two words'")
    settings = Settings.from_env()
    runner = build_resources(settings, load_config(settings.config_path))["factor_runner"]

    result = dg.materialize([collected], resources={"factor_runner": runner})

    metadata = result.asset_materializations_for_node("collected")[0].metadata
    assert metadata["launched"].value == "1"
    assert metadata["extra"].value == "two words"
    assert metadata["tokens"].value == 7
    assert list((tiny_home / "pipes").iterdir()) == []  # the exchange files are removed


def test_no_launcher_by_default(monkeypatch):
    monkeypatch.delenv("MEMKFAC_FACTOR_LAUNCHER", raising=False)
    monkeypatch.delenv("MEMKFAC_FACTOR_ENV", raising=False)
    settings = Settings.from_env()
    assert settings.factor_launcher == () and settings.factor_env == ()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MEMKFAC_FACTOR_LAUNCHER", "no-such-launcher-xyz --gpus=1", "not an executable on PATH"),
        ("MEMKFAC_FACTOR_LAUNCHER", "srun 'unclosed", "not shell-quoted correctly"),
        ("MEMKFAC_FACTOR_ENV", "CUDA_VISIBLE_DEVICES", "not NAME=VALUE"),
        ("MEMKFAC_FACTOR_ENV", "1BAD=x", "not NAME=VALUE"),
    ],
)
def test_bad_launch_settings_name_the_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(MemkfacError, match=f"{variable}.*{message}"):
        Settings.from_env()
