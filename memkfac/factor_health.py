"""Whether collected K-FAC factors are usable: finite, symmetric and positive semi-definite, one token
count for every module, matching the index.

The factors are fp32 means of outer products, so symmetry and PSD hold up to rounding: the tolerances
are relative to each factor's largest entry and eigenvalue.
"""

from __future__ import annotations

from pathlib import Path

import torch

SYMMETRY_RTOL = 1e-5  # max |X - X^T| relative to max |X|
PSD_RTOL = 1e-6  # smallest eigenvalue >= -PSD_RTOL * largest (fp32 sums)


def check_factors(factor_dir: Path) -> dict:
    """The worst finiteness, asymmetry and negative curvature over every module's A and G, the token
    counts, and ``problems`` (empty when the factors are usable)."""
    from memkfac.factor_store import load_factors, read_index

    modules = load_factors(factor_dir)  # validates the index and every shard first
    index = read_index(factor_dir)
    finite, asymmetry, negativity, tokens = True, 0.0, 0.0, set()
    for f in modules.values():
        tokens.add(f.tokens)
        for X in (f.A, f.G):
            X = X.double()
            finite &= bool(torch.isfinite(X).all())
            scale = X.abs().max().clamp_min(1e-30)
            asymmetry = max(asymmetry, float((X - X.T).abs().max() / scale))
            eig = torch.linalg.eigvalsh((X + X.T) / 2)
            negativity = max(negativity, float(-eig[0] / eig[-1].clamp_min(1e-30)))
    problems = [] if finite else ["non-finite entries"]
    problems += [f"asymmetry {asymmetry:.2e} above {SYMMETRY_RTOL}"] if asymmetry > SYMMETRY_RTOL else []
    problems += [f"negative curvature {negativity:.2e} above {PSD_RTOL}"] if negativity > PSD_RTOL else []
    if sorted(tokens) != [index["tokens"]] or index["tokens"] <= 0:
        problems.append(f"token counts {sorted(tokens)} differ from the index's {index['tokens']}")
    if len(modules) != len(index["targets"]):
        problems.append(f"{len(modules)} modules loaded, the index lists {len(index['targets'])}")
    return {
        "problems": problems,
        "finite": finite,
        "max_relative_asymmetry": asymmetry,
        "max_relative_negative_eigenvalue": negativity,
        "tokens_per_module": sorted(tokens),
        "index_tokens": index["tokens"],
        "modules": len(modules),
    }
