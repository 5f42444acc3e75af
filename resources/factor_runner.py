"""The seam where K-FAC factor collection leaves the Dagster process (Dagster Pipes).

The asset calls ``factor_runner.collect(context, extras)``; the runner launches
``resources/pipes_collect_factors.py`` (plain torch + memkfac + dagster_pipes, no dagster) and returns
what the script reported. With ``processes`` > 1 it launches it under ``torchrun --standalone
--nproc-per-node N`` (gloo on CPU, NCCL on GPU): data-parallel collection on one node, where only
rank 0 talks to Dagster. ``resources/settings.py`` binds one runner per ``MEMKFAC_ENV``:

- ``SubprocessFactorRunner`` (local): a subprocess here, optionally behind a launcher command prefix;
- ``SlurmFactorRunner`` (slurm): an ``sbatch`` job, waited for with ``scontrol``; cancelled with the run;
- ``K8sFactorRunner`` (k8s): a pod through dagster-k8s's ``PipesK8sClient``.

Local and Slurm exchange the Pipes context and messages through files under the data root (which the
collection shares anyway, since it writes the factors there). Whatever stops a collection part-way
(a failed process, ``scancel``, a time limit), its completed shards stay and the next
materialization resumes from them; the error says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError
from dagster._core.pipes.client import PipesClientCompletedInvocation

from memkfac.errors import MemkfacError

PROJECT_DIR = Path(__file__).resolve().parent.parent
ENTRYPOINT = PROJECT_DIR / "resources" / "pipes_collect_factors.py"
ENTRYPOINT_IN_PROJECT = "resources/pipes_collect_factors.py"  # relative: the image's project directory


def collection_command(python: str, entrypoint: str, processes: int) -> list[str]:
    """The command that runs the entrypoint in ``processes`` data-parallel processes on one node."""
    if processes == 1:
        return [python, entrypoint]
    run = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return [*run, entrypoint]


class FactorRunner(dg.ConfigurableResource):
    """Interface: run the factor-collection entrypoint for one asset partition.

    ``device``, ``dtype``, ``threads`` and ``processes`` reach the entrypoint, which checks them where it
    runs (a GPU node); ``setting_names`` say what its errors call them (``compute.device``, or the
    variable that overrode it, ``MEMKFAC_FACTOR_DEVICE``, ...).
    """

    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    processes: int = 1
    setting_names: dict[str, str] = {}

    def collect(
        self, context: dg.AssetExecutionContext, extras: Mapping[str, object]
    ) -> dg.MaterializeResult:
        raise NotImplementedError("bind a concrete runner such as SubprocessFactorRunner")

    def pipes_extras(self, extras: Mapping[str, object]) -> dict:
        compute = {"device": self.device, "dtype": self.dtype, "threads": self.threads}
        compute |= {"processes": self.processes, "setting_names": self.setting_names}
        return {**extras, "compute": compute}

    def failure(self, problem: str, extras: Mapping[str, object], reported: dict | None) -> MemkfacError:
        """The error of a collection that did not finish: what the collection reported, else ``problem``."""
        said = (reported or {}).get("message", "").strip()  # "module.Type: message", as Python prints it
        if reported is not None and reported.get("name") == "MemkfacError":
            # a bad setting found where the step ran, or a stop the collection explained: it says the fix
            return MemkfacError(said.removeprefix(f"{MemkfacError.__module__}.MemkfacError: "))
        if reported is not None:
            problem += f"; the collection reported {said}"
        out_dir = extras.get("out_dir", "the output directory")
        return MemkfacError(
            problem,
            f"the completed factor shards in {out_dir} are kept: remove the cause and rematerialize "
            "kfac_factors, which resumes from them",
        )


class FileChannel:
    """Pipes context and messages as files in a fresh directory under ``exchange_dir`` (a shared disk)."""

    def __init__(self, exchange_dir: str):
        Path(exchange_dir).mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(dir=exchange_dir)
        self.dir = Path(self._tmp.name)
        self.injector = dg.PipesFileContextInjector(str(self.dir / "context.json"))
        # kept until the directory goes, so that a failure can quote the exception the collection reported
        self.reader = dg.PipesFileMessageReader(str(self.dir / "messages.jsonl"), cleanup_file=False)

    def reported_exception(self) -> dict | None:
        """The exception the collection closed Pipes with (name, message), if any."""
        path = self.dir / "messages.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            with contextlib.suppress(json.JSONDecodeError):
                message = json.loads(line)
                if message.get("method") == "closed" and (message.get("params") or {}).get("exception"):
                    return message["params"]["exception"]
        return None

    @classmethod
    @contextlib.contextmanager
    def open(cls, exchange_dir: str) -> Iterator[FileChannel]:
        channel = cls(exchange_dir)
        try:
            yield channel
        finally:
            channel._tmp.cleanup()


class SubprocessFactorRunner(FactorRunner):
    """Runs the collection command in the project directory, with ``env`` added.

    Without a launcher this is a local subprocess. A launcher runs the same command elsewhere
    (``docker run`` with the project and data mounted at the same paths): ``python`` and the project
    path must exist there.
    """

    python: str
    exchange_dir: str
    launcher: list[str] = []
    env: dict[str, str] = {}

    def collect(
        self, context: dg.AssetExecutionContext, extras: Mapping[str, object]
    ) -> dg.MaterializeResult:
        command = [*self.launcher, *collection_command(self.python, str(ENTRYPOINT), self.processes)]
        with FileChannel.open(self.exchange_dir) as channel:
            client = dg.PipesSubprocessClient(
                env=self.env,
                cwd=str(PROJECT_DIR),
                context_injector=channel.injector,
                message_reader=channel.reader,
            )
            try:
                invocation = client.run(context=context, command=command, extras=self.pipes_extras(extras))
            except DagsterPipesExecutionError as e:
                raise self.failure(
                    f"the factor collection failed ({e})", extras, channel.reported_exception()
                ) from None
            return invocation.get_materialize_result()


# Slurm job states after which a job runs no more (squeue/scontrol JobState).
_ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


class SlurmFactorRunner(FactorRunner):
    """Submits the collection as a Slurm batch job and waits for it; the Dagster step is its client.

    ``sbatch --parsable`` returns the job id at once; ``scontrol show job`` is polled, at growing
    intervals up to ``poll_seconds``, until the job ends. Interrupting the Dagster step cancels the
    job (``scancel``). The job's output goes to ``log_dir/factors-<job id>.out``; the job shows in
    Slurm's records (``scontrol show job``, the job completion log, ``sacct`` where slurmdbd runs).
    """

    python: str
    exchange_dir: str
    log_dir: str
    env: dict[str, str] = {}
    partition: str | None = None
    gpus: int = 0
    cpus: int = 1
    time_limit: str = "4:00:00"
    mem: str | None = None
    extra_args: list[str] = []
    poll_seconds: float = 30.0

    def _name(self, key: str) -> str:
        return self.setting_names.get(key, key)

    def check_partition(self) -> None:
        """Refuse a partition this cluster does not have, naming the setting and the partitions it has."""
        if self.partition is None:
            return
        shown = subprocess.run(
            ["scontrol", "show", "partition", self.partition], capture_output=True, text=True
        )
        said = (shown.stderr or shown.stdout).strip()
        if shown.returncode == 0:
            return
        if "not found" not in said:
            raise MemkfacError(
                f"the Slurm controller does not answer ({said})",
                "check that slurmctld runs (`scontrol ping`); for the one-node cluster of this project: "
                "sudo scripts/slurm-local.sh start",
            )
        listed = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True).stdout.split()
        raise MemkfacError(
            f"{self._name('partition')} is {self.partition!r}, which is not a partition of this Slurm "
            f"cluster ({said}); it has: {', '.join(listed) or 'none'}",
            f"set {self._name('partition')} to one of them, or unset it for the cluster's default partition",
        )

    def sbatch_command(self, context: dg.AssetExecutionContext) -> list[str]:
        command = collection_command(self.python, str(ENTRYPOINT), self.processes)
        name = "memkfac-factors" + (f"-{context.partition_key}" if context.has_partition_key else "")
        options = [
            "--parsable",
            f"--job-name={name}",
            f"--chdir={PROJECT_DIR}",
            f"--output={Path(self.log_dir) / 'factors-%j.out'}",
            "--ntasks=1",
            f"--cpus-per-task={self.cpus}",
            f"--time={self.time_limit}",
        ]
        options += [f"--partition={self.partition}"] if self.partition else []
        options += [f"--gpus-per-node={self.gpus}"] if self.gpus else []
        options += [f"--mem={self.mem}"] if self.mem else []
        return ["sbatch", *options, *self.extra_args, f"--wrap=exec {shlex.join(command)}"]

    def job_state(self, job: str) -> tuple[str, str]:
        """(JobState, Reason) of ``job``; ("GONE", "") once Slurm no longer lists it."""
        shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
        fields = dict(word.split("=", 1) for word in shown.stdout.split() if "=" in word)
        return fields.get("JobState", "GONE"), fields.get("Reason", "")

    def collect(
        self, context: dg.AssetExecutionContext, extras: Mapping[str, object]
    ) -> dg.MaterializeResult:
        self.check_partition()
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        with FileChannel.open(self.exchange_dir) as channel:
            with dg.open_pipes_session(
                context=context,
                extras=self.pipes_extras(extras),
                context_injector=channel.injector,
                message_reader=channel.reader,
            ) as session:
                env = {**os.environ, **self.env, **session.get_bootstrap_env_vars()}
                submitted = subprocess.run(
                    self.sbatch_command(context), capture_output=True, text=True, env=env
                )
                if submitted.returncode != 0:
                    raise MemkfacError(
                        f"sbatch refused the factor job: {submitted.stderr.strip()}",
                        "check compute.slurm (or the MEMKFAC_SLURM_* variables) against `sinfo` (partitions, "
                        "GPUs, time limits)",
                    )
                job = submitted.stdout.strip().split(";")[0]
                log = Path(self.log_dir) / f"factors-{job}.out"
                context.log.info(f"Slurm job {job} submitted; its output: {log}")
                state, reason, wait = "PENDING", "", 0.5
                try:
                    while state not in _ENDED and state != "GONE":
                        time.sleep(wait)
                        wait = min(2 * wait, self.poll_seconds)  # short jobs end soon, long ones poll rarely
                        state, reason = self.job_state(job)
                finally:
                    if state not in _ENDED and state != "GONE":  # the step was interrupted: stop the job
                        subprocess.run(["scancel", job], capture_output=True)
            invocation = PipesClientCompletedInvocation(session)
            reported = channel.reported_exception()
        if state == "COMPLETED" or (state == "GONE" and reported is None and invocation.get_results()):
            return invocation.get_materialize_result()
        tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
        problem = self.job_problem(job, state, reason) + f"; its output ({log}) ends:\n{tail}"
        # what the collection reported explains a failure; a cancelled or timed-out job it only saw end
        raise self.failure(problem, extras, reported if state in ("FAILED", "GONE") else None)

    def job_problem(self, job: str, state: str, reason: str) -> str:
        why = {
            "CANCELLED": "it was cancelled (scancel, or the scheduler)",
            "TIMEOUT": f"it ran past its time limit {self.time_limit} ({self._name('time')})",
            "OUT_OF_MEMORY": f"it ran out of memory (raise {self._name('mem')})",
            "PREEMPTED": "the scheduler preempted it",
            "NODE_FAIL": "its node failed",
        }.get(state, f"it ended {state}" + (f" ({reason})" if reason and reason != "None" else ""))
        return f"Slurm job {job} did not complete: {why}"


class K8sFactorRunner(FactorRunner):
    """A pod through dagster-k8s's ``PipesK8sClient``: the image runs the same command in ``workdir``
    (the project inside the image), with the PersistentVolumeClaim ``volume_claim`` that holds the data
    root mounted at ``data_root``, the same path as here, since the extras name paths under it. GPUs are
    ``resources.limits["nvidia.com/gpu"]``. The Pipes context travels in the pod's environment (every
    torchrun process can read it) and rank 0's messages in its log."""

    image: str
    volume_claim: str
    data_root: str
    namespace: str | None = None
    gpus: int = 0
    cpus: str | None = None
    memory: str | None = None
    workdir: str = "/app"
    env: dict[str, str] = {}

    def pod_arguments(self) -> dict:
        """What ``PipesK8sClient.run`` builds the pod from: image, command, namespace, base pod spec."""
        limits = {"nvidia.com/gpu": str(self.gpus)} if self.gpus else {}
        limits |= {"cpu": self.cpus} if self.cpus else {}
        limits |= {"memory": self.memory} if self.memory else {}
        mounts = [{"name": "memkfac-home", "mount_path": self.data_root}]
        volumes = [{"name": "memkfac-home", "persistent_volume_claim": {"claim_name": self.volume_claim}}]
        if self.processes > 1:  # NCCL and gloo exchange through shared memory; a pod's default is 64 MiB
            mounts.append({"name": "dshm", "mount_path": "/dev/shm"})
            volumes.append({"name": "dshm", "empty_dir": {"medium": "Memory"}})
        container = {
            "name": "memkfac-factors",
            "working_dir": self.workdir,
            "env": [{"name": "MEMKFAC_HOME", "value": self.data_root}],
            "volume_mounts": mounts,
            "resources": {"limits": limits, "requests": dict(limits)},
        }
        return {
            "image": self.image,
            "command": collection_command("python", ENTRYPOINT_IN_PROJECT, self.processes),
            "namespace": self.namespace,
            "base_pod_spec": {"containers": [container], "volumes": volumes, "restart_policy": "Never"},
        }

    def collect(
        self, context: dg.AssetExecutionContext, extras: Mapping[str, object]
    ) -> dg.MaterializeResult:
        from dagster_k8s import PipesK8sClient

        try:
            invocation = PipesK8sClient(env=self.env).run(
                context=context, extras=self.pipes_extras(extras), **self.pod_arguments()
            )
        except Exception as e:  # pod failed, evicted, timed out, or the cluster refused it
            raise self.failure(f"the factor pod failed ({type(e).__name__}: {e})", extras, None) from e
        return invocation.get_materialize_result()
