"""The seam where K-FAC factor collection leaves the Dagster process (Dagster Pipes).

The asset calls ``factor_runner.collect(context, extras)``; the runner launches
``resources/pipes_collect_factors.py`` (plain torch + memkfac + dagster_pipes, no dagster) and returns
what the script reported. ``SubprocessFactorRunner`` starts it as a subprocess, optionally behind a
launcher command prefix (``srun --gpus=1``) that puts it on another machine; ``resources/settings.py``
binds it from the environment. For a client that is not a command (``PipesK8sClient``,
``PipesDockerClient``) bind another ``FactorRunner`` under the same key there; the asset does not
change.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

PROJECT_DIR = Path(__file__).resolve().parent.parent
ENTRYPOINT = PROJECT_DIR / "resources" / "pipes_collect_factors.py"


class FactorRunner(dg.ConfigurableResource):
    """Interface: run the factor-collection entrypoint for one asset partition."""

    def collect(
        self, context: dg.AssetExecutionContext, extras: Mapping[str, object]
    ) -> dg.MaterializeResult:
        raise NotImplementedError("bind a concrete runner such as SubprocessFactorRunner")


class SubprocessFactorRunner(FactorRunner):
    """Runs ``[*launcher, python, ENTRYPOINT]`` in the project directory, with ``env`` added.

    Without a launcher this is a local subprocess. A launcher runs the same command elsewhere (Slurm's
    ``srun``, ``docker run`` with the project and data mounted at the same paths): ``python`` and the
    project path must exist there. Pipes context and messages go through files in ``exchange_dir``
    (under the data root, which the launched process shares anyway since it writes the factors there),
    not the local temp directory a node of a cluster would not see.
    """

    python: str
    exchange_dir: str
    launcher: list[str] = []
    env: dict[str, str] = {}

    def collect(
        self, context: dg.AssetExecutionContext, extras: Mapping[str, object]
    ) -> dg.MaterializeResult:
        Path(self.exchange_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.exchange_dir) as exchange:
            client = dg.PipesSubprocessClient(
                env=self.env,
                cwd=str(PROJECT_DIR),
                context_injector=dg.PipesFileContextInjector(str(Path(exchange) / "context.json")),
                message_reader=dg.PipesFileMessageReader(str(Path(exchange) / "messages.jsonl")),
            )
            invocation = client.run(
                context=context, command=[*self.launcher, self.python, str(ENTRYPOINT)], extras=dict(extras)
            )
            return invocation.get_materialize_result()
