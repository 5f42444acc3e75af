"""Base models, corpus splits, canaries and the subject model (the model the edits are applied to).

The subject model is the base model itself, or, for a model with ``inject_canaries: true`` (the
default), the base fine-tuned on the trained canaries: a memorizing model with known ground truth.
"""

from pathlib import Path

import dagster as dg

from assets.automation import BUILD
from assets.metadata import dir_bytes
from assets.partitions import Partitions
from assets.sources import CANARY_FILE, canary_file_path
from memkfac.fingerprint import model_fingerprint
from resources.config import PipelineConfig, load_canary_file
from resources.store import ArtifactStore

GROUP = "models"
CANARY_PROBE_SET = "canaries"  # the canary file is written as probes/canaries.jsonl


def base_model_dir(config: PipelineConfig, model: str) -> Path:
    """The base model's Hugging Face directory (converted and cached on first use)."""
    from memkfac.models import resolve_model

    return resolve_model(config.models[model].source, progress=False)


def subject_model_dir(config: PipelineConfig, store: ArtifactStore, model: str) -> Path:
    """The directory the edits of ``model`` start from."""
    if config.models[model].inject_canaries:
        return store.injected_model_dir(model)
    return base_model_dir(config, model)


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
        from transformers import AutoConfig

        path = base_model_dir(config, context.partition_key)
        hf = AutoConfig.from_pretrained(path)
        fingerprint = model_fingerprint(path)
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(path)),
                "fingerprint": fingerprint,
                "architecture": hf.architectures[0] if hf.architectures else hf.model_type,
                "layers": hf.num_hidden_layers,
                "hidden_size": hf.hidden_size,
                "bytes": dir_bytes(path),
            },
            data_version=dg.DataVersion(fingerprint),
        )

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

        spec = dict(config.corpus)
        source = spec.pop("source")
        tokenizer = AutoTokenizer.from_pretrained(base_model_dir(config, context.partition_key))
        out = build_corpus(
            source, tokenizer, store.corpus_dir(context.partition_key), progress=False, overwrite=True, **spec
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
        deps=[dg.AssetDep(CANARY_FILE)] if canary_file_path(config) else [],
        group_name=GROUP,
        kinds={"json"},
        code_version=_canaries_version(config),
        automation_condition=BUILD,
        description="The canaries, written as the probe-set file probes/"
        f"{CANARY_PROBE_SET}.jsonl: trained ones (kind memorized, split sweep or holdout) and never-trained "
        "controls. Seeded synthetic records and secrets, or the user's probe set named by canaries.file.",
    )
    def canaries(store: ArtifactStore) -> dg.MaterializeResult:
        from memkfac.fingerprint import sha256_file
        from memkfac.probes import write_probe_set

        source = config.canaries.get("file")
        if source is None:
            from memkfac.canaries import CanaryArguments, generate_canaries

            trained, control = generate_canaries(CanaryArguments(**config.canaries))
            probes = trained + control
        else:
            probes = load_canary_file(Path(source))
        path = write_probe_set(probes, store.probe_file(CANARY_PROBE_SET), overwrite=True)
        trained = [p for p in probes if p.kind == "memorized"]
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": len(probes),
                "source": dg.MetadataValue.path(source) if source else "generated",
                "trained": len(trained),
                "control": sum(p.kind == "control" for p in probes),
                "path": dg.MetadataValue.path(str(path)),
                "example": dg.MetadataValue.json({"prefix": trained[0].prefix, "suffix": trained[0].suffix}),
            },
            data_version=dg.DataVersion(sha256_file(path)),
        )

    @dg.asset(
        partitions_def=parts.model,
        deps=[base_model, corpus, canaries],
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
            path = base_model_dir(config, model)
            fingerprint = model_fingerprint(path)
            return dg.MaterializeResult(
                metadata={
                    "path": dg.MetadataValue.path(str(path)),
                    "injected": False,
                    "fingerprint": fingerprint,
                },
                data_version=dg.DataVersion(fingerprint),
            )
        from memkfac.corpora import corpus_fingerprint, load_split
        from memkfac.finetune import FinetuneArguments
        from memkfac.inject import InjectArguments, inject_canaries
        from memkfac.probes import load_probe_set

        settings = dict(config.injection)
        finetune = FinetuneArguments(**settings.pop("finetune", {}))
        recipe = InjectArguments(**settings, finetune=finetune)
        corpus_dir = store.corpus_dir(model)
        manifest = inject_canaries(
            base_model_dir(config, model),
            load_probe_set(store.probe_file(CANARY_PROBE_SET)),
            load_split(corpus_dir, "finetune"),
            load_split(corpus_dir, "heldout"),
            recipe,
            store.injected_model_dir(model),
            general_fingerprint=corpus_fingerprint(corpus_dir, "finetune"),
            progress=False,
            overwrite=True,
        )
        recall = manifest["recall"]
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(store.injected_model_dir(model))),
                "injected": True,
                "trained_strict_pct": _overall_strict_pct(recall["trained"]),
                "control_strict_pct": _overall_strict_pct(recall["control"]),
                "perplexity_base": manifest["perplexity"]["base"],
                "perplexity_injected": manifest["perplexity"]["injected"],
                "finetune_seconds": manifest["finetune"]["seconds"],
                "manifest": dg.MetadataValue.json(manifest),
            },
            data_version=dg.DataVersion(model_fingerprint(store.injected_model_dir(model))),
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
    import hashlib
    import json

    from memkfac.fingerprint import sha256_file

    settings = dict(config.canaries)
    if "file" in settings:
        settings["sha256"] = sha256_file(Path(settings["file"]))
    return "canaries-v1-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
