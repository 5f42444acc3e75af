"""K-FAC factors (collected out of process through the factor runner) and their eigenbasis."""

import json

import dagster as dg

from assets.automation import BUILD
from assets.metadata import dir_bytes
from assets.models import subject_model_dir
from assets.partitions import Partitions
from resources.config import PipelineConfig
from resources.factor_runner import FactorRunner
from resources.store import ArtifactStore

GROUP = "kfac"
SYMMETRY_RTOL = 1e-5  # max |X - X^T| relative to max |X|
PSD_RTOL = 1e-6  # smallest eigenvalue >= -PSD_RTOL * largest (fp32 sums)


def factor_health(factor_dir) -> dict:
    """Worst-case finiteness, asymmetry and negative curvature over all modules, and the token count."""
    import torch

    from memkfac.factor_store import load_factors

    modules = load_factors(factor_dir)
    worst = {"finite": True, "asymmetry": 0.0, "negativity": 0.0}
    tokens = set()
    for f in modules.values():
        tokens.add(f.tokens)
        for X in (f.A, f.G):
            X = X.double()
            worst["finite"] &= bool(torch.isfinite(X).all())
            scale = X.abs().max().clamp_min(1e-30)
            worst["asymmetry"] = max(worst["asymmetry"], float((X - X.T).abs().max() / scale))
            eig = torch.linalg.eigvalsh((X + X.T) / 2)
            worst["negativity"] = max(worst["negativity"], float(-eig[0] / eig[-1].clamp_min(1e-30)))
    worst["tokens"] = sorted(tokens)
    worst["modules"] = len(modules)
    return worst


def build(config: PipelineConfig, parts: Partitions) -> list:
    factor_settings = dict(config.factors)
    layers = str(factor_settings.pop("layers", "all"))

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
                "layers": layers,
                "factor_args": factor_settings,
            },
        )

    @dg.asset_check(
        asset=kfac_factors,
        partitions_def=parts.model,
        blocking=True,
        description="Finite, symmetric, PSD within tolerance, one token count matching the index.",
    )
    def factors_healthy(context: dg.AssetCheckExecutionContext, store: ArtifactStore) -> dg.AssetCheckResult:
        index = json.loads((store.factor_dir(context.partition_key) / "index.json").read_text())
        h = factor_health(store.factor_dir(context.partition_key))
        passed = (
            h["finite"]
            and h["asymmetry"] <= SYMMETRY_RTOL
            and h["negativity"] <= PSD_RTOL
            and h["tokens"] == [index["tokens"]]
            and index["tokens"] > 0
            and h["modules"] == len(index["targets"])
        )
        return dg.AssetCheckResult(
            passed=passed,
            metadata={
                "finite": h["finite"],
                "max_relative_asymmetry": h["asymmetry"],
                "max_relative_negative_eigenvalue": h["negativity"],
                "tokens_per_module": dg.MetadataValue.json(h["tokens"]),
                "index_tokens": index["tokens"],
                "modules": h["modules"],
            },
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
        out = compute_eigenbasis(
            store.factor_dir(model), store.eigen_dir(model), progress=False, overwrite=True
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
