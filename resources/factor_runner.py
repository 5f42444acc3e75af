"""The seam where K-FAC factor collection leaves the Dagster process (Dagster Pipes).

The asset calls ``factor_runner.collect(context, extras)``; the runner launches
``resources/pipes_collect_factors.py`` (plain torch + memkfac + dagster_pipes, no dagster) and returns
what the script reported. Locally that is a subprocess. On a GPU box or cluster bind another runner
under the same key in ``resources/settings.py`` (e.g. one wrapping ``PipesK8sClient`` or
``PipesDockerClient`` with the same script and extras); the asset does not change.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import dagster as dg

ENTRYPOINT = Path(__file__).resolve().parent / "pipes_collect_factors.py"


class FactorRunner(dg.ConfigurableResource):
    """Interface: run the factor-collection entrypoint for one asset partition."""

    def collect(
        self, context: dg.AssetExecutionContext, extras: Mapping[str, object]
    ) -> dg.MaterializeResult:
        raise NotImplementedError("bind a concrete runner such as LocalFactorRunner")


class LocalFactorRunner(FactorRunner):
    """Runs the entrypoint as a local subprocess with ``python`` (default: this interpreter)."""

    python: str

    def collect(
        self, context: dg.AssetExecutionContext, extras: Mapping[str, object]
    ) -> dg.MaterializeResult:
        client = dg.PipesSubprocessClient(cwd=str(ENTRYPOINT.parent.parent))
        invocation = client.run(context=context, command=[self.python, str(ENTRYPOINT)], extras=dict(extras))
        return invocation.get_materialize_result()
