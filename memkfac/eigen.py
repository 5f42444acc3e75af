"""Eigenbasis of merged K-FAC factors: A = U_A diag(mu) U_A^T, G = U_G diag(lam) U_G^T.

Each factor is symmetrised, checked for NaN/Inf, decomposed with fp64 ``eigh``, its tiny negative
eigenvalues (rounding of a PSD sum) clamped to 0, sorted descending and stored in fp32. gate_proj and
up_proj share A, so their A is decomposed once.

On disk (``out_dir``): ``eigenbasis.safetensors`` with ``A.<group>.mu``, ``A.<group>.U_A``,
``G.<module>.lam``, ``G.<module>.U_G``, and ``meta.json`` (model_fingerprint, factor_index_sha256,
targets, tokens). An eigenbasis is current for a factor directory when its ``factor_index_sha256`` is
the sha256 of that directory's ``index.json`` (``eigenbasis_is_current``, the one place this is decided).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from memkfac.devices import resolve_device
from memkfac.errors import MemkfacError
from memkfac.factor_store import INDEX_FILE, factor_index_sha256, load_factor_sums
from memkfac.paths import ArtifactKind, atomic_dir, claim_output, open_safetensors, read_json_object

EIGEN_FILE = "eigenbasis.safetensors"
META_FILE = "meta.json"
EIGEN_SUBDIR = "eigenbasis"  # where a factor directory keeps its eigenbasis
EIGENBASIS = ArtifactKind("eigenbasis", "an eigenbasis (written by `memkfac eigen`)", signature=EIGEN_FILE)
_META_KEYS = ("model_fingerprint", "factor_index_sha256", "targets", "tokens")
_RECOMPUTE = "recompute it: `memkfac eigen FACTOR_DIR --overwrite` (`memkfac edit` recomputes a missing one)"
# A negative eigenvalue below -NEGATIVE_TOL * largest means the factor is not PSD: not rounding.
NEGATIVE_TOL = 1e-3


@dataclass
class ModuleEigen:
    """Eigenbasis of one tracked map W (d_out, d_in): eigenvalues descending and >= 0, fp32."""

    lam: Tensor  # (d_out,) G eigenvalues
    U_G: Tensor  # (d_out, d_out) columns are eigenvectors of G
    mu: Tensor  # (d_in,) A eigenvalues
    U_A: Tensor  # (d_in, d_in) columns are eigenvectors of A


def symmetric_eigh(matrix: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """fp64 eigh of a PSD factor: (eigenvalues (n,) descending clamped >= 0, eigenvectors (n, n)), fp32.

    ``what`` names the factor in errors (e.g. "A of model.layers.3.mlp.gate_proj").
    """
    if not torch.isfinite(matrix).all():
        raise MemkfacError(
            f"factor {what} contains NaN or Inf",
            "recollect the factors in float32 (bf16 overflow is the usual cause) or check the model weights",
        )
    m = matrix.to(torch.float64)
    m = (m + m.T) / 2
    try:
        values, vectors = torch.linalg.eigh(m)
    except torch.linalg.LinAlgError:  # cuSOLVER can fail on ill-conditioned matrices where LAPACK does not
        values, vectors = torch.linalg.eigh(m.cpu())
    if values.numel() and values[0] < -NEGATIVE_TOL * values.abs().max():
        raise MemkfacError(
            f"factor {what} has eigenvalue {values[0].item():.3e} against largest {values[-1].item():.3e}: "
            "it is not positive semi-definite",
            "the factor files are damaged; recollect the factors",
        )
    values = values.clamp(min=0).flip(0)
    vectors = vectors.flip(1)
    return values.to(torch.float32).cpu(), vectors.to(torch.float32).cpu().contiguous()


def compute_eigenbasis(
    factor_dir: Path,
    out_dir: Path,
    progress: bool = True,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> Path:
    """Decompose the merged, normalised factors in ``factor_dir`` into ``out_dir``; return ``out_dir``.

    ``device`` runs the fp64 eigh there (a GPU is much faster for d in the thousands). ``out_dir`` must
    be new, empty or (with ``overwrite``) an earlier eigenbasis, and may not hold the factors.
    """
    device = resolve_device(device)
    factor_dir = Path(factor_dir)
    factor_index_sha256(factor_dir)  # not a factor directory: said before anything is created
    inputs = [factor_dir / INDEX_FILE, *factor_dir.glob("shard-*.safetensors")]
    with claim_output(out_dir, EIGENBASIS, overwrite=overwrite, inputs=inputs):
        sums, index = load_factor_sums(factor_dir)
        n = sums.tokens
        jobs = [(f"A.{group}", "mu", "U_A", f"A of {group}", a) for group, a in sums.A.items()]
        jobs += [(f"G.{name}", "lam", "U_G", f"G of {name}", g) for name, g in sums.G.items()]
        tensors = {}
        for prefix, values_key, vectors_key, what, total in tqdm(jobs, desc="eigh", disable=not progress):
            values, vectors = symmetric_eigh(total.to(device) / n, what)
            tensors[f"{prefix}.{values_key}"] = values
            tensors[f"{prefix}.{vectors_key}"] = vectors
        meta = {
            "model_fingerprint": index["model_fingerprint"],
            "corpus_fingerprint": index["corpus_fingerprint"],
            "factor_index_sha256": factor_index_sha256(factor_dir),
            "fisher": index["fisher"],
            "targets": index["targets"],
            "tokens": n,
        }
        with atomic_dir(out_dir, EIGENBASIS, overwrite=overwrite, inputs=inputs) as tmp:
            save_file(tensors, str(tmp / EIGEN_FILE))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def eigenbasis_is_current(eig_dir: Path, factor_dir: Path) -> bool:
    """Whether ``eig_dir`` holds the eigenbasis of exactly the factors now in ``factor_dir``."""
    eig_dir = Path(eig_dir)
    if not (eig_dir / EIGEN_FILE).is_file() or not (Path(factor_dir) / INDEX_FILE).is_file():
        return False
    try:
        meta = read_json_object(eig_dir / META_FILE, _RECOMPUTE, "eigenbasis meta")
    except MemkfacError:
        return False
    return meta.get("factor_index_sha256") == factor_index_sha256(factor_dir)


def eigenbasis_for(factors: Path, progress: bool = True, device: str = "cpu") -> Path:
    """The eigenbasis to edit with: ``factors`` itself if it is an eigenbasis directory, else the
    factor directory's ``eigenbasis/`` when current, else computed now into it (replacing a stale one)."""
    factors = Path(factors)
    if (factors / EIGEN_FILE).is_file():
        return factors
    if not (factors / INDEX_FILE).is_file():
        raise MemkfacError(
            f"{factors} holds neither factors ({INDEX_FILE}) nor an eigenbasis ({EIGEN_FILE})",
            "pass the directory written by `memkfac factors`",
        )
    eig_dir = factors / EIGEN_SUBDIR
    if eigenbasis_is_current(eig_dir, factors):
        return eig_dir
    print(f"computing the eigenbasis of {factors} into {eig_dir}", file=sys.stderr)
    return compute_eigenbasis(factors, eig_dir, progress=progress, device=device, overwrite=True)


def load_eigenbasis(eig_dir: Path, names: Iterable[str] | None = None) -> tuple[dict[str, ModuleEigen], dict]:
    """Eigenbases per tracked map (gate and up share their A tensors) and the meta dict.

    ``names`` (full module names) reads only those maps' tensors from the file (safetensors reads
    lazily, tensor by tensor): an edit of three layers of a 7B model reads their ~3 GiB, not the whole
    eigenbasis. Names the eigenbasis does not hold are left out of the result. None reads every map.
    """
    eig_dir = Path(eig_dir)
    if not (eig_dir / EIGEN_FILE).is_file() or not (eig_dir / META_FILE).is_file():
        raise MemkfacError(
            f"{eig_dir} is not an eigenbasis directory (needs {EIGEN_FILE} and {META_FILE})",
            "compute it with `memkfac factors ...` (writes DIR/eigenbasis) or `memkfac eigen FACTOR_DIR`",
        )
    meta = read_json_object(eig_dir / META_FILE, _RECOMPUTE, "eigenbasis meta", _META_KEYS)
    wanted = None if names is None else set(names)
    modules = {}
    with open_safetensors(eig_dir / EIGEN_FILE, _RECOMPUTE, "eigenbasis") as f:
        stored, read = set(f.keys()), {}  # gate and up share A: each tensor is read once

        def tensor(key: str) -> Tensor:
            if key not in stored:
                raise MemkfacError(
                    f"the eigenbasis in {eig_dir} lacks {key!r} for a module its {META_FILE} lists",
                    _RECOMPUTE,
                )
            if key not in read:
                read[key] = f.get_tensor(key)
            return read[key]

        try:
            for target in meta["targets"]:
                if wanted is None or target["name"] in wanted:
                    G, A = f"G.{target['name']}", f"A.{target['input_group']}"
                    modules[target["name"]] = ModuleEigen(
                        lam=tensor(f"{G}.lam"),
                        U_G=tensor(f"{G}.U_G"),
                        mu=tensor(f"{A}.mu"),
                        U_A=tensor(f"{A}.U_A"),
                    )
        except (KeyError, TypeError) as e:
            raise MemkfacError(
                f"the eigenbasis {META_FILE} in {eig_dir} lists a malformed module ({type(e).__name__}: {e})",
                _RECOMPUTE,
            ) from None
    return modules, meta
