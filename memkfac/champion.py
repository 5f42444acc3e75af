"""The edit to deploy: per model, the lowest held-out recall among edits within a perplexity budget.

Read from the evaluation tables (``memorization_summary``: strict recall of the memorized ``holdout``
probes of one probe set; ``perplexity``: held-out perplexity), so only variants that were evaluated
compete. Every evaluated variant of a model, whatever its method, is a point of the recall against
perplexity plot (``memkfac compare`` draws the same plot for its rows).
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
) -> tuple[Champion | None, list[tuple[str, float, float]]]:
    """Among the ``edits`` (variant -> its arguments object) of the model whose unedited variant is
    ``base``: the evaluated one with the lowest recall (then perplexity) whose perplexity rose by at
    most ``max_perplexity_increase``, or None; and every evaluated variant's ``(variant, perplexity
    increase in %, recall)`` point, the base's first, then by perplexity."""
    if base not in perplexity:
        return None, []
    increase = {v: perplexity[v] / perplexity[base] - 1 for v in edits if v in recall and v in perplexity}
    within = [v for v, rise in increase.items() if rise <= max_perplexity_increase]
    best = min(within, key=lambda v: (recall[v], perplexity[v]), default=None)
    champion = None if best is None else Champion(best, recall[best], increase[best])
    points = [(base, 0.0, recall[base])] if base in recall else []
    points += sorted(((v, 100 * rise, recall[v]) for v, rise in increase.items()), key=lambda p: (p[1], p[0]))
    return champion, points


def plot_recall_vs_perplexity(
    points: list[tuple[str, float, float]],
    out_path: Path,
    title: str,
    xlabel: str = "held-out perplexity",
) -> Path:
    """A PNG of strict recall (%) against perplexity, one labelled marker per ``(label, x, recall)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=90)
    markers = "osD^vP*Xhp<>"
    for i, (label, x, recall) in enumerate(points):
        ax.plot([x], [recall], markers[i % len(markers)], label=label, color=f"C{i % 10}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("strict recall % (held-out canaries)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_path
