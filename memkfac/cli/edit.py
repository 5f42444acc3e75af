"""``memkfac edit``: remove low-curvature components from MLP weights and write the edited model."""

from __future__ import annotations

import argparse
from pathlib import Path

from memkfac.cli.values import (
    UsageError,
    add_device_arguments,
    add_model_argument,
    checked_placement,
    keep_mass,
    model_layers,
    name_list,
    usage_errors,
)

_DESCRIPTION = """\
Edit a model's MLP weights with K-FAC curvature editing (Merullo et al. 2025) and write the edited
model as a Hugging Face checkpoint directory (loadable with AutoModelForCausalLM.from_pretrained) with
an edit manifest, memkfac_manifest.json.

For each edited weight W, the K-FAC components u_i v_j^T (eigenvectors of the factors G and A, collected
by `memkfac factors`) are ranked by curvature mass lam_i * mu_j. The edit keeps the largest components
until they hold --keep-mass of the total and removes the rest; memorized text lives mostly in the
removed low-curvature components. --keep-mass 1 leaves a module unchanged; smaller values remove more.
"""

_EPILOG = """\
examples:
  # the paper's setting on a 32-layer model: gate and up of layers 23-25 at 60% of the mass
  memkfac edit MODEL_DIR --factors FACTOR_DIR --layers 23-25 --proj gate,up --keep-mass 0.6 --out EDIT_DIR
  # keep more of one module
  memkfac edit MODEL_DIR --factors FACTOR_DIR --layers 22,23,24 --keep-mass 0.6 \\
      --keep-mass-for 23.gate=0.8 --out EDIT_DIR
  # the SVD baseline (no factors needed): drop the smallest 25% of singular directions
  memkfac edit MODEL_DIR --method svd --svd-drop 0.25 --layers 22-24 --out EDIT_DIR

FACTOR_DIR is the directory written by `memkfac factors`; its eigenbasis (FACTOR_DIR/eigenbasis) is
computed on first use if it is missing. An eigenbasis directory itself is accepted too. The factors
must come from this very model: the edit refuses factors of another model.
"""


def _keep_mass_override(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected LAYER.PROJ=RHO such as 23.gate=0.8, got {text!r}")
    return key.strip(), keep_mass(value)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "edit",
        help="edit MLP weights with K-FAC curvature editing and write the edited model",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p, "the base model, the one the factors were collected on")
    p.add_argument(
        "--factors",
        metavar="DIR",
        type=Path,
        help="factor directory from `memkfac factors` (or an eigenbasis directory); "
        "required for every method but svd",
    )
    p.add_argument(
        "--layers", required=True, help="decoder layers to edit, 0-based: '22,23,24', '22-24' or 'all'"
    )
    p.add_argument(
        "--proj",
        type=name_list,
        default="gate,up",
        help="MLP projections to edit, comma-separated from gate, up, down (default: gate,up)",
    )
    p.add_argument(
        "--keep-mass",
        type=keep_mass,
        default=0.6,
        metavar="RHO",
        help="fraction of curvature mass to keep per module, in (0, 1] (default: 0.6)",
    )
    p.add_argument(
        "--keep-mass-for",
        type=_keep_mass_override,
        action="append",
        default=[],
        metavar="LAYER.PROJ=RHO",
        help="a module's own keep mass, e.g. 23.gate=0.8 (repeatable)",
    )
    p.add_argument(
        "--method",
        default="kfac",
        choices=["kfac", "per_side", "svd", "random"],
        help="kfac: the paper's product rule (default). Controls: per_side keeps each side's top "
        "eigenvectors by its own eigenvalue fraction RHO; svd drops the smallest --svd-drop of "
        "W's singular directions; random applies the kfac mask in a seeded random basis",
    )
    p.add_argument(
        "--svd-drop",
        type=float,
        default=0.25,
        metavar="FRAC",
        help="svd only: fraction of the smallest singular directions removed (default: 0.25)",
    )
    p.add_argument("--seed", type=int, default=0, help="random only: seed of the random bases (default: 0)")
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="where to write the edited model: a new or empty directory",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier edit in --out (never anything else)"
    )
    # a GPU edits 7B-scale layers in seconds
    add_device_arguments(p, "the float64 projections (and an eigenbasis computed on the way)", dtypes=())
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _summary_table(modules: list[dict]) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    columns = ("rho", 5), ("kept", 10), ("frac", 7), ("mass", 7), ("G vecs", 6), ("A vecs", 6), ("dW/W", 6)
    header = f"{'module':<34}" + "".join(f" {name:>{width}}" for name, width in columns)
    rows = [header, "-" * len(header)]
    for m in modules:
        rows.append(
            f"{m['name']:<34} {fmt(m['keep_mass'], '.3g'):>5} {m['n_kept']:>10,} {m['frac_kept']:>7.2%} "
            f"{fmt(m['mass_kept'], '.2%'):>7} {fmt(m['distinct_G'], 'd'):>6} {fmt(m['distinct_A'], 'd'):>6} "
            f"{m['rel_change']:>6.3f}" + ("  (unchanged)" if m["skipped"] else "")
        )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    from memkfac.checkpoint import checkpoint_kind
    from memkfac.editing import EditArguments, edit_model
    from memkfac.eigen import eigenbasis_for
    from memkfac.models import resolve_model
    from memkfac.paths import check_output_dir

    if args.method != "svd" and args.factors is None:
        raise UsageError(
            f"--method {args.method} needs --factors", "pass the directory written by `memkfac factors`"
        )
    progress = not args.quiet
    device, _ = checked_placement(args)
    model_dir = resolve_model(args.model, progress=progress)
    with usage_errors():
        config = EditArguments(
            layers=model_layers(args.layers, model_dir),
            projections=args.proj,
            keep_mass=args.keep_mass,
            overrides=dict(args.keep_mass_for),
            method=args.method,
            svd_drop=args.svd_drop,
            seed=args.seed,
        )
    # refused now, not after computing an eigenbasis: an output holding anything but an earlier edit
    check_output_dir(
        args.out, checkpoint_kind("edit"), overwrite=args.overwrite, inputs=[model_dir, args.factors]
    )
    eig_dir = None if config.method == "svd" else eigenbasis_for(args.factors, progress, device)
    manifest = edit_model(
        model_dir, eig_dir, config, args.out, progress=progress, device=device, overwrite=args.overwrite
    )
    print(_summary_table(manifest["modules"]))
    print(f"wrote {args.out} ({len(manifest['modules'])} modules, {manifest['edit_seconds']:.1f} s)")
    return 0
