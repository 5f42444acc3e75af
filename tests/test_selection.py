"""The curvature-mass keep rule against a brute-force full sort, ties included."""

from __future__ import annotations

import pytest
import torch

from memkfac.errors import MemkfacError
from memkfac.selection import select_components


def brute_force_mask(lam: torch.Tensor, mu: torch.Tensor, rho: float) -> torch.Tensor:
    """The rule written plainly: stable full sort of all masses (ties in row-major order), first crossing."""
    lam, mu = lam.float().double(), mu.float().double()
    masses = torch.outer(lam, mu).flatten()
    order = torch.sort(-masses, stable=True).indices  # descending mass, equal masses by flat index
    cumulative = torch.cumsum(masses[order], 0)
    target = torch.tensor([rho * float(lam.sum() * mu.sum())], dtype=torch.float64)
    n_kept = min(int(torch.searchsorted(cumulative, target)) + 1, masses.numel())
    mask = torch.zeros(masses.numel(), dtype=torch.bool)
    mask[order[:n_kept]] = True
    return mask.view(lam.numel(), mu.numel())


def random_spectrum(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "heavy":  # a few large eigenvalues, a long small tail
        return torch.rand(n, generator=g) ** 6
    if kind == "integers":  # many exact ties among the masses, zeros included
        return torch.randint(0, 4, (n,), generator=g).float()
    return 1.0 + 0.01 * torch.randint(0, 2, (n,), generator=g).float()  # "flat": two values


@pytest.mark.parametrize("seed, kind", [(0, "heavy"), (1, "integers"), (2, "flat")])
def test_equals_brute_force_full_sort(seed, kind):
    g = torch.Generator().manual_seed(seed)
    checked = 0
    while checked < 60:
        d_out, d_in = (int(x) for x in torch.randint(1, 48, (2,), generator=g))
        lam, mu = random_spectrum(kind, d_out, g), random_spectrum(kind, d_in, g)
        if lam.sum() == 0 or mu.sum() == 0:
            continue
        rho = float(torch.rand(1, generator=g)) * 0.999 + 0.001
        sel = select_components(lam, mu, rho)
        expected = brute_force_mask(lam, mu, rho)
        assert torch.equal(sel.mask, expected), (kind, d_out, d_in, rho)
        assert sel.n_kept == int(expected.sum())
        assert sel.distinct_G == int(expected.any(1).sum()) and sel.distinct_A == int(expected.any(0).sum())
        checked += 1


def test_ties_are_broken_by_row_major_index():
    # All 12 masses are equal: half the mass is the first 6 components in row-major order.
    sel = select_components(torch.ones(3), torch.ones(4), 0.5)
    assert sel.mask.flatten().tolist() == [True] * 6 + [False] * 6
    # Masses 2,2 / 1,1 (rows): 0.7 of 6 needs 2 + 2 of the first row, then the first of the tied second row.
    sel = select_components(torch.tensor([2.0, 1.0]), torch.ones(2), 0.7)
    assert sel.mask.tolist() == [[True, True], [True, False]]


def test_mass_is_monotone_and_overshoots_by_at_most_one_component():
    g = torch.Generator().manual_seed(3)
    lam, mu = torch.rand(64, generator=g) ** 3, torch.rand(48, generator=g) ** 3
    masses = torch.outer(lam.double(), mu.double())
    total = float(masses.sum())
    previous = None
    for rho in torch.linspace(0.01, 1.0, 60).tolist():
        sel = select_components(lam, mu, rho)
        kept = float(masses[sel.mask].sum())
        assert sel.mass_kept == pytest.approx(kept / total, rel=1e-12)
        assert sel.mass_kept >= rho * (1 - 1e-12)
        # Dropping the smallest kept component falls below rho: the first crossing.
        assert (kept - float(masses[sel.mask].min())) / total < rho
        if previous is not None:
            assert sel.n_kept >= previous.n_kept and sel.mass_kept >= previous.mass_kept
            assert not (previous.mask & ~sel.mask).any()  # kept sets are nested
        previous = sel


def test_rho_just_below_one_keeps_every_positive_component():
    # The cut is the smallest positive mass: exact comparisons are needed to keep it (and none of the zeros).
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        lam, mu = torch.rand(40, generator=g), torch.rand(30, generator=g)
        lam[torch.rand(40, generator=g) < 0.5] = 0.0
        if lam.sum() == 0:
            continue
        sel = select_components(lam, mu, 1 - 1e-12)
        assert torch.equal(sel.mask, torch.outer(lam, mu) > 0)
        assert torch.equal(sel.mask, brute_force_mask(lam, mu, 1 - 1e-12))


def test_rho_one_keeps_everything():
    sel = select_components(torch.rand(5), torch.rand(7), 1.0)
    assert sel.mask.all() and sel.n_kept == 35 and sel.frac_kept == 1.0 and sel.mass_kept == 1.0


def test_large_spectra_keep_exactly_the_heaviest_components():
    g = torch.Generator().manual_seed(4)
    lam, mu = torch.rand(2048, generator=g) ** 4, torch.rand(1024, generator=g) ** 4
    sel = select_components(lam, mu, 0.6)
    masses = torch.outer(lam.double(), mu.double())
    assert sel.n_kept == int(sel.mask.sum())
    # Every kept component outweighs every dropped one.
    assert float(masses[sel.mask].min()) >= float(masses[~sel.mask].max())


@pytest.mark.parametrize("rho", [0.0, -0.5, 1.5, float("nan")])
def test_rho_outside_unit_interval_is_refused(rho):
    with pytest.raises(MemkfacError, match=r"outside \(0, 1\]"):
        select_components(torch.rand(3), torch.rand(3), rho)


@pytest.mark.parametrize(
    "lam, message",
    [
        (torch.tensor([1.0, float("nan")]), "NaN"),
        (torch.tensor([1.0, -1.0]), "negative"),
        (torch.zeros(2), "zero"),
        (torch.ones(2, 2), "1-D"),
    ],
)
def test_bad_spectra_are_refused(lam, message):
    with pytest.raises(MemkfacError, match=message):
        select_components(lam, torch.rand(3), 0.5)
