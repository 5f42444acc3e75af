"""Factor collection as an external process: ``python resources/pipes_collect_factors.py`` under Pipes.

Imports only ``dagster_pipes`` and ``memkfac`` (torch, transformers), so a GPU worker image needs no
Dagster. Extras (JSON): ``model_dir``, ``corpus_dir``, ``out_dir`` and ``factor_args`` (the
``FactorArguments`` fields; ``layers`` may be a spec such as ``"14-29"``, resolved on the model).
Reports one materialization whose data version is the sha256 of the factor index.
"""

from __future__ import annotations

import json
from pathlib import Path

from dagster_pipes import open_dagster_pipes


def main() -> None:
    from memkfac.corpora import corpus_fingerprint, load_split
    from memkfac.factors import FactorArguments, collect_factors
    from memkfac.fingerprint import model_fingerprint, sha256_file
    from memkfac.models import load_model

    with open_dagster_pipes() as pipes:
        model_dir = Path(pipes.get_extra("model_dir"))
        corpus_dir = Path(pipes.get_extra("corpus_dir"))
        args = FactorArguments(**pipes.get_extra("factor_args"))
        model, _ = load_model(model_dir, dtype=args.model_dtype)
        blocks = load_split(corpus_dir, "factor")
        pipes.log.info(f"collecting factors of {model_dir.name} on {tuple(blocks.shape)} blocks")
        index = collect_factors(
            model,
            blocks,
            Path(pipes.get_extra("out_dir")),
            args,
            model_fingerprint=model_fingerprint(model_dir),
            corpus_fingerprint=corpus_fingerprint(corpus_dir, "factor"),
            progress=True,
            overwrite=True,  # the asset's own directory: factors of an older config are replaced
            inputs=[model_dir, corpus_dir],
        )

        meta = json.loads(index.read_text())
        pipes.report_asset_materialization(
            metadata={
                "tokens": meta["tokens"],
                "modules": len(meta["targets"]),
                "shards": len(meta["shards"]),
                "fisher": meta["fisher"],
                "bytes": sum(p.stat().st_size for p in index.parent.iterdir() if p.is_file()),
                "path": {"raw_value": str(index.parent), "type": "path"},
            },
            data_version=sha256_file(index),
        )


if __name__ == "__main__":
    main()
