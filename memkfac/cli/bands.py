"""``memkfac bands``: band activation analysis (paper Fig. 2 and Fig. 4) of a model's MLP inputs."""

from __future__ import annotations

import argparse
from pathlib import Path

from memkfac.cli.values import (
    add_device_arguments,
    add_model_argument,
    checked_placement,
    model_layers,
    name,
    name_list,
    positive_int,
    probe_set_name,
    usage_errors,
)

_DESCRIPTION = """\
Measure how strongly memorized text, clean text and downstream tasks drive each curvature band of the
MLP maps of some layers (paper section 4, Fig. 2, and section 6, Fig. 4).

The K-FAC components u_i v_j^T of a weight are ranked by curvature mass lam_i * mu_j and cut into bands:
top10 (largest 10% of components), 10-25, 25-50 and bottom50. A component's activation on a token is
|v_j^T x| for the MLP input x. For every band and data source the command reports the mean activation
and its ratio to clean text. The paper finds memorized tokens above 1 in the bottom band and below 1 in
the top band. --basis svd adds the control: W's right singular vectors banded by singular value.

Sources: one per probe kind in --probes (memorized, control, ...), measured at the positions that
predict the suffix; clean = the held-out blocks of --clean; one per task in --tasks (query + answer).
Writes the band_activation table (MEMKFAC_HOME/evals/band_activation/variant=<V>/probe_set=<SET>/)
and a PNG plot (--plot, default MEMKFAC_HOME/plots/bands-<V>-<SET>.png).
"""

_EPILOG = """\
examples:
  memkfac bands MODEL_DIR --factors FACTOR_DIR --layers 22-24 --probes probes.jsonl --clean CORPUS_DIR
  memkfac bands MODEL_DIR --factors FACTOR_DIR --layers 23 --probes probes.jsonl --clean CORPUS_DIR \\
      --tasks arithmetic,facts_rare,open_book,boolean_expressions --basis kfac,svd

FACTOR_DIR is the directory written by `memkfac factors` on this very (unedited) model; the eigenbasis
is computed on first use if missing. CORPUS_DIR is a corpus built by memkfac (its held-out split).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bands",
        help="band activation analysis: memorized vs clean text per curvature band, table and plot",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p, "the unedited model, the one the factors were collected on")
    p.add_argument(
        "--factors", required=True, type=Path, metavar="DIR", help="factor (or eigenbasis) directory of MODEL"
    )
    p.add_argument("--layers", required=True, help="decoder layers to analyse: '22,23,24', '22-24' or 'all'")
    p.add_argument(
        "--proj",
        type=name_list,
        default="gate,up",
        help="MLP projections, from gate, up, down (default: gate,up)",
    )
    p.add_argument("--probes", required=True, type=Path, metavar="FILE", help="probe-set JSONL file")
    p.add_argument(
        "--probe-set", type=name, help="name of the probe set in the table (default: the file name stem)"
    )
    p.add_argument(
        "--clean",
        required=True,
        type=Path,
        metavar="CORPUS_DIR",
        help="corpus whose held-out split is clean text",
    )
    p.add_argument(
        "--tasks",
        type=name_list,
        default="",
        help="comma-separated generated downstream tasks to measure too",
    )
    p.add_argument(
        "--basis", type=name_list, default="kfac,svd", help="kfac, svd or both (default: kfac,svd)"
    )
    p.add_argument(
        "--variant", type=name, default="base", help="name of the model in the table (default: base)"
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=10_000,
        help="tokens measured per source (default: 10000, as the paper)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=16, help="sequences per forward pass (default: 16)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of token subsampling and task items (default: 0)"
    )
    p.add_argument("--plot", type=Path, metavar="PNG", help="where to write the plot")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --plot file that is not an earlier band plot",
    )
    add_device_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def format_rows(rows: list[dict]) -> str:
    header = f"{'layer':>5} {'proj':5} {'basis':5} {'source':26}" + "".join(
        f" {b:>9}" for b in ("top10", "10-25", "25-50", "bottom50")
    )
    lines = ["ratio of mean |v^T x| to clean text, per band", header, "-" * len(header)]
    table: dict[tuple, dict[str, float]] = {}
    for r in rows:
        table.setdefault((r["layer"], r["proj"], r["basis"], r["source"]), {})[r["band"]] = r[
            "ratio_to_clean"
        ]
    for (layer, proj, basis, source), bands in table.items():
        if source != "clean":
            lines.append(
                f"{layer:>5} {proj:5} {basis:5} {source:26}" + "".join(f" {v:9.3f}" for v in bands.values())
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from memkfac.bands import BandArguments, run_band_analysis
    from memkfac.corpora import load_split
    from memkfac.eigen import eigenbasis_for
    from memkfac.models import resolve_model
    from memkfac.probes import load_probe_set

    progress = not args.quiet
    device, dtype = checked_placement(args)
    probe_set = probe_set_name(args.probe_set, args.probes)
    model_dir = resolve_model(args.model, progress=progress)
    with usage_errors():
        band_args = BandArguments(
            layers=model_layers(args.layers, model_dir),
            projections=args.proj,
            tasks=args.tasks,
            bases=args.basis,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    table = run_band_analysis(
        model_dir,
        eigenbasis_for(args.factors, progress) if "kfac" in band_args.bases else None,
        load_probe_set(args.probes),
        load_split(args.clean, "heldout"),
        band_args,
        variant=args.variant,
        probe_set=probe_set,
        plot_path=args.plot,
        progress=progress,
        overwrite=args.overwrite,
        device=device,
        dtype=dtype,
    )
    print(format_rows(table.to_pylist()))
    return 0
