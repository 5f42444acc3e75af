"""`memkfac register`: register a fine-tune of an edited model so the resurgence watch evaluates it."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "register",
        help="register a fine-tuned model as a version downstream of an edit (for the watch)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Log MODEL_DIR (a save_pretrained directory with its tokenizer) to MLflow in the\n"
        "transformers flavor and register it with the tag memkfac.parent=PARENT, which the resurgence\n"
        "watch (sensor registry_watch) looks for: it then measures whether the fine-tune recites the\n"
        "canaries that PARENT's edit removed.",
        epilog="example: memkfac register ./my-finetune --parent models:/memkfac-smollm2-135m/4",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the fine-tuned model directory")
    parser.add_argument(
        "--parent", required=True, help="the version it was fine-tuned from: models:/<name>/<version>"
    )
    parser.add_argument("--name", help="registered model to add the version to (default: the parent's)")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI, else the pipeline's sqlite "
        "file $MEMKFAC_HOME/mlflow/mlflow.db)",
    )
    parser.add_argument("--experiment", default="memkfac", help="MLflow experiment of the upload run")
    parser.set_defaults(func=_register)


def _register(args: argparse.Namespace) -> int:
    from memkfac.paths import memkfac_home
    from memkfac.registry import register_finetune

    uri = args.tracking_uri or f"sqlite:///{memkfac_home().resolve() / 'mlflow' / 'mlflow.db'}"
    print(register_finetune(uri, args.model_dir, args.parent, args.name, args.experiment))
    return 0
