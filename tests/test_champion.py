"""The champion: the lowest held-out recall among evaluated edits within the perplexity budget."""

from __future__ import annotations

from memkfac.champion import Champion, choose_champion, plot_recall_vs_perplexity
from memkfac.editing import EditArguments


def test_lowest_recall_within_the_budget_wins():
    edits = {
        "m__k95": EditArguments(layers="1", keep_mass=0.95),
        "m__k60": EditArguments(layers="1", keep_mass=0.6),
        "m__svd": EditArguments(layers="1", method="svd"),
        "m__never": EditArguments(layers="1", keep_mass=0.5),  # not evaluated: does not compete
    }
    recall = {"m__base": 90.0, "m__k95": 20.0, "m__k60": 0.0, "m__svd": 10.0}
    perplexity = {"m__base": 10.0, "m__k95": 10.5, "m__k60": 13.0, "m__svd": 10.9}
    champion, points = choose_champion("m__base", edits, recall, perplexity, 0.10)
    assert champion == Champion("m__svd", 10.0, perplexity["m__svd"] / 10.0 - 1)
    # every evaluated variant (any method), the base first, then by perplexity increase in %
    assert [(v, round(x, 6), r) for v, x, r in points] == [
        ("m__base", 0.0, 90.0),
        ("m__k95", 5.0, 20.0),
        ("m__svd", 9.0, 10.0),
        ("m__k60", 30.0, 0.0),
    ]
    assert choose_champion("m__base", edits, recall, perplexity, 0.01)[0] is None
    assert choose_champion("m__base", edits, recall, {}, 0.10) == (None, [])


def test_recall_vs_perplexity_plot_is_a_png(tmp_path):
    out = plot_recall_vs_perplexity([("base", 10.0, 90.0), ("K-FAC", 10.5, 5.0)], tmp_path / "p.png", "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
