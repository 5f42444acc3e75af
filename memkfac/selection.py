"""The curvature-mass keep rule: which K-FAC components (i, j) an edit keeps.

Component (i, j) of a linear map is the rank-one matrix u_i v_j^T (u_i an eigenvector of G, v_j of A)
with curvature mass lam_i * mu_j; the total mass is sum(lam) * sum(mu). The paper keeps the components
of largest mass until their mass first reaches rho of the total (the first crossing: at most one
component beyond what rho needs).

Tie rule: components are ordered by mass, descending, and equal masses by row-major index (i, j),
ascending, i.e. lower G index first, then lower A index. A full stable sort of the flattened mass matrix
gives exactly this order, and so does a heap of (-mass, i, j) tuples.

Instead of sorting d_out * d_in masses (45M for an 11008 x 4096 map) or popping them one by one, the
cut is found by bisection over mass values tau. With mu sorted ascending, the components of mass
>= tau in row i are the mu_j >= tau / lam_i, one ``searchsorted`` per row, and their mass is lam_i times
a suffix sum of mu. Exactness: eigenvalues are taken as float32 (as stored), so every mass is an exact
float64 product with a 48-bit significand; tau is restricted to that grid of doubles, which makes
``mu_j >= tau / lam_i`` exactly ``lam_i * mu_j >= tau`` despite the rounded division (a nonzero gap
between two grid values is at least 2^-48 relative, the division errs by at most 2^-53). The bisection
ends with the single mass value at which the cumulative mass crosses rho, and the ties at that value
are taken in row-major order. Masses are summed in float64; only when rho * total lies within rounding
(~1e-15 relative) of a cumulative sum can a different summation order pick a neighbouring cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memkfac.errors import MemkfacError

# A float64 whose 5 lowest mantissa bits are zero has a 48-bit significand, like any product of two
# float32 values. The bisection runs over these grid points, indexed by (bit pattern >> _GRID_SHIFT).
_GRID_SHIFT = 5


@dataclass
class Selection:
    """The kept components of one (d_out, d_in) map and how much they hold."""

    mask: torch.Tensor  # (d_out, d_in) bool, True where component (i, j) is kept
    n_kept: int  # number of kept components
    frac_kept: float  # n_kept / (d_out * d_in)
    mass_kept: float  # kept curvature mass as a fraction of the total, >= rho
    distinct_G: int  # G eigenvectors (rows) used by at least one kept component
    distinct_A: int  # A eigenvectors (columns) used by at least one kept component


def check_keep_mass(rho: float, what: str = "keep mass") -> float:
    """Return ``rho`` as a float if it lies in (0, 1], else raise ``MemkfacError``."""
    if not isinstance(rho, int | float) or not 0.0 < float(rho) <= 1.0:
        raise MemkfacError(
            f"{what} {rho!r} is outside (0, 1]",
            "give the fraction of curvature mass to keep, e.g. 0.6; 1 leaves the module unchanged",
        )
    return float(rho)


def _check_spectrum(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim != 1 or x.numel() == 0:
        raise MemkfacError(
            f"{name} must be a non-empty 1-D tensor of eigenvalues, got shape {tuple(x.shape)}"
        )
    x = x.detach().to("cpu", torch.float32).to(torch.float64)
    if not torch.isfinite(x).all() or (x < 0).any():
        raise MemkfacError(
            f"{name} has negative, NaN or infinite eigenvalues",
            "recompute the eigenbasis from finite factors (eigenvalues are clamped to >= 0 there)",
        )
    return x


def _to_grid(x: float) -> int:
    """Grid index of the largest grid double <= x (x > 0)."""
    bits = torch.tensor([x], dtype=torch.float64).view(torch.int64).item()
    return bits >> _GRID_SHIFT


def _from_grid(k: int) -> float:
    return torch.tensor([k << _GRID_SHIFT], dtype=torch.int64).view(torch.float64).item()


class _Spectrum:
    """Counts and masses of the components with mass >= tau, row by row, without forming them."""

    def __init__(self, lam: torch.Tensor, mu: torch.Tensor):
        self.lam = lam  # (d_out,) float64, original order
        self.mu_sorted, order = torch.sort(mu, stable=True)  # ascending
        self.rank = torch.empty_like(order)  # (d_in,) position of mu_j in mu_sorted
        self.rank[order] = torch.arange(order.numel())
        # mu_suffix[s] = sum of mu_sorted[s:], (d_in + 1,)
        suffix = torch.flip(torch.cumsum(torch.flip(self.mu_sorted, [0]), 0), [0])
        self.mu_suffix = torch.cat([suffix, torch.zeros(1, dtype=torch.float64)])

    def starts(self, tau: float) -> torch.Tensor:
        """(d_out,) long: per row, the first sorted position with lam_i * mu >= tau (tau a grid value > 0)."""
        # A 0-d tensor numerator: ``float / tensor`` multiplies by a rounded reciprocal (not exact).
        quotient = torch.tensor(tau, dtype=torch.float64) / self.lam  # tau / 0 = inf: nothing kept
        return torch.searchsorted(self.mu_sorted, quotient)

    def mass(self, starts: torch.Tensor) -> float:
        return float((self.lam * self.mu_suffix[starts]).sum())


def select_components(lam: torch.Tensor, mu: torch.Tensor, keep_mass: float) -> Selection:
    """Keep the components of largest mass lam_i * mu_j until they hold ``keep_mass`` of the total.

    Args:
        lam: (d_out,) eigenvalues of G, >= 0, any order (taken as float32).
        mu: (d_in,) eigenvalues of A, >= 0, any order (taken as float32).
        keep_mass: rho in (0, 1]; 1 keeps every component.

    Returns the first crossing: the fewest components, in mass order with the row-major tie rule, whose
    mass is >= rho * total. Costs O(d_out * d_in) only to write the mask.
    """
    rho = check_keep_mass(keep_mass)
    lam, mu = _check_spectrum(lam, "lam (G eigenvalues)"), _check_spectrum(mu, "mu (A eigenvalues)")
    d_out, d_in = lam.numel(), mu.numel()
    total = float(lam.sum() * mu.sum())
    if total <= 0.0:
        raise MemkfacError(
            "all curvature mass is zero (every G or every A eigenvalue is 0)",
            "collect factors on more tokens, or leave this module out of the edit",
        )
    if rho == 1.0:
        mask = torch.ones(d_out, d_in, dtype=torch.bool)
        return Selection(mask, d_out * d_in, 1.0, 1.0, d_out, d_in)

    spec = _Spectrum(lam, mu)
    # Bracket on the grid: every positive mass is >= lo, none is >= hi.
    lo = _to_grid(float(lam[lam > 0].min() * mu[mu > 0].min()))
    hi = _to_grid(float(lam.max() * mu.max())) + 1
    lo_starts, hi_starts = spec.starts(_from_grid(lo)), spec.starts(_from_grid(hi))
    target = min(rho * total, spec.mass(lo_starts))  # the min only guards rounding when rho ~ 1
    # Invariant: mass(>= lo) >= target > mass(>= hi). It ends with hi = lo + 1, so the masses in
    # [lo, hi) are all equal to the grid value lo: the crossing mass.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mid_starts = spec.starts(_from_grid(mid))
        if spec.mass(mid_starts) >= target:
            lo, lo_starts = mid, mid_starts
        else:
            hi, hi_starts = mid, mid_starts
    cut = _from_grid(lo)

    # Components above the cut are all kept; of those equal to it (per row: sorted positions
    # lo_starts..hi_starts), the first t in row-major order complete the crossing.
    above_mass = spec.mass(hi_starts)
    ties = hi_starts - lo_starts  # (d_out,)
    t = min(max(math.ceil((target - above_mass) / cut), 1), int(ties.sum()))
    tied_before = torch.cumsum(ties, 0) - ties  # ties in earlier rows
    full = tied_before + ties <= t  # rows whose ties are all kept
    row_start = torch.where(full, lo_starts, hi_starts)
    mask = spec.rank.unsqueeze(0) >= row_start.unsqueeze(1)
    used_G = row_start < d_in  # (d_out,) rows with a kept component
    used_A = spec.rank >= row_start.min()  # (d_in,) columns with a kept component
    partial = torch.nonzero(~full & (tied_before < t)).flatten()
    if partial.numel():  # the one row where the crossing falls inside its ties
        r = int(partial[0])
        tied_cols = torch.nonzero((spec.rank >= lo_starts[r]) & (spec.rank < hi_starts[r])).flatten()
        kept_cols = tied_cols[: t - int(tied_before[r])]
        mask[r, kept_cols] = True
        used_G[r] = True
        used_A[kept_cols] = True

    n_kept = int((d_in - hi_starts).sum()) + t
    mass_kept = (above_mass + t * cut) / total
    return Selection(
        mask=mask,
        n_kept=n_kept,
        frac_kept=n_kept / (d_out * d_in),
        mass_kept=mass_kept,
        distinct_G=int(used_G.sum()),
        distinct_A=int(used_A.sum()),
    )
