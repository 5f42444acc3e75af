"""Benchmark: the pipeline's factor step against calling the engine directly, side by side in one run.

- pipeline: the ``kfac_factors`` asset materialized in process, bound as ``MEMKFAC_ENV`` binds it
  (default: a local Pipes subprocess; ``MEMKFAC_FACTOR_PROCESSES`` and the other settings apply): a
  Dagster run, the subprocess importing torch, loading the model and the corpus split, collecting,
  writing shards and index, and reporting back through Pipes;
- direct: the same work in this process, with torch already imported: ``load_model``, ``load_split``,
  ``collect_factors`` (the entrypoint's own ``collect``, without Pipes or Dagster).

Same model, corpus split, factor arguments (the default config's ``factors`` section: layers 20-28,
gate and up, sampled Fisher, batch 8, over ``--tokens``) and threads. Both outputs must be the same
shards (sha256), which is checked. Each repeat runs both, alternating which goes first. The target is
pipeline / direct <= 1.10 on SmolLM2 over 100k tokens.

    python bench/bench_pipeline_factors.py                   # SmolLM2 (`memkfac model prepare` first)
    python bench/bench_pipeline_factors.py --model tiny      # a seconds-long smoke run

Writes ``bench/results/bench_pipeline_factors-MODEL.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from common import write_result

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # definitions, resources: the code location loads from the project directory
NAME = {"smollm2-135m": "smollm2-135m", "tiny": "tiny-llama"}


def write_config(work: Path, model: str, model_dir: Path, tokens: int) -> Path:
    """The default config with the model, the factor split and the factor tokens of this benchmark."""
    raw = yaml.safe_load((PROJECT / "configs" / "default.yaml").read_text())
    raw["models"] = {NAME[model]: {"source": str(model_dir), "inject_canaries": False}}
    raw["corpus"]["max_tokens"] = {"factor": tokens, "finetune": 4096, "heldout": 4096}
    raw["factors"]["max_tokens"] = tokens
    if model == "tiny":  # 4 layers
        raw["factors"]["layers"] = "1-3"
        for edit in raw["edits"].values():
            edit["layers"] = "2-3"
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def shard_hashes(factor_dir: Path) -> list[str]:
    return [s["sha256"] for s in json.loads((factor_dir / "index.json").read_text())["shards"]]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(NAME), default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=None, help="factor tokens (default 100000; tiny: 2048)")
    parser.add_argument("--repeats", type=int, default=1, help="pipeline + direct pairs (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both (default: torch's)")
    parser.add_argument("--workdir", type=Path, default=None, help="data root parent (default: a temp dir)")
    opts = parser.parse_args()
    tokens = opts.tokens or (2048 if opts.model == "tiny" else 100_000)
    threads = opts.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the same for the Pipes subprocess

    from memkfac.models import resolve_model
    from memkfac.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-", dir=opts.workdir))
    if opts.model == "tiny":
        model_dir = work / "tiny-llama"
        build_tiny_model(model_dir, arch="llama", seed=0)
    else:
        model_dir = resolve_model("smollm2-135m")  # the converted checkpoint in the usual MEMKFAC_HOME
    os.environ["MEMKFAC_HOME"] = str(work / "home")
    os.environ["MEMKFAC_CONFIG"] = str(write_config(work, opts.model, model_dir, tokens))

    import dagster as dg

    from definitions import build_definitions
    from resources.config import load_config
    from resources.pipes_collect_factors import collect
    from resources.settings import Settings
    from resources.store import ArtifactStore

    settings = Settings.from_env()
    config = load_config(settings.config_path)
    defs = build_definitions(config, settings)
    instance = dg.DagsterInstance.ephemeral()
    name = NAME[opts.model]
    job = defs.resolve_implicit_global_asset_job_def()
    prepared = job.execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey("base_model"), dg.AssetKey("corpus")],
        partition_key=name,
    )
    assert prepared.success
    store = ArtifactStore(home=str(settings.home))
    factor_asset = defs.resolve_assets_def(dg.AssetKey("kfac_factors"))  # with its resources bound
    extras = {  # what the asset sends (assets/kfac.py)
        "model_dir": str(model_dir),
        "corpus_dir": str(store.corpus_dir(name)),
        "factor_args": dataclasses.asdict(config.factors),
    }

    def pipeline() -> Path:
        shutil.rmtree(store.factor_dir(name), ignore_errors=True)
        result = dg.materialize([factor_asset], partition_key=name, instance=instance)
        assert result.success
        return store.factor_dir(name)

    def direct() -> Path:
        out = work / "direct"
        shutil.rmtree(out, ignore_errors=True)
        collect(extras | {"out_dir": str(out)}, torch.device("cpu"), "float32", log=print)
        return out

    seconds: dict[str, list[float]] = {"pipeline": [], "direct": []}
    for repeat in range(opts.repeats):
        order = [("pipeline", pipeline), ("direct", direct)]
        for label, step in order if repeat % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            out = step()
            seconds[label].append(time.perf_counter() - start)
            print(f"repeat {repeat + 1}: {label} {seconds[label][-1]:.1f} s", flush=True)
    same = shard_hashes(store.factor_dir(name)) == shard_hashes(work / "direct")
    index = json.loads((out / "index.json").read_text())
    ratio = sum(seconds["pipeline"]) / sum(seconds["direct"])
    print(f"\n{'step':<58} {'seconds':>9}")
    print(f"{'direct: load_model + load_split + collect_factors':<58} {sum(seconds['direct']):>9.1f}")
    print(
        f"{'pipeline: kfac_factors asset (Dagster + Pipes + launcher)':<58} {sum(seconds['pipeline']):>9.1f}"
    )
    print(f"pipeline / direct: {ratio:.3f} (target <= 1.10); identical shards: {same}")
    print(
        f"({opts.model}, {index['tokens']} tokens, {len(index['targets'])} maps, {len(index['shards'])} "
        f"shards, {threads} threads, {settings.env} runner x {settings.factor.processes} process(es), "
        f"{opts.repeats} repeat(s))"
    )
    write_result(
        f"bench_pipeline_factors-{opts.model}",
        {
            "model": opts.model,
            "tokens": index["tokens"],
            "maps": len(index["targets"]),
            "shards": len(index["shards"]),
            "runner": settings.env,
            "processes": settings.factor.processes,
            "seconds": seconds,
            "ratio_pipeline_over_direct": ratio,
            "identical_shards": same,
        },
    )
    shutil.rmtree(work, ignore_errors=True)
    if not same:
        raise SystemExit("the pipeline and the direct call wrote different factors")


if __name__ == "__main__":
    main()
