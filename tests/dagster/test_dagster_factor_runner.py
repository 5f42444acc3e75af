"""The factor runner as settings bind it: launcher prefix, environment and compute settings reach the Pipes
child; bad settings are refused naming the variable; the Kubernetes pod is rendered and validated."""

import os
import re

import dagster as dg
import pytest
import yaml

from memkfac.errors import MemkfacError
from resources.factor_runner import FactorRunner, collection_command
from resources.settings import Settings, build_resources
from tests.dagster.conftest import TINY_CONFIG

CHILD = """
import os
from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as pipes:
    pipes.report_asset_materialization(metadata={
        "launched": os.environ.get("MEMKFAC_LAUNCHED", "no"),
        "extra": os.environ.get("MEMKFAC_EXTRA", "no"),
        "tokens": pipes.get_extra("tokens"),
        "compute": {"raw_value": pipes.get_extra("compute"), "type": "json"},
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
    monkeypatch.setenv("MEMKFAC_FACTOR_DEVICE", "cpu")
    settings = Settings.from_env()
    runner = build_resources(settings, load_config(settings.config_path))["factor_runner"]

    result = dg.materialize([collected], resources={"factor_runner": runner})

    metadata = result.asset_materializations_for_node("collected")[0].metadata
    assert metadata["launched"].value == "1"
    assert metadata["extra"].value == "two words"
    assert metadata["tokens"].value == 7
    compute = metadata["compute"].data
    assert {k: compute[k] for k in ("device", "dtype", "threads", "processes")} == {
        "device": "cpu",
        "dtype": "float32",
        "threads": None,
        "processes": 1,
    }
    # what errors call each setting: the variable that set it, else its config key
    assert {
        k: compute["setting_names"][k] for k in ("device", "dtype", "processes", "partition", "time")
    } == {
        "device": "MEMKFAC_FACTOR_DEVICE",
        "dtype": "compute.dtype",
        "processes": "compute.processes",
        "partition": "compute.slurm.partition",
        "time": "compute.slurm.time",
    }
    assert list((tiny_home / "pipes").iterdir()) == []  # the exchange files are removed


def test_defaults_are_one_local_cpu_process(monkeypatch):
    for name in ("MEMKFAC_ENV", "MEMKFAC_FACTOR_LAUNCHER", "MEMKFAC_FACTOR_ENV", "MEMKFAC_FACTOR_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MEMKFAC_FACTOR_PROCESSES", raising=False)
    factor = Settings.from_env().factor
    assert (factor.launcher, factor.env, factor.device, factor.processes) == ((), (), "cpu", 1)


def test_collection_command_uses_torchrun_for_several_processes():
    assert collection_command("py", "entry.py", 1) == ["py", "entry.py"]
    assert collection_command("py", "entry.py", 4) == [
        "py",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        "entry.py",
    ]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MEMKFAC_FACTOR_LAUNCHER", "no-such-launcher-xyz --gpus=1", "not an executable on PATH"),
        ("MEMKFAC_FACTOR_LAUNCHER", "srun 'unclosed", "not shell-quoted correctly"),
        ("MEMKFAC_FACTOR_ENV", "CUDA_VISIBLE_DEVICES", "not NAME=VALUE"),
        ("MEMKFAC_FACTOR_ENV", "1BAD=x", "not NAME=VALUE"),
        ("MEMKFAC_FACTOR_PROCESSES", "0", "not a whole number >= 1"),
        ("MEMKFAC_FACTOR_PROCESSES", "two", "not a whole number >= 1"),
        ("MEMKFAC_FACTOR_DEVICE", "gpu", "not a device memkfac runs on"),
        ("MEMKFAC_ENV", "cloud", "has no resource binding"),
        ("MEMKFAC_ENV", "k8s", "needs compute.k8s.image and compute.k8s.volume_claim"),
    ],
)
def test_bad_launch_settings_name_the_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(MemkfacError, match=f"{variable}.*{message}"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"MEMKFAC_FACTOR_DEVICE": "cuda:1", "MEMKFAC_FACTOR_PROCESSES": "2"},
            "MEMKFAC_FACTOR_DEVICE is 'cuda:1' with MEMKFAC_FACTOR_PROCESSES=2: each process takes its",
        ),
        (
            {"MEMKFAC_FACTOR_DEVICE": "cuda", "MEMKFAC_FACTOR_PROCESSES": "2", "MEMKFAC_K8S_GPUS": "1"}
            | {"MEMKFAC_ENV": "k8s", "MEMKFAC_K8S_IMAGE": "i", "MEMKFAC_K8S_VOLUME": "v"},
            "MEMKFAC_K8S_GPUS=1 GPUs for MEMKFAC_FACTOR_PROCESSES=2 processes",
        ),
        (
            {"MEMKFAC_ENV": "k8s", "MEMKFAC_K8S_IMAGE": "i", "MEMKFAC_K8S_VOLUME": "v"}
            | {"MEMKFAC_FACTOR_LAUNCHER": "env"},
            "MEMKFAC_FACTOR_LAUNCHER is set with MEMKFAC_ENV=k8s",
        ),
    ],
)
def test_inconsistent_compute_settings_are_refused(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(MemkfacError, match=re.escape(message)):
        Settings.from_env()


def test_kubernetes_pod_is_rendered_and_valid(tiny_home, monkeypatch):
    """The pod PipesK8sClient would create, captured where it is sent to the (absent) cluster: image,
    torchrun command, GPU limits, the data root's volume, the Pipes context; it round-trips through the
    kubernetes client's V1Pod model (its schema)."""
    import json

    import kubernetes
    from dagster_k8s.client import DagsterKubernetesClient
    from dagster_pipes import decode_param

    from resources.config import load_config

    created = []

    class NoCluster:
        def create_namespaced_pod(self, namespace, body):
            created.append((namespace, body))
            raise kubernetes.client.ApiException(status=503, reason="no cluster in this test")

    production_client = DagsterKubernetesClient.production_client
    monkeypatch.setattr(
        DagsterKubernetesClient,
        "production_client",
        staticmethod(lambda: production_client(core_api_override=NoCluster(), batch_api_override=object())),
    )
    monkeypatch.setattr(kubernetes.config, "load_kube_config", lambda *a, **k: None)
    pod = {"image": "registry.example.com/memkfac:1", "volume_claim": "memkfac-data", "namespace": "research"}
    compute = {"device": "cuda", "processes": 2, "k8s": pod | {"memory": "64Gi"}}  # the pod from the config
    config = tiny_home / "k8s.yaml"
    config.write_text(yaml.safe_dump(yaml.safe_load(TINY_CONFIG.read_text()) | {"compute": compute}))
    for name in [n for n in os.environ if n.startswith(("MEMKFAC_FACTOR_", "MEMKFAC_K8S_"))]:
        monkeypatch.delenv(name)
    env = {"MEMKFAC_ENV": "k8s", "MEMKFAC_CONFIG": str(config), "MEMKFAC_FACTOR_ENV": "NCCL_DEBUG=INFO"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    runner = build_resources(settings, load_config(settings.config_path))["factor_runner"]

    result = dg.materialize([collected], resources={"factor_runner": runner}, raise_on_error=False)

    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "the factor pod failed" in failure.step_failure_data.error.to_string()
    (namespace, pod) = created[0]
    assert namespace == "research" and isinstance(pod, kubernetes.client.V1Pod)
    api = kubernetes.client.ApiClient()
    as_json = api.sanitize_for_serialization(pod)

    class Response:
        data = json.dumps(as_json)

    assert api.deserialize(Response(), "V1Pod") == pod  # a valid V1Pod, field for field
    spec = as_json["spec"]
    (container,) = spec["containers"]
    assert container["image"] == "registry.example.com/memkfac:1" and container["workingDir"] == "/app"
    assert container["command"] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "resources/pipes_collect_factors.py",
    ]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2", "memory": "64Gi"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"memkfac-home": str(tiny_home), "dshm": "/dev/shm"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["memkfac-home"]["persistentVolumeClaim"] == {"claimName": "memkfac-data"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    assert spec["restartPolicy"] == "Never"
    variables = {e["name"]: e["value"] for e in container["env"]}
    assert variables["MEMKFAC_HOME"] == str(tiny_home) and variables["NCCL_DEBUG"] == "INFO"
    context = decode_param(variables["DAGSTER_PIPES_CONTEXT"])["data"]
    assert context["extras"]["tokens"] == 7
    assert context["extras"]["compute"]["device"] == "cuda" and context["extras"]["compute"]["processes"] == 2
