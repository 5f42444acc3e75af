"""Base models, corpus splits, canaries and the subject model (the model the edits are applied to).

The subject model is the base model itself, or, for a model with ``inject_canaries: true`` (the
default), the base fine-tuned on the trained canaries: a memorizing model with known ground truth.
"""

from pathlib import Path

import dagster as dg

from assets.automation import BUILD
from assets.partitions import CANARY_PROBE_SET, Partitions
from assets.sources import CANARY_FILE
from resources.config import PipelineConfig
from resources.store import ArtifactStore

GROUP = "models"


def base_model_dir(config: PipelineConfig, model: str) -> Path:
    """The base model's Hugging Face directory (converted and cached on first use)."""
    from memkfac.models import resolve_model

    return resolve_model(config.models[model].source, progress=False)


def subject_model_dir(config: PipelineConfig, store: ArtifactStore, model: str) -> Path:
    """The directory the edits of ``model`` start from."""
    if config.models[model].inject_canaries:
        return store.injected_model_dir(model)
    return base_model_dir(config, model)


def _model_result(path: Path, **metadata) -> dg.MaterializeResult:
    from memkfac.models import describe_model

    about = describe_model(path)
    return dg.MaterializeResult(
        metadata={**about, "path": dg.MetadataValue.path(about["path"]), **metadata},
        data_version=dg.DataVersion(about["fingerprint"]),
    )


def build(config: PipelineConfig, parts: Partitions) -> list:
    @dg.asset(
        partitions_def=parts.model,
        deps=[dg.AssetDep("model_files")],
        group_name=GROUP,
        kinds={"pytorch"},
        code_version="base-model-v1",
        automation_condition=BUILD,
        description="The base model as a Hugging Face directory (the builtin default is converted from its "
        "pinned GGUF once and cached under MEMKFAC_HOME/models).",
    )
    def base_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        return _model_result(base_model_dir(config, context.partition_key))

    @dg.asset(
        partitions_def=parts.model,
        deps=[base_model, dg.AssetDep("corpus_files")],
        group_name=GROUP,
        kinds={"safetensors"},
        code_version="corpus-v1",
        automation_condition=BUILD,
        description="General text tokenized with the model's tokenizer into packed blocks and three disjoint "
        "splits: factor (K-FAC statistics), finetune (injection mix, resurgence), heldout (perplexity).",
    )
    def corpus(context: dg.AssetExecutionContext, store: ArtifactStore) -> dg.MaterializeResult:
        from transformers import AutoTokenizer

        from memkfac.corpora import build_corpus, load_corpus_meta

        tokenizer = AutoTokenizer.from_pretrained(base_model_dir(config, context.partition_key))
        out = build_corpus(
            config.corpus, tokenizer, store.corpus_dir(context.partition_key), progress=False, overwrite=True
        )
        meta = load_corpus_meta(out)
        splits = meta["splits"]
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(out)),
                "block_len": meta["block_len"],
                **{f"{s}_tokens": v["tokens"] for s, v in splits.items()},
                **{f"{s}_documents": v["n_documents"] for s, v in splits.items()},
                "splits": dg.MetadataValue.json(splits),
            },
            data_version=dg.DataVersion("-".join(splits[s]["fingerprint"][:16] for s in sorted(splits))),
        )

    @dg.asset(
        deps=[dg.AssetDep(CANARY_FILE)] if config.canary_file else [],
        group_name=GROUP,
        kinds={"json"},
        code_version=_canaries_version(config),
        automation_condition=BUILD,
        description="The canaries, written as the probe-set file probes/"
        f"{CANARY_PROBE_SET}.jsonl (the probe_sets asset validates it like any probe set, and every step "
        "reads that validated copy): trained ones (kind memorized, split sweep or holdout) and "
        "never-trained controls. Seeded synthetic records and secrets, or the user's probe set named by "
        "canaries.file, checked here (every bad line listed).",
    )
    def canaries(store: ArtifactStore) -> dg.MaterializeResult:
        from memkfac.canaries import canary_probes
        from memkfac.fingerprint import sha256_file
        from memkfac.probes import write_probe_set

        probes = canary_probes(config.canary_source, "canaries.file")
        path = write_probe_set(probes, store.probe_file(CANARY_PROBE_SET), overwrite=True)
        trained = [p for p in probes if p.kind == "memorized"]
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": len(probes),
                "source": dg.MetadataValue.path(str(config.canary_file))
                if config.canary_file
                else "generated",
                "trained": len(trained),
                "control": sum(p.kind == "control" for p in probes),
                "path": dg.MetadataValue.path(str(path)),
                "example": dg.MetadataValue.json({"prefix": trained[0].prefix, "suffix": trained[0].suffix}),
            },
            data_version=dg.DataVersion(sha256_file(path)),
        )

    @dg.asset(
        partitions_def=parts.model,
        deps=[base_model, corpus, dg.AssetDep("probe_sets", partition_mapping=parts.to_canaries)],
        group_name=GROUP,
        kinds={"pytorch", "safetensors"},
        code_version="subject-v1",
        automation_condition=BUILD,
        pool="compute",
        description="The model the edits start from: the base model, or (inject_canaries: true) the base "
        "fine-tuned on the trained canaries mixed with general text, with measured recall as ground truth.",
    )
    def subject_model(context: dg.AssetExecutionContext, store: ArtifactStore) -> dg.MaterializeResult:
        model = context.partition_key
        if not config.models[model].inject_canaries:
            return _model_result(base_model_dir(config, model), injected=False)
        from memkfac.corpora import corpus_fingerprint, load_split
        from memkfac.inject import inject_canaries
        from memkfac.probes import load_probe_set

        run_on = config.compute.of("injection").start()
        corpus_dir = store.corpus_dir(model)
        manifest = inject_canaries(
            base_model_dir(config, model),
            load_probe_set(store.validated_probes(CANARY_PROBE_SET)),
            load_split(corpus_dir, "finetune"),
            load_split(corpus_dir, "heldout"),
            config.injection,
            store.injected_model_dir(model),
            general_fingerprint=corpus_fingerprint(corpus_dir, "finetune"),
            device=run_on.device,
            progress=False,
            overwrite=True,
        )
        recall = manifest["recall"]
        return _model_result(
            store.injected_model_dir(model),
            injected=True,
            trained_strict_pct=_overall_strict_pct(recall["trained"]),
            control_strict_pct=_overall_strict_pct(recall["control"]),
            perplexity_base=manifest["perplexity"]["base"],
            perplexity_injected=manifest["perplexity"]["injected"],
            finetune_seconds=manifest["finetune"]["seconds"],
            manifest=dg.MetadataValue.json(manifest),
        )

    return [base_model, corpus, canaries, subject_model]


def _overall_strict_pct(by_split: dict) -> float | None:
    """Strict recall over all splits from memkfac.inject's ``{split: summary}`` (None when empty)."""
    if not by_split:
        return None
    return (by_split.get("all") or next(iter(by_split.values())))["strict_pct"]


def _canaries_version(config: PipelineConfig) -> str:
    """The canaries' code version: it changes with the canaries config and the user file's content, so
    editing either rematerializes the canaries (and, if they differ, what follows) on the next load."""
    import dataclasses
    import hashlib
    import json

    from memkfac.fingerprint import sha256_file

    source = config.canary_source
    settings = {"sha256": sha256_file(source)} if isinstance(source, Path) else dataclasses.asdict(source)
    return "canaries-v1-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
