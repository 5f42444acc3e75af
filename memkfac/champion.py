"""The edit to deploy: per model, the lowest held-out recall among edits within a perplexity budget.

Read from the evaluation tables (``memorization_summary``: strict recall of the memorized ``holdout``
probes of one probe set; ``perplexity``: held-out perplexity), so only variants that were evaluated
compete. The K-FAC edits of a model also give the recall/perplexity trade-off against rho, plotted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from memkfac.paths import atomic_file


@dataclass(frozen=True)
class Champion:
    variant: str
    strict_pct: float  # strict recall of the held-out memorized probes
    perplexity_increase: float  # relative to the unedited variant


def evaluated(root: Path | None, probe_set: str) -> tuple[dict[str, float], dict[str, float]]:
    """``(recall, perplexity)`` by variant from the tables under ``root`` (default MEMKFAC_HOME)."""
    from memkfac.tables import read_table

    recall = {
        r["variant"]: r["strict_pct"]
        for r in read_table("memorization_summary", root).to_pylist()
        if r["probe_set"] == probe_set and r["kind"] == "memorized" and r["split"] == "holdout"
    }
    perplexity = {r["variant"]: r["perplexity"] for r in read_table("perplexity", root).to_pylist()}
    return recall, perplexity


def choose_champion(
    base: str,
    edits: Mapping[str, object],
    recall: Mapping[str, float],
    perplexity: Mapping[str, float],
    max_perplexity_increase: float,
) -> tuple[Champion | None, list[tuple[float, float, float]]]:
    """Among the ``edits`` (variant -> its arguments object) of the model whose unedited variant is
    ``base``: the evaluated one with the lowest recall (then perplexity) whose perplexity rose by at
    most ``max_perplexity_increase``, or None; and the K-FAC edits' ``(rho, recall, perplexity
    increase)`` points, by rho."""
    if base not in perplexity:
        return None, []
    increase = {v: perplexity[v] / perplexity[base] - 1 for v in edits if v in recall and v in perplexity}
    within = [v for v, rise in increase.items() if rise <= max_perplexity_increase]
    best = min(within, key=lambda v: (recall[v], perplexity[v]), default=None)
    champion = None if best is None else Champion(best, recall[best], increase[best])
    points = sorted(
        (args.keep_mass, recall[v], increase[v])
        for v, args in edits.items()
        if v in increase and args.method == "kfac"
    )
    return champion, points


def plot_recall_vs_rho(points: list[tuple[float, float, float]], out_path: Path, title: str) -> Path:
    """A PNG of strict recall (left axis) and perplexity increase (right axis) against rho."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=90)
    rho = [p[0] for p in points]
    ax.plot(rho, [p[1] for p in points], "o-", color="tab:red", label="strict recall % (held-out canaries)")
    ax.set_xlabel("rho (curvature mass kept)")
    ax.set_ylabel("strict recall %")
    twin = ax.twinx()
    twin.plot(rho, [100 * p[2] for p in points], "s--", color="tab:blue", label="perplexity increase %")
    twin.set_ylabel("perplexity increase %")
    ax.legend(loc="upper left", fontsize=7)
    twin.legend(loc="lower right", fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_path
