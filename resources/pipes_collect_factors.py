"""Factor collection as an external process under Pipes, in one process or data-parallel under torchrun:

    python resources/pipes_collect_factors.py
    python -m torch.distributed.run --standalone --nproc-per-node N resources/pipes_collect_factors.py

Imports only ``dagster_pipes`` and ``memkfac`` (torch, transformers), so a GPU worker image needs no
Dagster. Extras (JSON): ``model_dir``, ``corpus_dir``, ``out_dir``, ``factor_args`` (the
``FactorArguments`` fields; ``layers`` may be a spec such as ``"14-29"``, resolved on the model) and
``compute`` (``device``, ``dtype`` the model runs in, ``threads``, ``processes`` and ``setting_names``, what
errors call those settings: the config keys, ``compute.device`` ..., or the variables that overrode them).

Only rank 0 opens the Pipes channel: it checks the device and the process count here, where the work
runs, before any process joins the group (a bad setting fails the step with the setting's name), and
reports one materialization whose data version is the sha256 of the factor index. The other ranks read
the same context read-only and write no Pipes messages. Under torchrun the backend is NCCL on cuda
(process r on cuda:r) and gloo otherwise; ``memkfac.factors.collect_factors`` splits the shards among
the ranks.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from dagster_pipes import PipesDefaultContextLoader, PipesEnvVarParamsLoader, open_dagster_pipes


def collect(extras: dict, device, dtype: str, log) -> Path:
    """Collect the factors the extras describe on ``device``; return the path of ``index.json``."""
    from memkfac.corpora import corpus_fingerprint, load_split
    from memkfac.factors import FactorArguments, collect_factors
    from memkfac.fingerprint import model_fingerprint
    from memkfac.models import load_model

    model_dir, corpus_dir = Path(extras["model_dir"]), Path(extras["corpus_dir"])
    args = FactorArguments(**extras["factor_args"] | {"model_dtype": dtype})
    model, _ = load_model(model_dir, dtype=args.model_dtype, device=device)
    blocks = load_split(corpus_dir, "factor")
    log(f"collecting factors of {model_dir.name} on {tuple(blocks.shape)} blocks on {device}")
    return collect_factors(
        model,
        blocks,
        Path(extras["out_dir"]),
        args,
        model_fingerprint=model_fingerprint(model_dir),
        corpus_fingerprint=corpus_fingerprint(corpus_dir, "factor"),
        progress=True,
        overwrite=True,  # the asset's own directory: factors of an older config are replaced
        inputs=[model_dir, corpus_dir],
    )


def run(extras: dict, rank: int, log) -> Path:
    """Check the placement (rank 0 first), join the process group under torchrun, collect."""
    import torch

    from memkfac.devices import process_group, rank_device, resolve_dtype

    compute = extras["compute"]
    names = {"device": "device", "dtype": "dtype", "processes": "processes"} | compute.get(
        "setting_names", {}
    )

    def place():  # this process's device and dtype, the settings checked against what this machine has
        device = rank_device(compute["device"], names["device"], names["processes"])
        resolve_dtype(compute["dtype"], device, names["dtype"])
        return device

    if compute.get("threads"):
        torch.set_num_threads(compute["threads"])
    device = place() if rank == 0 else None  # rank 0 fails alone: the others wait in the group
    with process_group(compute["device"]):
        return collect(extras, device or place(), compute["dtype"], log)


def stop_on_sigterm() -> None:
    """SIGTERM (scancel, a time limit, torchrun stopping the others when one process fails) becomes an
    error that Pipes reports, instead of a silent death."""
    from memkfac.errors import MemkfacError

    def handler(signum, frame):
        raise MemkfacError(
            "the factor collection was stopped by SIGTERM: Slurm's scancel or time limit, the pod being "
            "deleted, or torchrun stopping every process because one failed (its error is in the log)",
            "completed shards are kept: remove the cause and rematerialize kfac_factors to resume",
        )

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    from memkfac.fingerprint import sha256_file

    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        with PipesDefaultContextLoader().load_context(
            PipesEnvVarParamsLoader().load_context_params()
        ) as data:
            extras = dict(data["extras"])
        run(extras, rank, log=lambda message: None)
        return
    with open_dagster_pipes() as pipes:
        stop_on_sigterm()
        index = run(dict(pipes.extras), rank, log=pipes.log.info)
        meta = json.loads(index.read_text())
        compute = pipes.extras["compute"]
        metadata = {
            "tokens": meta["tokens"],
            "modules": len(meta["targets"]),
            "shards": len(meta["shards"]),
            "fisher": meta["fisher"],
            "bytes": sum(p.stat().st_size for p in index.parent.iterdir() if p.is_file()),
            "path": {"raw_value": str(index.parent), "type": "path"},
            "device": compute["device"],
            "dtype": compute["dtype"],
            "processes": int(os.environ.get("WORLD_SIZE", "1")),
        }
        if "SLURM_JOB_ID" in os.environ:
            metadata["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        pipes.report_asset_materialization(metadata=metadata, data_version=sha256_file(index))


if __name__ == "__main__":
    main()
