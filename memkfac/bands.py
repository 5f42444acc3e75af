"""Band activation analysis (paper section 4, Fig. 2; section 6, Fig. 4).

A K-FAC component of a weight W is the rank-one map u_i v_j^T with curvature mass lam_i * mu_j. On an
input x its activation is ||u_i v_j^T x|| = |v_j^T x| (u_i is a unit vector), so only the A-eigenvector
v_j matters. Components are ranked by mass and cut into bands (top 10%, 10-25%, 25-50%, bottom 50% of
components). A band's mean activation on a data source is the mean of |v_j^T x| over its components and
the source's tokens. The paper's finding: memorized tokens load the bottom band more, and the top band
less, than clean text; tasks that drop most after the edit look memorization-like.

Vectorised: per source we accumulate the exact sum of |U_A^T x| over tokens (one matmul per batch),
and each band's mean is a weighted average of those per-eigenvector means, weighted by how many of the
band's components use each v_j. No loop over the d_out * d_in components.

The SVD variant (the paper's control) uses W's right singular vectors, banded by singular value rank.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from memkfac.arguments import Checks
from memkfac.errors import MemkfacError
from memkfac.paths import atomic_file, check_output_file, memkfac_home, safe_name
from memkfac.targets import PROJECTIONS, LayerSpec, Projection, check_layers, resolve_layers

BAND_EDGES = (0.10, 0.25, 0.50)  # cumulative fractions of components, by descending mass rank
BAND_NAMES = ("top10", "10-25", "25-50", "bottom50")
CLEAN = "clean"


@dataclass
class BandBasis:
    """Projection directions of one module and how many components of each band use each of them."""

    V: torch.Tensor  # (d_in, k) unit directions: U_A for K-FAC, right singular vectors for SVD
    weights: torch.Tensor  # (k, n_bands) number of components in band b that read direction k
    basis: str  # "kfac" | "svd"
    module: str = ""  # full module name whose input is projected, e.g. "model.layers.22.mlp.gate_proj"
    layer: int = -1
    proj: str = ""


def _band_of_rank(n: int) -> torch.Tensor:
    """(n,) band of each rank 0..n-1: rank r is in band b when BAND_EDGES[b-1] <= r/n < BAND_EDGES[b]."""
    edges = torch.tensor(BAND_EDGES, dtype=torch.float64)
    return torch.bucketize(torch.arange(n, dtype=torch.float64) / n, edges, right=True)


def kfac_band_basis(lam: torch.Tensor, mu: torch.Tensor, U_A: torch.Tensor) -> BandBasis:
    """Band membership of the d_out * d_in K-FAC components, counted per A-eigenvector.

    lam: (d_out,) G eigenvalues; mu: (d_in,) A eigenvalues; U_A: (d_in, d_in) columns are eigenvectors.
    Eigenvalues are clamped at 0 (eigh can return tiny negatives). Ties in mass keep index order.
    """
    d_in = mu.numel()
    mass = (lam.double().clamp_min(0)[:, None] * mu.double().clamp_min(0)[None, :]).flatten()  # (d_out*d_in,)
    order = torch.argsort(mass, descending=True, stable=True)
    weights = torch.zeros(d_in, len(BAND_NAMES), dtype=torch.float64)
    weights.index_put_(
        (order % d_in, _band_of_rank(mass.numel())),
        torch.ones(mass.numel(), dtype=torch.float64),
        accumulate=True,
    )
    return BandBasis(V=U_A.float(), weights=weights, basis="kfac")


def svd_band_basis(W: torch.Tensor) -> BandBasis:
    """W (d_out, d_in)'s right singular vectors, one component each, banded by singular value rank."""
    _, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)  # singular values descending
    k = Vh.shape[0]
    weights = torch.nn.functional.one_hot(_band_of_rank(k), len(BAND_NAMES)).double()
    return BandBasis(V=Vh.T.float(), weights=weights, basis="svd")


@dataclass
class TokenSource:
    """Token sequences and, per sequence, the positions whose MLP inputs are measured."""

    sequences: list[list[int]]
    positions: list[list[int]]


def probe_source(probes, tokenizer, vocab_size: int) -> TokenSource:
    """Memorized text: prefix + suffix, measured at the positions that predict the suffix tokens."""
    from memkfac.generation import probes_token_ids

    sequences, positions = [], []
    for prompt, gold in probes_token_ids(probes, tokenizer, vocab_size):
        sequences.append(prompt + gold)
        positions.append(list(range(len(prompt) - 1, len(prompt) + len(gold) - 1)))
    return TokenSource(sequences, positions)


def text_source(texts: Sequence[str], tokenizer) -> TokenSource:
    """Plain texts (task items, documents), every position measured."""
    sequences = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    return TokenSource(sequences, [list(range(len(s))) for s in sequences])


def block_source(blocks: torch.Tensor) -> TokenSource:
    """Packed blocks (n_blocks, block_len) of general text, every position measured."""
    sequences = blocks.tolist()
    return TokenSource(sequences, [list(range(len(s))) for s in sequences])


def _cap(source: TokenSource, max_tokens: int, seed: int) -> TokenSource:
    """A seeded random subset of sequences with about ``max_tokens`` measured positions in total."""
    order = list(range(len(source.sequences)))
    random.Random(seed).shuffle(order)
    sequences, positions, total = [], [], 0
    for i in order:
        if total >= max_tokens:
            break
        keep = source.positions[i][: max_tokens - total]
        sequences.append(source.sequences[i][: keep[-1] + 1] if keep else [])
        positions.append(keep)
        total += len(keep)
    return TokenSource(
        [s for s, p in zip(sequences, positions, strict=True) if p], [p for p in positions if p]
    )


@torch.no_grad()
def projection_means(
    model,
    bases: list[BandBasis],
    source: TokenSource,
    batch_size: int = 16,
    max_tokens: int = 10_000,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[torch.Tensor], int]:
    """Mean |V^T x| per direction over the measured positions, for each basis (on its module's input x).

    One forward pre-hook per module reads x (B, T, d_in) and projects it on every basis of that module.
    Sequences are right-padded; padding is never measured (and with causal attention it is not seen by
    earlier positions). Returns ([(k,) float64 means per basis], n_tokens).
    """
    source = _cap(source, max_tokens, seed)
    n_tokens = sum(len(p) for p in source.positions)
    if n_tokens == 0:
        raise MemkfacError("a band-analysis data source has no tokens", "give every source some text")
    device = next(model.parameters()).device
    sums = [torch.zeros(b.V.shape[1], dtype=torch.float64) for b in bases]
    measured_now: list[torch.Tensor] = []  # the current batch's (B, T) mask of measured positions

    def hook_for(indices: list[int]):
        Vs = [bases[i].V.to(device) for i in indices]

        def hook(_module, inputs):
            x = inputs[0][measured_now[0]].float()  # (n_measured, d_in)
            for i, V in zip(indices, Vs, strict=True):
                sums[i] += (x @ V).abs().sum(0).double().cpu()

        return hook

    by_module: dict[str, list[int]] = {}
    for i, b in enumerate(bases):
        by_module.setdefault(b.module, []).append(i)
    handles = [
        model.get_submodule(m).register_forward_pre_hook(hook_for(idx)) for m, idx in by_module.items()
    ]
    try:
        starts = range(0, len(source.sequences), batch_size)
        for start in tqdm(starts, desc="band activations", unit="batch", disable=not progress):
            seqs = source.sequences[start : start + batch_size]
            width = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            attention = torch.zeros(len(seqs), width, dtype=torch.long)
            measured = torch.zeros(len(seqs), width, dtype=torch.bool)
            for row, (seq, pos) in enumerate(
                zip(seqs, source.positions[start : start + batch_size], strict=True)
            ):
                ids[row, : len(seq)] = torch.tensor(seq)
                attention[row, : len(seq)] = 1
                measured[row, pos] = True
            measured_now[:] = [measured.to(device)]
            model(input_ids=ids.to(device), attention_mask=attention.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return [s / n_tokens for s in sums], n_tokens


def band_means(basis: BandBasis, direction_means: torch.Tensor) -> torch.Tensor:
    """(n_bands,) mean activation over each band's components from (k,) per-direction means."""
    return (basis.weights * direction_means[:, None]).sum(0) / basis.weights.sum(0)


def band_activation_rows(
    model,
    bases: list[BandBasis],
    sources: dict[str, TokenSource],
    batch_size: int = 16,
    max_tokens: int = 10_000,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Rows of the ``band_activation`` table (without keys): one per (basis, band, source).

    ``sources`` maps a source name to its tokens and must include ``"clean"``, the reference of
    ``ratio_to_clean`` (the paper's memorized / clean ratio).
    """
    if CLEAN not in sources:
        raise MemkfacError(
            "band analysis needs a 'clean' source as the reference", "pass general held-out text as 'clean'"
        )
    means, counts = {}, {}
    for name, source in sources.items():
        per_direction, counts[name] = projection_means(
            model, bases, source, batch_size, max_tokens, seed, progress
        )
        means[name] = [band_means(b, m) for b, m in zip(bases, per_direction, strict=True)]
    rows = []
    for i, basis in enumerate(bases):
        clean = means[CLEAN][i]
        for name in sources:
            values = means[name][i]
            for b, band in enumerate(BAND_NAMES):
                rows.append(
                    {
                        "layer": basis.layer,
                        "proj": basis.proj,
                        "basis": basis.basis,
                        "band": band,
                        "source": name,
                        "n_tokens": counts[name],
                        "mean_activation": float(values[b]),
                        "ratio_to_clean": float(values[b] / clean[b]),
                    }
                )
    return rows


PLOT_SOFTWARE = "memkfac bands"  # in the PNG's metadata: marks the plots this module may replace


def is_band_plot(path: Path) -> bool:
    """Whether ``path`` is a plot written by ``plot_band_ratios`` (PNG text chunks precede the image)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.startswith(b"\x89PNG") and PLOT_SOFTWARE.encode() in head


def plot_band_ratios(
    rows: list[dict], out_path: Path, inputs: Sequence[Path | None] = (), overwrite: bool = False
) -> Path:
    """A PNG with one panel per (layer, proj, basis): bars of ratio_to_clean per band, one bar per source.

    An existing ``out_path`` is replaced only if it is an earlier band plot (or with ``overwrite``),
    never if it is one of ``inputs``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["layer"], r["proj"], r["basis"]) for r in rows})
    sources = [s for s in dict.fromkeys(r["source"] for r in rows) if s != CLEAN]
    if not panels or not sources:
        raise MemkfacError(
            "nothing to plot: no rows besides the clean reference",
            "measure at least one source besides 'clean'",
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True)
    width = 0.8 / len(sources)
    for ax, (layer, proj, basis) in zip(axes[0], panels, strict=True):
        ratio = {
            (r["source"], r["band"]): r["ratio_to_clean"]
            for r in rows
            if (r["layer"], r["proj"], r["basis"]) == (layer, proj, basis)
        }
        bands = [b for b in BAND_NAMES if any(k[1] == b for k in ratio)]
        for s, source in enumerate(sources):
            ax.bar(
                [i + (s - (len(sources) - 1) / 2) * width for i in range(len(bands))],
                [ratio[(source, b)] for b in bands],
                width,
                label=source,
            )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(bands)), bands)
        ax.set_title(f"layer {layer} {proj} ({basis})")
        ax.set_xlabel("band (by curvature mass)" if basis == "kfac" else "band (by singular value)")
    axes[0][0].set_ylabel("mean |v^T x| / clean")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    check_output_file(out_path, overwrite=overwrite, inputs=inputs, owns=is_band_plot)
    with atomic_file(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={"Software": PLOT_SOFTWARE})
    plt.close(fig)
    return out_path


Basis = Literal["kfac", "svd"]
BASES: tuple[Basis, ...] = get_args(Basis)


@dataclass
class BandArguments:
    """Which MLP maps band analysis reads, in which bases, on which sources, and how many tokens."""

    layers: LayerSpec | None = None  # None: the layers (and projections) the given edits change
    projections: tuple[Projection, ...] = ("gate", "up")
    tasks: tuple[str, ...] = ()  # generated downstream tasks measured as sources too
    bases: tuple[Basis, ...] = BASES  # kfac: curvature bands; svd: the singular-value control
    task_items: int = 200  # items per task
    max_tokens: int = 10_000  # tokens measured per source (the paper's)
    batch_size: int = 16  # sequences per forward
    seed: int = 0  # of token subsampling and task items

    def __post_init__(self):
        from memkfac.tasks import GENERATORS

        check = Checks()
        if self.layers is not None:
            with check.field("layers"):
                check_layers(self.layers)
        check.subset("projections", self.projections, PROJECTIONS)
        check.subset("bases", self.bases, BASES)
        unknown = [t for t in self.tasks if t not in GENERATORS]
        check.require(
            not unknown,
            "tasks",
            f"unknown generated task(s) {unknown}",
            f"use some of {', '.join(GENERATORS)}",
        )
        for name in ("task_items", "max_tokens", "batch_size"):
            check.at_least(name, getattr(self, name), 1)
        check.done()


def edited_modules(edits: Sequence, num_layers: int) -> tuple[list[int], tuple[str, ...]]:
    """The layers and projections band analysis reads by default: those the K-FAC edits among
    ``edits`` (arguments objects with ``method``, ``layers``, ``projections``) change, or every
    edit's when none is a K-FAC edit."""
    chosen = [e for e in edits if e.method == "kfac"] or list(edits)
    if not chosen:
        raise MemkfacError(
            "band analysis has no layers: none are given and there is no edit to take them from",
            "set the layers to analyse (bands.layers in the pipeline config, --layers on the command line)",
        )
    layers = sorted({i for e in chosen for i in resolve_layers(e, num_layers).layers})
    projections = {p for e in chosen for p in e.projections}
    return layers, tuple(p for p in PROJECTIONS if p in projections)


def run_band_analysis(
    model_dir: Path,
    eig_dir: Path | None,
    probes: list,
    clean_blocks: torch.Tensor,
    args: BandArguments,
    *,
    edits: Sequence = (),
    variant: str = "base",
    probe_set: str = "probes",
    plot_path: Path | None = None,
    root: Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
) -> pa.Table:
    """Band analysis of ``model_dir``'s MLP maps; writes the table and the plot.

    The maps are those of ``args.layers`` and ``args.projections``, or when ``args.layers`` is None
    those ``edits`` change (``edited_modules``). Sources: one per probe kind in ``probes``
    ("memorized", "control", ...), measured where the suffix is predicted; "clean" = ``clean_blocks``
    (n_blocks, block_len), general held-out text; one per generated downstream task in ``args.tasks``
    (query + gold answer). ``eig_dir`` must hold the eigenbasis of factors collected on this very
    model. The plot goes to ``plot_path`` (default ``MEMKFAC_HOME/plots/bands-<variant>-<probe_set>.png``);
    an existing file there is replaced only if it is an earlier band plot, or with ``overwrite``.
    The model runs on ``device`` in ``dtype`` (both checked first); only the analysed maps'
    eigenvectors are read. Returns the ``band_activation`` table.
    """
    from memkfac.devices import resolve_device
    from memkfac.editing import check_eigenbasis_model
    from memkfac.eigen import load_eigenbasis
    from memkfac.fingerprint import model_fingerprint
    from memkfac.generation import model_vocab_size
    from memkfac.models import load_model
    from memkfac.tables import make_table, new_run_id, write_table
    from memkfac.targets import find_targets
    from memkfac.tasks import generate_items

    device = resolve_device(device)
    bases = args.bases
    root = memkfac_home() if root is None else Path(root)
    plot_path = plot_path or root / "plots" / f"bands-{safe_name(variant)}-{safe_name(probe_set)}.png"
    inputs = [Path(model_dir), None if eig_dir is None else Path(eig_dir)]
    check_output_file(plot_path, overwrite=overwrite, inputs=inputs, owns=is_band_plot)  # before measuring
    if "kfac" in bases:
        _, meta = load_eigenbasis(Path(eig_dir), names=())  # the meta only: checked before the model loads
        check_eigenbasis_model(
            meta,
            Path(eig_dir),
            Path(model_dir),
            model_fingerprint(model_dir),
            "analyse the model the factors were collected on (band analysis uses the unedited model)",
        )
    model, tokenizer = load_model(Path(model_dir), dtype=dtype, device=device)
    if args.layers is None:
        layers, projections = edited_modules(edits, model.config.num_hidden_layers)
    else:
        layers, projections = resolve_layers(args, model.config.num_hidden_layers).layers, args.projections
    targets = find_targets(model, layers, projections)
    eigen = load_eigenbasis(Path(eig_dir), names=[t.name for t in targets])[0] if "kfac" in bases else {}
    band_bases = []
    for target in targets:
        found = []
        if "kfac" in bases:
            if target.name not in eigen:
                raise MemkfacError(
                    f"the eigenbasis in {eig_dir} has no {target.name}",
                    f"collect factors on layer {target.layer} ({target.proj}) or analyse tracked layers only",
                )
            e = eigen[target.name]
            found.append(kfac_band_basis(e.lam, e.mu, e.U_A))
        if "svd" in bases:
            found.append(svd_band_basis(model.get_submodule(target.name).weight.detach()))
        band_bases += [
            dataclasses.replace(b, module=target.name, layer=target.layer, proj=target.proj) for b in found
        ]

    sources = {CLEAN: block_source(clean_blocks)}
    for kind in dict.fromkeys(p.kind for p in probes):
        if kind in sources:
            raise MemkfacError(f"probe kind {kind!r} clashes with a source name", "rename that probe kind")
        sources[kind] = probe_source(
            [p for p in probes if p.kind == kind], tokenizer, model_vocab_size(model)
        )
    for task in args.tasks:
        items = generate_items(task, args.task_items, args.seed)
        sources[task] = text_source([i["query"] + " " + i["choices"][i["gold"]] for i in items], tokenizer)

    rows = band_activation_rows(
        model, band_bases, sources, args.batch_size, args.max_tokens, args.seed, progress
    )
    table = make_table("band_activation", rows, variant=variant, probe_set=probe_set, run_id=new_run_id())
    write_table("band_activation", table, root=root)
    plot_band_ratios(rows, plot_path, inputs, overwrite)
    return table
