"""Cheap label-free baselines of the K-FAC edit: no forget set, at most the K-FAC factors.

Recent follow-ups report that edits cheaper than the curvature-mass rule come close to it on some
measures, so the K-FAC row must beat these at matched perplexity to mean anything. Per edited map
W (d_out, d_in), with the eigenbasis G = U_G diag(lam) U_G^T, A = U_A diag(mu) U_A^T of its factors:

- ``identity_basis``: the keep-mass rule with the eigenbasis replaced by the identity. The energy of
  coordinate (i, j) is G_ii * A_jj (the K-FAC curvature of that single weight, the diagonals of the
  factors, G_ii = sum_k lam_k U_G[i, k]^2); ``memkfac.selection.select_components`` keeps the weights
  of largest energy until they hold rho of it and the rest are zeroed: W_new = W * M.
- ``block_deletion``: delete the flattest eigenblock: the components u_i v_j^T with u_i among the
  ``block_fraction`` of G eigenvectors of smallest eigenvalue *and* v_j among the same fraction of A's:
  W_new = W - P_G W P_A with P the projector on those flat eigenvectors. Only the (flat, flat) block of
  C = U_G^T W U_A becomes zero.
- ``noise``: add seeded Gaussian noise of a given Frobenius norm, ``noise_norm`` * ||W||_F (per module
  ``overrides``), so ``memkfac compare`` can give each module exactly the norm of the K-FAC edit's
  change there (times one scale it bisects to the K-FAC perplexity). Needs no eigenbasis.

The checkpoint is written like the K-FAC edit's: a Hugging Face directory plus ``memkfac_manifest.json``
with the arguments and per-module diagnostics (``rel_change`` = ||W_new - W||_F / ||W||_F).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch

import memkfac
from memkfac.arguments import Checks
from memkfac.checkpoint import checkpoint_kind, load_manifest, save_checkpoint
from memkfac.editing import (
    _module_seed,
    eigenbasis_record,
    load_edit_targets,
)
from memkfac.eigen import ModuleEigen
from memkfac.errors import MemkfacError
from memkfac.fingerprint import model_fingerprint
from memkfac.models import validate_model_dir
from memkfac.paths import claim_output
from memkfac.selection import check_keep_mass, select_components
from memkfac.targets import PROJECTIONS, LayerSpec, Projection, check_layers

LabelFreeMethod = Literal["identity_basis", "block_deletion", "noise"]
LABEL_FREE_METHODS: tuple[LabelFreeMethod, ...] = get_args(LabelFreeMethod)
LABEL_FREE = checkpoint_kind("label_free_edit")


@dataclass
class LabelFreeArguments:
    """One label-free baseline on the MLP maps of ``layers``; each method reads its own strength."""

    layers: LayerSpec
    projections: tuple[Projection, ...] = ("gate", "up")
    method: LabelFreeMethod = "identity_basis"
    keep_mass: float = 0.9  # identity_basis: fraction of standard-basis curvature energy kept, (0, 1]
    block_fraction: float = 0.5  # block_deletion: fraction of each side's flattest eigenvectors, [0, 1]
    noise_norm: float = 0.05  # noise: ||noise||_F / ||W||_F, >= 0
    overrides: dict[str, float] = field(default_factory=dict)  # noise: "layer.proj" -> its own noise_norm
    seed: int = 0  # noise: seeds each module's draw (with the module name)

    def __post_init__(self):
        check = Checks()
        check.one_of("method", self.method, LABEL_FREE_METHODS)
        with check.field("layers"):
            check_layers(self.layers)
        check.subset("projections", self.projections, PROJECTIONS)
        with check.field("keep_mass"):
            check_keep_mass(self.keep_mass)
        check.require(
            0.0 <= self.block_fraction <= 1.0,
            "block_fraction",
            f"block_fraction {self.block_fraction!r} is outside [0, 1]",
            "give the fraction of each side's flattest eigenvectors to delete, e.g. 0.5",
        )
        check.at_least("noise_norm", self.noise_norm, 0.0)
        for key, norm in self.overrides.items():
            check.require(
                isinstance(norm, int | float) and norm >= 0,
                "overrides",
                f"noise norm {norm!r} for {key} is negative or not a number",
                "give each module a relative norm >= 0",
            )
        check.done()

    def noise_norm_for(self, layer: int, proj: str) -> float:
        return self.overrides.get(f"{layer}.{proj}", self.noise_norm)


def standard_basis_energy(eig: ModuleEigen) -> tuple[torch.Tensor, torch.Tensor]:
    """``(diag G, diag A)``, (d_out,) and (d_in,) float32: the factors' diagonals from their eigenbasis."""
    lam = (eig.U_G.double() ** 2) @ eig.lam.double().clamp_min(0)
    mu = (eig.U_A.double() ** 2) @ eig.mu.double().clamp_min(0)
    return lam.float(), mu.float()


def identity_basis_weight(W: torch.Tensor, eig: ModuleEigen, rho: float) -> torch.Tensor:
    """W * M, M (d_out, d_in) the keep-mass mask over the standard-basis energies G_ii * A_jj."""
    lam, mu = standard_basis_energy(eig)
    return (W.double() * select_components(lam, mu, rho).mask.to(W.device)).to(W.dtype)


def flattest(eigenvalues: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the round(fraction * n) smallest eigenvalues (ties: lower index first)."""
    order = torch.sort(eigenvalues.double(), stable=True).indices
    return order[: round(fraction * eigenvalues.numel())]


def block_deletion_weight(W: torch.Tensor, eig: ModuleEigen, fraction: float) -> torch.Tensor:
    """W - P_G W P_A in float64, P_G / P_A the projectors on the flattest ``fraction`` of each side."""
    flat_G = eig.U_G.double()[:, flattest(eig.lam, fraction)].to(W.device)  # (d_out, k_G)
    flat_A = eig.U_A.double()[:, flattest(eig.mu, fraction)].to(W.device)  # (d_in, k_A)
    block = flat_G.T @ W.double() @ flat_A  # (k_G, k_A): the flat-flat block of C
    return (W.double() - flat_G @ block @ flat_A.T).to(W.dtype)


def noise_weight(W: torch.Tensor, rel_norm: float, seed: int) -> torch.Tensor:
    """W + E with E Gaussian (seeded, drawn on the CPU) scaled to ||E||_F = rel_norm * ||W||_F."""
    noise = torch.randn(W.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    noise *= rel_norm * torch.linalg.norm(W.double().cpu()) / torch.linalg.norm(noise)
    return (W.double() + noise.to(W.device)).to(W.dtype)


def edit_label_free(
    model_dir: Path,
    eig_dir: Path | None,
    args: LabelFreeArguments,
    out_dir: Path,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Apply ``args.method`` to ``model_dir`` and write the checkpoint to ``out_dir``; its manifest.

    ``eig_dir`` (an eigenbasis of factors collected on this model) is needed by every method but
    ``noise``. ``out_dir`` must be new, empty or, with ``overwrite``, an earlier label-free edit.
    """
    with claim_output(out_dir, LABEL_FREE, overwrite=overwrite, inputs=[model_dir, eig_dir]):
        return _edit_label_free(Path(model_dir), eig_dir, args, Path(out_dir), overwrite)


def _edit_label_free(
    model_dir: Path, eig_dir: Path | None, args: LabelFreeArguments, out_dir: Path, overwrite: bool
) -> dict:
    start = time.perf_counter()
    validate_model_dir(model_dir)
    base_fingerprint = model_fingerprint(model_dir)
    args, model, tokenizer, targets, eig_modules, eig_meta = load_edit_targets(
        model_dir, args, eig_dir, args.method != "noise", base_fingerprint
    )
    modules = []
    for target in targets:
        weight = model.get_submodule(target.name).weight
        W = weight.data
        if args.method == "identity_basis":
            W_new = identity_basis_weight(W, eig_modules[target.name], args.keep_mass)
        elif args.method == "block_deletion":
            W_new = block_deletion_weight(W, eig_modules[target.name], args.block_fraction)
        else:
            rel = args.noise_norm_for(target.layer, target.proj)
            W_new = noise_weight(W, rel, _module_seed(args.seed, target.name))
        if not torch.isfinite(W_new).all():
            raise MemkfacError(f"{args.method} produced NaN or Inf in {target.name}", "check the eigenbasis")
        change = float(torch.linalg.norm(W_new.double() - W.double()) / torch.linalg.norm(W.double()))
        weight.data.copy_(W_new)
        modules.append(
            {"name": target.name, "layer": target.layer, "proj": target.proj, "rel_change": change}
        )
    manifest = {
        "kind": "label_free_edit",
        "memkfac_version": memkfac.__version__,
        "base_model": {"dir": str(model_dir), "fingerprint": base_fingerprint},
        "eigenbasis": eigenbasis_record(eig_dir, eig_meta),
        "arguments": asdict(args),
        "modules": modules,
        "edit_seconds": round(time.perf_counter() - start, 3),
    }
    save_checkpoint(model, tokenizer, out_dir, manifest, overwrite=overwrite, inputs=[model_dir, eig_dir])
    return load_manifest(out_dir)
