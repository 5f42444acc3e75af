"""K-FAC factors (collected out of process through the factor runner) and their eigenbasis."""

import dataclasses

import dagster as dg

from assets.automation import BUILD
from assets.models import subject_model_dir
from assets.partitions import Partitions
from memkfac.fingerprint import dir_bytes
from resources.config import PipelineConfig
from resources.factor_runner import FactorRunner
from resources.store import ArtifactStore

GROUP = "kfac"


def build(config: PipelineConfig, parts: Partitions) -> list:
    @dg.asset(
        partitions_def=parts.model,
        deps=[dg.AssetDep("subject_model"), dg.AssetDep("corpus")],
        group_name=GROUP,
        kinds={"pytorch", "safetensors"},
        code_version="factors-v1",
        automation_condition=BUILD,
        pool="compute",
        description="K-FAC factors A = E[a a^T], G = E[g g^T] of the tracked MLP maps over the corpus "
        "factor split; collected by the factor runner (a Pipes subprocess here, any Pipes client elsewhere).",
    )
    def kfac_factors(
        context: dg.AssetExecutionContext, store: ArtifactStore, factor_runner: FactorRunner
    ) -> dg.MaterializeResult:
        model = context.partition_key
        return factor_runner.collect(
            context,
            extras={
                "model_dir": str(subject_model_dir(config, store, model)),
                "corpus_dir": str(store.corpus_dir(model)),
                "out_dir": str(store.factor_dir(model)),
                "factor_args": dataclasses.asdict(config.factors),
            },
        )

    @dg.asset_check(
        asset=kfac_factors,
        partitions_def=parts.model,
        blocking=True,
        description="Finite, symmetric, PSD within tolerance, one token count matching the index.",
    )
    def factors_healthy(context: dg.AssetCheckExecutionContext, store: ArtifactStore) -> dg.AssetCheckResult:
        from memkfac.factor_health import check_factors

        found = check_factors(store.factor_dir(context.partition_key))
        problems = found.pop("problems")
        found["tokens_per_module"] = dg.MetadataValue.json(found["tokens_per_module"])
        return dg.AssetCheckResult(
            passed=not problems, metadata={**found, "problems": dg.MetadataValue.json(problems)}
        )

    @dg.asset(
        partitions_def=parts.model,
        deps=[kfac_factors],
        group_name=GROUP,
        kinds={"pytorch", "safetensors"},
        code_version="eigen-v1",
        automation_condition=BUILD,
        description="Eigendecomposition of every factor (fp64 eigh, negatives clamped): the curvature basis.",
    )
    def kfac_eigenbasis(context: dg.AssetExecutionContext, store: ArtifactStore) -> dg.MaterializeResult:
        from memkfac.eigen import compute_eigenbasis, load_eigenbasis
        from memkfac.fingerprint import sha256_file

        model = context.partition_key
        run_on = config.compute.of("eigenbasis").start()
        out = compute_eigenbasis(
            store.factor_dir(model),
            store.eigen_dir(model),
            progress=False,
            device=run_on.device,
            overwrite=True,
        )
        modules, meta = load_eigenbasis(out)
        spectra = {
            name: {
                "lam_max": float(e.lam[0]),
                "mu_max": float(e.mu[0]),
                "d_out": len(e.lam),
                "d_in": len(e.mu),
            }
            for name, e in modules.items()
        }
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(out)),
                "modules": len(modules),
                "tokens": meta.get("tokens", 0),
                "bytes": dir_bytes(out),
                "spectra": dg.MetadataValue.json(spectra),
            },
            data_version=dg.DataVersion(sha256_file(out / "meta.json")),
        )

    return [kfac_factors, kfac_eigenbasis, factors_healthy]
