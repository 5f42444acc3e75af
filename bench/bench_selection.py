"""Benchmark: vectorised curvature-mass selection vs the reference heap, on 11008 x 4096 spectra.

The reference is the official code's algorithm (Goodfire ``kfac_treatment_pairwise.py``): a k-way-merge
heap over the rows of the sorted mass matrix that pops components in descending mass, one Python step
per kept component, until the kept mass first reaches rho of the total. Written here with the same tie
rule as ``memkfac.selection`` (equal masses: lower (i, j) first), so the masks must be identical.

Spectra (OLMo-2-7B MLP shape, d_out = 11008, d_in = 4096, rho = 0.6, eigenvalues descending):
- heavy-tailed: lam_i ~ U(0.5, 1.5) / (i + 1), the same for mu (keeps well under 1%);
- flat: lam, mu ~ U(0, 1) (keeps about a quarter).

Run: ``python bench/bench_selection.py`` (one torch thread; about a minute, most of it in the heap).
Prints a table and writes ``bench/results/bench_selection.json``.
"""

from __future__ import annotations

import heapq

import torch

from memkfac.selection import select_components

from common import timed, write_result

D_OUT, D_IN, RHO = 11008, 4096, 0.6


def heap_select(lam: torch.Tensor, mu: torch.Tensor, rho: float) -> torch.Tensor:
    """Reference: pop (i, j) in descending lam_i * mu_j (ties: lower i, then lower j) until rho is reached.

    Rows walk mu in descending order (equal values by lower j), so each row's heads come out in the
    heap's key order. Returns the (d_out, d_in) bool mask.
    """
    lam64, mu64 = lam.float().double(), mu.float().double()
    lam_list = lam64.tolist()
    order = torch.sort(-mu64, stable=True).indices.tolist()  # descending mu, ties by lower j
    mu_sorted = [mu64[j].item() for j in order]
    target = rho * float(lam64.sum() * mu64.sum())
    d_in = len(order)
    heap = [(-lam_i * mu_sorted[0], i, order[0], 0) for i, lam_i in enumerate(lam_list) if lam_i > 0]
    heapq.heapify(heap)
    kept = bytearray(len(lam_list) * d_in)
    mass = 0.0
    while mass < target and heap:
        neg_mass, i, j, pos = heap[0]
        mass -= neg_mass
        kept[i * d_in + j] = 1
        if pos + 1 < d_in:
            heapq.heapreplace(heap, (-lam_list[i] * mu_sorted[pos + 1], i, order[pos + 1], pos + 1))
        else:
            heapq.heappop(heap)
    return torch.frombuffer(kept, dtype=torch.uint8).view(len(lam_list), d_in).bool()


def spectra(kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def one(n):
        if kind == "heavy-tailed":
            values = (0.5 + torch.rand(n, generator=g)) / torch.arange(1, n + 1)
        else:
            values = torch.rand(n, generator=g)
        return torch.sort(values, descending=True).values

    return one(D_OUT), one(D_IN)


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for kind in ("heavy-tailed", "flat"):
        lam, mu = spectra(kind)
        runs = [timed(lambda lam=lam, mu=mu: select_components(lam, mu, RHO)) for _ in range(3)]
        sel, times = runs[0][0], [seconds for _, seconds in runs]
        reference, heap_s = timed(lambda lam=lam, mu=mu: heap_select(lam, mu, RHO))
        assert torch.equal(sel.mask, reference), f"{kind}: masks differ"
        rows.append(
            dict(
                spectrum=kind,
                d_out=D_OUT,
                d_in=D_IN,
                rho=RHO,
                n_kept=sel.n_kept,
                frac_kept=sel.frac_kept,
                vectorised_s=min(times),
                heap_s=heap_s,
                speedup=heap_s / min(times),
                masks_identical=True,
            )
        )
        print(f"{kind}: done", flush=True)

    print(f"\n{'spectrum':<14} {'kept':>10} {'frac':>8} {'vectorised s':>13} {'heap s':>9} {'speedup':>8}")
    for r in rows:
        print(
            f"{r['spectrum']:<14} {r['n_kept']:>10,} {r['frac_kept']:>8.3%} {r['vectorised_s']:>13.3f} "
            f"{r['heap_s']:>9.2f} {r['speedup']:>7.0f}x"
        )
    write_result("bench_selection", {"rows": rows})
    print("masks identical")


if __name__ == "__main__":
    main()
