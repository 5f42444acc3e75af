"""Open a UI on what the main job wrote: ``python -m jobs.ui dagster`` or ``python -m jobs.ui mlflow``.

``make ui`` and ``make mlflow-ui`` run it. The Dagster UI shows the main job's graph and runs only when
it reads the same ``MEMKFAC_HOME``, ``MEMKFAC_CONFIG`` and Dagster instance (``$DAGSTER_HOME``, default
``$MEMKFAC_HOME/dagster``); the MLflow UI reads the store the pipeline registers models in
(``MLFLOW_TRACKING_URI``, else the config's ``mlflow.tracking_uri``, else ``$MEMKFAC_HOME/mlflow``).
Pass the same variables as to the main job, e.g. ``MEMKFAC_CONFIG=configs/tiny.yaml make ui``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

WORKSPACE = Path(__file__).resolve().parents[1] / "workspace.yaml"
DEFAULT_PORTS = {"dagster": 3000, "mlflow": 5000}


def ui_command(ui: str, host: str, port: int) -> tuple[list[str], dict[str, str], str]:
    """``(argv, environment, what it reads)`` that serve ``ui`` ("dagster" or "mlflow") on ``host:port``."""
    from jobs.main import dagster_home
    from resources.config import load_config
    from resources.settings import Settings

    settings = Settings.from_env()
    env = os.environ | {"MEMKFAC_HOME": str(settings.home), "MEMKFAC_CONFIG": str(settings.config_path)}
    if ui == "dagster":
        env["DAGSTER_HOME"] = str(dagster_home(settings.home))
        argv = ["dagster", "dev", "-w", str(WORKSPACE), "-h", host, "-p", str(port)]
        reads = f"DAGSTER_HOME={env['DAGSTER_HOME']}, MEMKFAC_CONFIG={settings.config_path}"
    else:
        uri = settings.mlflow_uri(load_config(settings.config_path))
        argv = ["mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
        reads = uri
    return [sys.executable, "-m", *argv], env, reads


# the variables the UIs read, as `make ui` must be given them when the main job was given them
UI_VARIABLES = ("MEMKFAC_HOME", "MEMKFAC_CONFIG", "DAGSTER_HOME", "MLFLOW_TRACKING_URI")


def make_command(target: str, settings, dagster_dir: Path) -> str:
    """``make <target>`` with the variables a UI needs to read what the main job wrote: those set in
    this environment, and ``DAGSTER_HOME`` when it is not the default ``$MEMKFAC_HOME/dagster``."""
    values = {
        "MEMKFAC_HOME": str(settings.home),
        "MEMKFAC_CONFIG": str(settings.config_path),
        "DAGSTER_HOME": str(dagster_dir),
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", ""),
    }
    given = {name for name in UI_VARIABLES if os.environ.get(name)}
    if Path(dagster_dir).resolve() == (settings.home / "dagster").resolve():
        given.discard("DAGSTER_HOME")  # the main job set the default; make ui derives the same
    prefix = "".join(f"{name}={shlex.quote(values[name])} " for name in UI_VARIABLES if name in given)
    return f"{prefix}make {target}"


def main(argv: list[str] | None = None) -> int:
    from memkfac.errors import MemkfacError

    parser = argparse.ArgumentParser(prog="python -m jobs.ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("ui", choices=sorted(DEFAULT_PORTS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="default: 3000 (Dagster), 5000 (MLflow)")
    args = parser.parse_args(argv)
    port = args.port or DEFAULT_PORTS[args.ui]
    try:
        command, env, reads = ui_command(args.ui, args.host, port)
    except MemkfacError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.ui} UI on http://{args.host}:{port} reading {reads} (Ctrl-C stops it)", flush=True)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    sys.exit(main())
