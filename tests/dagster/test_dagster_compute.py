"""The ``compute`` section: a device this machine lacks fails at the step's start naming the config key,
and the environment's overrides of the factor step win over the config, as resources/settings.py says.
That each model-running step gets its placement (per-step overrides included) is checked on the whole
tiny pipeline in test_dagster_pipeline.py, whose run carries a ``compute`` section."""

from __future__ import annotations

import pytest
import torch
import yaml

from memkfac.errors import MemkfacError
from resources.config import COMPUTE_STEPS, parse_config
from resources.settings import FactorCompute
from tests.dagster.conftest import TINY_CONFIG

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


def _compute(**section):
    return parse_config({"models": {"m": {"source": "x"}}, "compute": section}).compute


def test_each_step_takes_compute_unless_its_steps_entry_says_otherwise():
    compute = _compute(
        device="cpu",
        dtype="bfloat16",
        threads=2,
        steps={"memorization_eval": {"dtype": "float32", "threads": 1}},
    )
    for step in COMPUTE_STEPS:
        placement = compute.of(step)
        if step == "memorization_eval":
            assert (placement.device, placement.dtype, placement.threads) == ("cpu", "float32", 1)
            assert placement.keys == {
                "device": "compute.device",
                "dtype": "compute.steps.memorization_eval.dtype",
                "threads": "compute.steps.memorization_eval.threads",
            }
        else:
            assert (placement.device, placement.dtype, placement.threads) == ("cpu", "bfloat16", 2), step
            assert placement.keys["device"] == "compute.device"


def test_left_out_compute_is_one_cpu_process_in_float32():
    placement = _compute().of("factors")
    assert (placement.device, placement.dtype, placement.threads) == ("cpu", "float32", None)


@NO_CUDA
@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"device": "cuda"}, "compute.device"),
        ({"steps": {"utility_eval": {"device": "cuda:0"}}}, "compute.steps.utility_eval.device"),
    ],
)
def test_an_absent_device_fails_at_the_start_naming_the_key(section, key):
    with pytest.raises(MemkfacError) as error:
        _compute(**section).of("utility_eval").start()
    assert f"{key} is 'cuda" in error.value.problem and "CUDA is not available here" in error.value.problem
    assert f"set {key} to cpu" in error.value.fix


def test_start_sets_the_threads_and_a_later_step_without_them_gets_the_process_count():
    compute = _compute(steps={"bands": {"threads": 2}})
    before = torch.get_num_threads()
    compute.of("factors").start()  # the first start remembers the process's count
    compute.of("bands").start()
    assert torch.get_num_threads() == 2
    compute.of("resurgence").start()
    assert torch.get_num_threads() == before  # the conftest fixture restores the count anyway


# --- in the Dagster steps ---------------------------------------------------------------------------


def _defs_with(tiny_home, tmp_path, monkeypatch, compute: dict):
    """The tiny pipeline's definitions with ``compute`` as its compute section."""
    from definitions import build_definitions
    from resources.config import load_config
    from resources.settings import Settings

    raw = yaml.safe_load(TINY_CONFIG.read_text()) | {"compute": compute}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MEMKFAC_CONFIG", str(path))
    config = load_config(path)
    return build_definitions(config, Settings.from_env(config))


def _failure(defs, asset: str, partition: str) -> str:
    import dagster as dg

    from jobs import dagster_adapter

    result = dagster_adapter.asset_job(defs).execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        asset_selection=[dg.AssetKey(asset)],
        partition_key=partition,
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = result.get_step_failure_events()
    error = failure.step_failure_data.error.cause  # what the asset raised, under Dagster's step error
    return f"{error.cls_name}: {error.message}"


@NO_CUDA
@pytest.mark.parametrize(
    ("compute", "asset", "partition", "key"),
    [
        ({"device": "cuda"}, "edited_model", "tiny-llama__base", "compute.device"),
        (
            {"steps": {"eigenbasis": {"device": "cuda"}}},
            "kfac_eigenbasis",
            "tiny-llama",
            "compute.steps.eigenbasis.device",
        ),
        # checked where the collection runs (the Pipes process), before the model loads
        (
            {"steps": {"factors": {"device": "cuda"}}},
            "kfac_factors",
            "tiny-llama",
            "compute.steps.factors.device",
        ),
    ],
)
def test_cuda_in_the_config_fails_the_step_naming_the_key(
    tiny_home, tmp_path, monkeypatch, compute, asset, partition, key
):
    monkeypatch.delenv("MEMKFAC_FACTOR_DEVICE", raising=False)
    message = _failure(_defs_with(tiny_home, tmp_path, monkeypatch, compute), asset, partition)
    assert f"{key} is 'cuda' but CUDA is not available here" in message, message
    assert f"set {key} to cpu" in message, message
    assert message.startswith("MemkfacError: "), message  # ours, raised before torch touches a device


# --- the environment's overrides of the factor step ----------------------------------------------


def test_factor_settings_come_from_the_config(monkeypatch):
    for name in ("MEMKFAC_FACTOR_DEVICE", "MEMKFAC_FACTOR_PROCESSES", "MEMKFAC_SLURM_PARTITION"):
        monkeypatch.delenv(name, raising=False)
    compute = _compute(
        processes=2,
        threads=3,
        steps={"factors": {"dtype": "bfloat16"}},
        slurm={"partition": "gpu", "time": "1:00:00", "extra_args": ["--qos=low"]},
        k8s={"image": "img:1", "volume_claim": "home", "cpus": "8"},
    )
    factor = FactorCompute.resolve("local", compute)
    assert (factor.device, factor.dtype, factor.threads, factor.processes) == ("cpu", "bfloat16", 3, 2)
    assert (factor.slurm.partition, factor.slurm.time, factor.slurm.extra_args) == (
        "gpu",
        "1:00:00",
        ("--qos=low",),
    )
    assert factor.slurm.cpus == 6 and factor.slurm.gpus == 0  # threads x processes; no GPU on cpu
    assert (factor.k8s.image, factor.k8s.volume_claim, factor.k8s.cpus) == ("img:1", "home", "8")
    names = factor.setting_names
    assert (names["device"], names["processes"], names["partition"]) == (
        "compute.device",
        "compute.processes",
        "compute.slurm.partition",
    )
    assert names["dtype"] == "compute.steps.factors.dtype"


def test_a_set_variable_wins_over_its_config_key_and_errors_name_it(monkeypatch):
    compute = _compute(device="cpu", processes=2, slurm={"partition": "gpu"})
    monkeypatch.setenv("MEMKFAC_FACTOR_PROCESSES", "3")
    monkeypatch.setenv("MEMKFAC_SLURM_PARTITION", "debug")
    factor = FactorCompute.resolve("local", compute)
    assert (factor.processes, factor.slurm.partition) == (3, "debug")
    assert factor.setting_names["processes"] == "MEMKFAC_FACTOR_PROCESSES"
    assert factor.setting_names["partition"] == "MEMKFAC_SLURM_PARTITION"
    assert factor.setting_names["device"] == "compute.device"  # not overridden
    monkeypatch.setenv("MEMKFAC_FACTOR_DEVICE", "cuda:1")
    with pytest.raises(
        MemkfacError, match="MEMKFAC_FACTOR_DEVICE is 'cuda:1' with MEMKFAC_FACTOR_PROCESSES=3"
    ):
        FactorCompute.resolve("local", compute)


def test_k8s_without_image_or_volume_names_the_config_keys(monkeypatch):
    for name in ("MEMKFAC_K8S_IMAGE", "MEMKFAC_K8S_VOLUME"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(MemkfacError, match="needs compute.k8s.image and compute.k8s.volume_claim"):
        FactorCompute.resolve("k8s", _compute())
    monkeypatch.setenv("MEMKFAC_K8S_IMAGE", "img:2")
    with pytest.raises(
        MemkfacError, match="needs compute.k8s.volume_claim$|needs compute.k8s.volume_claim\\b"
    ):
        FactorCompute.resolve("k8s", _compute())
    assert FactorCompute.resolve("k8s", _compute(k8s={"volume_claim": "home"})).k8s.image == "img:2"
