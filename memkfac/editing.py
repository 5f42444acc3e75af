"""The K-FAC curvature-mass edit of MLP weights, its controls, and the whole-model edit.

Per edited map W (d_out, d_in) with eigenbasis G = U_G diag(lam) U_G^T, A = U_A diag(mu) U_A^T:
    C = U_G^T W U_A,   W_new = U_G (C * M) U_A^T
where M (d_out, d_in) is the kept mask of ``memkfac.selection.select_components`` (the paper's product
rule). Computed in float64, cast back to W's dtype; rho = 1 leaves W untouched (byte-identical).

Controls, for comparison at the same keep setting:
- ``per_side``: each side keeps its top eigenvectors by its own eigenvalue fraction rho,
  W_new = P_G W P_A (the paper code's ``apply_kfac`` ablation).
- ``svd``: drop the smallest ``svd_drop`` fraction of W's singular directions (the paper's SVD baseline;
  rho is not used).
- ``random``: the K-FAC mask at rho (same component count, same rows and columns used) applied in a
  seeded Haar-random orthonormal basis instead of the curvature eigenbasis.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import torch
from tqdm import tqdm
from transformers import AutoConfig

import memkfac
from memkfac.arguments import Checks
from memkfac.checkpoint import checkpoint_kind, load_manifest, save_checkpoint
from memkfac.devices import resolve_device
from memkfac.eigen import ModuleEigen, load_eigenbasis
from memkfac.errors import MemkfacError
from memkfac.fingerprint import model_fingerprint
from memkfac.models import load_model, validate_model_dir
from memkfac.paths import claim_output
from memkfac.selection import check_keep_mass, select_components
from memkfac.targets import (
    PROJECTIONS,
    LayerSpec,
    Projection,
    Target,
    check_layers,
    find_targets,
    resolve_layers,
)

EditMethod = Literal["kfac", "per_side", "svd", "random"]
METHODS: tuple[EditMethod, ...] = get_args(EditMethod)
EDIT = checkpoint_kind("edit")
_OVERRIDE_KEY = re.compile(r"^(\d+)\.(gate|up|down)$")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise MemkfacError(f"unknown edit method {method!r}", f"choose one of {', '.join(METHODS)}")


@dataclass
class EditArguments:
    """What to edit and how. ``overrides`` maps "layer.proj" (e.g. "23.gate") to its own rho."""

    layers: LayerSpec  # decoder layers; a spec ("22-24") is resolved against the model by edit_model
    projections: tuple[Projection, ...] = ("gate", "up")
    keep_mass: float = 0.6  # rho: the fraction of curvature mass kept, in (0, 1]
    overrides: dict[str, float] = field(default_factory=dict)
    method: EditMethod = "kfac"
    svd_drop: float = 0.25  # svd: fraction of the smallest singular directions removed
    seed: int = 0  # random: seeds each module's basis (with the module name)

    def __post_init__(self):
        check = Checks()
        with check.field("method"):
            _check_method(self.method)
        with check.field("layers"):
            check_layers(self.layers)
        check.subset("projections", self.projections, PROJECTIONS)
        with check.field("keep_mass"):
            check_keep_mass(self.keep_mass)
        for key, rho in self.overrides.items():
            match = _OVERRIDE_KEY.match(key)
            check.require(
                match is not None
                and (isinstance(self.layers, str) or int(match.group(1)) in self.layers)
                and match.group(2) in self.projections,
                "overrides",
                f"keep-mass override {key!r} names no edited module",
                f"write LAYER.PROJ with LAYER in {self.layers} and PROJ in {list(self.projections)}, "
                "e.g. 23.gate=0.8",
            )
            with check.field("overrides"):
                check_keep_mass(rho, f"keep mass for {key}")
        check.require(
            0.0 <= self.svd_drop < 1.0,
            "svd_drop",
            f"svd_drop {self.svd_drop!r} is outside [0, 1)",
            "give the fraction of singular directions to remove, e.g. 0.25",
        )
        check.done()

    def keep_mass_for(self, layer: int, proj: str) -> float:
        """rho for one module: its override, else ``keep_mass``."""
        return self.overrides.get(f"{layer}.{proj}", self.keep_mass)


@dataclass
class WeightEdit:
    """Diagnostics of one edited weight."""

    n_kept: int  # components kept: K-FAC pairs (i, j), or singular directions for svd
    n_total: int  # components available: d_out * d_in, or min(d_out, d_in) for svd
    frac_kept: float  # n_kept / n_total
    mass_kept: float | None  # kept curvature mass / total (None for svd)
    distinct_G: int | None  # G eigenvectors used (basis vectors on the output side; None for svd)
    distinct_A: int | None  # A eigenvectors used (input side; None for svd)
    rel_change: float  # ||W_new - W||_F / ||W||_F
    skipped: bool  # nothing to remove (rho = 1, or svd_drop = 0): W returned as is


def _top_eigenvectors(eigenvalues: torch.Tensor, rho: float) -> torch.Tensor:
    """Indices of the fewest largest eigenvalues whose sum is >= rho of the total (ties: lower index)."""
    values, order = torch.sort(eigenvalues.double(), descending=True, stable=True)
    cumulative = torch.cumsum(values, 0)
    return order[: min(int(torch.searchsorted(cumulative, rho * cumulative[-1])) + 1, values.numel())]


def _haar_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, n) float64 orthogonal matrix drawn from the Haar measure (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _project(W: torch.Tensor, U_G: torch.Tensor, mask: torch.Tensor, U_A: torch.Tensor) -> torch.Tensor:
    """U_G ((U_G^T W U_A) * mask) U_A^T in float64; W (d_out, d_in), U_G (d_out, d_out), U_A (d_in, d_in)."""
    U_G, U_A = U_G.to(W.device, torch.float64), U_A.to(W.device, torch.float64)
    C = U_G.T @ W.double() @ U_A
    return U_G @ (C * mask.to(C.device)) @ U_A.T


def edit_weight(
    W: torch.Tensor,
    eig: ModuleEigen | None,
    rho: float | None,
    method: str = "kfac",
    svd_drop: float = 0.25,
    seed: int = 0,
) -> tuple[torch.Tensor, WeightEdit]:
    """Edit one weight W (d_out, d_in). Returns ``(W_new, diagnostics)``; W_new has W's dtype and device.

    ``eig`` (the eigenbasis of W's factors) is needed by every method but ``svd``; ``seed`` is used by
    ``random`` only; ``rho`` is ignored by ``svd``. A skipped edit returns W itself. The float64
    projections run on W's device (eigenbases stay on the CPU and are moved per weight); the mask
    selection and the random bases are always drawn on the CPU, so a GPU edit keeps the same components.
    """
    _check_method(method)
    d_out, d_in = W.shape
    if method == "svd":
        n_total = min(d_out, d_in)
        rank = n_total - round(svd_drop * n_total)
        if rank == n_total:
            return W, WeightEdit(n_total, n_total, 1.0, None, None, None, 0.0, True)
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        W_new = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        stats = dict(n_kept=rank, n_total=n_total, mass_kept=None, distinct_G=None, distinct_A=None)
    else:
        if rho == 1.0:
            n = d_out * d_in
            return W, WeightEdit(n, n, 1.0, 1.0, d_out, d_in, 0.0, True)
        U_G, U_A = eig.U_G, eig.U_A
        if method == "per_side":
            top_G, top_A = _top_eigenvectors(eig.lam, rho), _top_eigenvectors(eig.mu, rho)
            mask = torch.zeros(d_out, d_in, dtype=torch.bool)
            mask[top_G.unsqueeze(1), top_A.unsqueeze(0)] = True
            lam, mu = eig.lam.double(), eig.mu.double()
            mass = float(lam[top_G].sum() * mu[top_A].sum() / (lam.sum() * mu.sum()))  # >= rho^2
            r_G, r_A = top_G.numel(), top_A.numel()
            stats = dict(n_kept=r_G * r_A, mass_kept=mass, distinct_G=r_G, distinct_A=r_A)
        else:
            sel = select_components(eig.lam, eig.mu, rho)
            mask = sel.mask
            stats = dict(
                n_kept=sel.n_kept,
                mass_kept=sel.mass_kept,
                distinct_G=sel.distinct_G,
                distinct_A=sel.distinct_A,
            )
            if method == "random":
                generator = torch.Generator().manual_seed(seed)
                U_G, U_A = _haar_orthogonal(d_out, generator), _haar_orthogonal(d_in, generator)
        W_new = _project(W, U_G, mask, U_A)
        stats["n_total"] = d_out * d_in
    W_new = W_new.to(W.dtype)
    rel_change = float(torch.linalg.norm(W_new.double() - W.double()) / torch.linalg.norm(W.double()))
    return W_new, WeightEdit(
        frac_kept=stats["n_kept"] / stats["n_total"], rel_change=rel_change, skipped=False, **stats
    )


def _module_seed(seed: int, name: str) -> int:
    """A per-module seed that depends on the config seed and the module name only (not on order)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 1


def _check_eigen(target: Target, eig: ModuleEigen | None, eig_dir: Path) -> None:
    fix = f"recompute the factors and eigenbasis for this model, or drop layer {target.layer} from the edit"
    if eig is None:
        raise MemkfacError(f"the eigenbasis in {eig_dir} has no module {target.name}", fix)
    d_out, d_in = target.out_features, target.in_features
    want = {"lam": (d_out,), "U_G": (d_out, d_out), "mu": (d_in,), "U_A": (d_in, d_in)}
    for key, shape in want.items():
        tensor = getattr(eig, key)
        if tuple(tensor.shape) != shape:
            raise MemkfacError(
                f"shape mismatch for {target.name}: eigenbasis {key} is {tuple(tensor.shape)}, "
                f"the model's ({d_out} x {d_in}) weight needs {shape}",
                fix,
            )
        if not torch.isfinite(tensor).all():
            raise MemkfacError(
                f"the eigenbasis {key} of {target.name} in {eig_dir} has NaN or Inf values", fix
            )


def eigenbasis_record(eig_dir: Path | None, eig_meta: dict | None) -> dict | None:
    """What an edit's manifest says of the eigenbasis it used (None: it used none): the check of an
    edited model compares ``factor_index_sha256`` with the current factors."""
    if eig_meta is None:
        return None
    return {
        "dir": str(eig_dir),
        "model_fingerprint": eig_meta["model_fingerprint"],
        "factor_index_sha256": eig_meta["factor_index_sha256"],
    }


class EditTargets(NamedTuple):
    """What an edit reads, checked (``load_edit_targets``)."""

    args: object  # the edit's arguments, its layer spec resolved to indices
    model: torch.nn.Module
    tokenizer: object
    targets: list[Target]
    eigen: dict[str, ModuleEigen]  # the targets' eigenvectors ({} when the method needs none)
    eig_meta: dict | None  # the eigenbasis's meta (None when the method needs none)


def load_edit_targets(
    model_dir: Path, args, eig_dir: Path | None, needs_eigen: bool, base_fingerprint: str
) -> EditTargets:
    """Everything an edit of ``args.layers`` x ``args.projections`` of ``model_dir`` (fingerprint
    ``base_fingerprint``) reads; ``args`` is any edit's arguments (``method``, ``layers``,
    ``projections``). All is checked before anything is changed: an eigenbasis is given when the
    method ``needs_eigen`` and was computed for this model (checked before the model loads), the
    layers exist, each target weight is finite, and the eigenbasis holds every target with the right
    shapes and finite values. The model is loaded on the CPU in the dtype it is stored in, so untouched
    tensors are written back as they were; only the targets' eigenvectors are read."""
    if needs_eigen and eig_dir is None:
        raise MemkfacError(f"method {args.method!r} needs an eigenbasis", "pass the factors directory")
    eig_meta = None
    if needs_eigen:
        _, eig_meta = load_eigenbasis(Path(eig_dir), names=())  # the meta only, before the model
        check_eigenbasis_model(eig_meta, eig_dir, model_dir, base_fingerprint)
    hf_config = AutoConfig.from_pretrained(model_dir)
    num_layers = hf_config.num_hidden_layers
    args = resolve_layers(args, num_layers)
    missing = [i for i in args.layers if not 0 <= i < num_layers]
    if missing:
        raise MemkfacError(
            f"layer(s) {missing} are not in {model_dir}, which has layers 0..{num_layers - 1}",
            f"choose layers between 0 and {num_layers - 1}",
        )
    model, tokenizer = load_model(model_dir, dtype=_stored_dtype(hf_config))
    targets = find_targets(model, args.layers, args.projections)
    eigen = load_eigenbasis(Path(eig_dir), names=[t.name for t in targets])[0] if needs_eigen else {}
    for target in targets:
        if not torch.isfinite(model.get_submodule(target.name).weight).all():
            raise MemkfacError(
                f"the weight of {target.name} in {model_dir} has NaN or Inf values",
                "the base model is damaged: re-create or re-download it",
            )
        if needs_eigen:
            _check_eigen(target, eigen.get(target.name), Path(eig_dir))
    return EditTargets(args, model, tokenizer, targets, eigen, eig_meta)


def _stored_dtype(hf_config) -> str:
    """The dtype the checkpoint is stored in, so untouched tensors are written back unchanged."""
    name = str(hf_config.dtype).removeprefix("torch.") if hf_config.dtype is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def check_eigenbasis_model(
    eig_meta: dict,
    eig_dir: Path,
    model_dir: Path,
    base_fingerprint: str,
    fix: str = "collect factors on this model (`memkfac factors MODEL ...`) and edit with those",
) -> None:
    """Refuse an eigenbasis (its ``meta``) whose factors were collected on another model than
    ``model_dir`` (fingerprint ``base_fingerprint``): its directions are not this model's, so an edit
    would remove the wrong ones and a band analysis would measure the wrong ones. ``fix`` is the advice."""
    if eig_meta["model_fingerprint"] != base_fingerprint:
        raise MemkfacError(
            f"the eigenbasis in {eig_dir} was computed for the model with fingerprint "
            f"{eig_meta['model_fingerprint']}, but {model_dir} has fingerprint {base_fingerprint}",
            fix,
        )


def edit_model(
    model_dir: Path,
    eig_dir: Path | None,
    config: EditArguments,
    out_dir: Path,
    progress: bool = True,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> dict:
    """Edit a Hugging Face checkpoint and write the edited one to ``out_dir``; return its manifest.

    ``eig_dir`` is an eigenbasis directory (``memkfac.eigen.compute_eigenbasis``) of factors collected
    on this very model; it may be None for ``method="svd"``. Everything is validated before anything is
    written: the eigenbasis's model fingerprint, the layers, shapes and finiteness. The manifest
    (``memkfac_manifest.json``) records the base model, the eigenbasis, the config and per-module
    diagnostics. The same inputs give bit-identical weights on one device. ``device`` runs the float64
    projections there, one weight at a time (a GPU makes 7B-scale edits take seconds, not minutes);
    the model itself is loaded and written on the CPU. Only the edited maps' eigenvectors are read
    from the eigenbasis file. ``out_dir`` must be new, empty or, with ``overwrite``, an earlier edit; it
    may not overlap the model or the eigenbasis. It is locked from the first step (after the device
    check), so a second edit into it is refused at once.
    """
    device = resolve_device(device)
    with claim_output(out_dir, EDIT, overwrite=overwrite, inputs=[model_dir, eig_dir]):
        return _edit_model(model_dir, eig_dir, config, out_dir, progress, device, overwrite)


def _edit_model(
    model_dir: Path,
    eig_dir: Path | None,
    config: EditArguments,
    out_dir: Path,
    progress: bool,
    device: torch.device,
    overwrite: bool,
) -> dict:
    """The body of ``edit_model``, run holding the output's claim."""
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    validate_model_dir(model_dir)
    base_fingerprint = model_fingerprint(model_dir)
    config, model, tokenizer, targets, eig_modules, eig_meta = load_edit_targets(
        model_dir, config, eig_dir, config.method != "svd", base_fingerprint
    )
    modules = []
    for target in tqdm(targets, desc="editing", unit="module", disable=not progress):
        weight = model.get_submodule(target.name).weight
        rho = None if config.method == "svd" else config.keep_mass_for(target.layer, target.proj)
        W_new, stats = edit_weight(
            weight.data.to(device),
            eig_modules.get(target.name),
            rho,
            config.method,
            config.svd_drop,
            _module_seed(config.seed, target.name),
        )
        if not torch.isfinite(W_new).all():
            raise MemkfacError(
                f"editing {target.name} produced NaN or Inf", "check the eigenbasis and the weight"
            )
        weight.data.copy_(W_new.cpu())
        modules.append(
            {"name": target.name, "layer": target.layer, "proj": target.proj, "keep_mass": rho}
            | asdict(stats)
        )

    manifest = {
        "kind": "edit",
        "memkfac_version": memkfac.__version__,
        "base_model": {"dir": str(model_dir), "fingerprint": base_fingerprint},
        "eigenbasis": eigenbasis_record(eig_dir, eig_meta),
        "config": asdict(config),
        "modules": modules,
        "edit_seconds": round(time.perf_counter() - start, 3),
    }
    save_checkpoint(model, tokenizer, out_dir, manifest, overwrite=overwrite, inputs=[model_dir, eig_dir])
    return load_manifest(out_dir)
