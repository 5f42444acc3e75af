"""``memkfac bands``: band activation analysis (paper Fig. 2 and Fig. 4) of a model's MLP inputs."""

from __future__ import annotations

import argparse
from pathlib import Path

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
    p.add_argument("model", metavar="MODEL", help="the unedited model: a local directory or builtin name")
    p.add_argument(
        "--factors", required=True, type=Path, metavar="DIR", help="factor (or eigenbasis) directory of MODEL"
    )
    p.add_argument("--layers", required=True, help="decoder layers to analyse: '22,23,24', '22-24' or 'all'")
    p.add_argument(
        "--proj", default="gate,up", help="MLP projections, from gate, up, down (default: gate,up)"
    )
    p.add_argument("--probes", required=True, type=Path, metavar="FILE", help="probe-set JSONL file")
    p.add_argument("--probe-set", help="name of the probe set in the table (default: the file name stem)")
    p.add_argument(
        "--clean",
        required=True,
        type=Path,
        metavar="CORPUS_DIR",
        help="corpus whose held-out split is clean text",
    )
    p.add_argument("--tasks", default="", help="comma-separated generated downstream tasks to measure too")
    p.add_argument("--basis", default="kfac,svd", help="kfac, svd or both (default: kfac,svd)")
    p.add_argument("--variant", default="base", help="name of the model in the table (default: base)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=10_000,
        help="tokens measured per source (default: 10000, as the paper)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default: 16)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of token subsampling and task items (default: 0)"
    )
    p.add_argument("--plot", type=Path, metavar="PNG", help="where to write the plot")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --plot file that is not an earlier band plot",
    )
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
    from transformers import AutoConfig

    from memkfac.bands import run_band_analysis
    from memkfac.corpora import load_split
    from memkfac.eigen import eigenbasis_for
    from memkfac.models import resolve_model
    from memkfac.paths import safe_name
    from memkfac.probes import load_probe_set
    from memkfac.targets import parse_layers

    progress = not args.quiet
    model_dir = resolve_model(args.model, progress=progress)
    bases = tuple(b.strip() for b in args.basis.split(",") if b.strip())
    table = run_band_analysis(
        model_dir,
        eigenbasis_for(args.factors, progress) if "kfac" in bases else None,
        parse_layers(args.layers, AutoConfig.from_pretrained(model_dir).num_hidden_layers),
        load_probe_set(args.probes),
        load_split(args.clean, "heldout"),
        projections=tuple(p.strip() for p in args.proj.split(",") if p.strip()),
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        bases=bases,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        variant=safe_name(args.variant, "variant"),
        probe_set=safe_name(args.probe_set or args.probes.stem, "probe set name"),
        plot_path=args.plot,
        progress=progress,
        overwrite=args.overwrite,
    )
    print(format_rows(table.to_pylist()))
    return 0
