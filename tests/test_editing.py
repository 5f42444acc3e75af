"""The edit identities, the controls, the edited checkpoint, and clean failures of `memkfac edit`."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from memkfac.checkpoint import load_manifest
from memkfac.cli import main
from memkfac.editing import EditArguments, edit_model, edit_weight
from memkfac.eigen import EIGEN_FILE, ModuleEigen, compute_eigenbasis, symmetric_eigh
from memkfac.errors import MemkfacError
from memkfac.factors import FactorArguments, collect_factors
from memkfac.fingerprint import model_fingerprint, sha256_file
from memkfac.selection import select_components
from memkfac.tiny import build_tiny_model


def random_eigen(d_out: int, d_in: int, seed: int = 0) -> ModuleEigen:
    """Eigenbasis of random SPD factors with decaying spectra."""
    g = torch.Generator().manual_seed(seed)

    def factor(n):
        x = torch.randn(n, n, generator=g) * torch.linspace(1.0, 0.05, n)
        return x @ x.T / n

    lam, U_G = symmetric_eigh(factor(d_out), "G")
    mu, U_A = symmetric_eigh(factor(d_in), "A")
    return ModuleEigen(lam=lam, U_G=U_G, mu=mu, U_A=U_A)


@pytest.fixture(scope="module")
def weight_and_eigen():
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(5))
    return W, random_eigen(24, 16)


def test_rho_one_returns_the_weight_byte_identical(weight_and_eigen):
    W, eig = weight_and_eigen
    for method in ("kfac", "per_side", "random"):
        W_new, stats = edit_weight(W, eig, 1.0, method)
        assert W_new is W and stats.skipped and stats.n_kept == 24 * 16 and stats.rel_change == 0.0


def test_kfac_edit_is_the_sum_of_kept_components(weight_and_eigen):
    W, eig = weight_and_eigen
    W_new, stats = edit_weight(W, eig, 0.6, "kfac")
    sel = select_components(eig.lam, eig.mu, 0.6)
    U_G, U_A, W64 = eig.U_G.double(), eig.U_A.double(), W.double()
    expected = torch.zeros_like(W64)
    for i, j in sel.mask.nonzero().tolist():  # W_new = sum over kept (i, j) of C_ij u_i v_j^T
        expected += (U_G[:, i] @ W64 @ U_A[:, j]) * torch.outer(U_G[:, i], U_A[:, j])
    torch.testing.assert_close(W_new, expected.float(), rtol=0, atol=1e-6)
    assert W_new.dtype == W.dtype and not stats.skipped
    assert stats.n_kept == sel.n_kept and stats.mass_kept == sel.mass_kept >= 0.6
    assert (stats.distinct_G, stats.distinct_A) == (sel.distinct_G, sel.distinct_A)
    rel = float(torch.linalg.norm(W_new.double() - W64) / torch.linalg.norm(W64))
    assert stats.rel_change == pytest.approx(rel)


def test_per_side_projects_each_side_onto_its_top_eigenvectors(weight_and_eigen):
    W, eig = weight_and_eigen
    W_new, stats = edit_weight(W, eig, 0.8, "per_side")

    def rank_for(values):  # fewest top eigenvalues holding 80% of the sum
        fractions = torch.cumsum(values.double(), 0) / values.double().sum()
        return int((fractions < 0.8).sum()) + 1

    r_G, r_A = rank_for(eig.lam), rank_for(eig.mu)
    P_G = eig.U_G[:, :r_G].double() @ eig.U_G[:, :r_G].double().T
    P_A = eig.U_A[:, :r_A].double() @ eig.U_A[:, :r_A].double().T
    torch.testing.assert_close(W_new, (P_G @ W.double() @ P_A).float(), rtol=0, atol=1e-6)
    assert (stats.distinct_G, stats.distinct_A, stats.n_kept) == (r_G, r_A, r_G * r_A)
    assert stats.mass_kept >= 0.8 * 0.8


def test_svd_drops_the_smallest_singular_directions(weight_and_eigen):
    W, _ = weight_and_eigen
    W_new, stats = edit_weight(W, None, None, "svd", svd_drop=0.25)
    assert stats.n_kept == 12 and stats.n_total == 16 and stats.mass_kept is None
    assert torch.linalg.matrix_rank(W_new.double(), rtol=1e-5) == 12
    s_old, s_new = torch.linalg.svdvals(W.double()), torch.linalg.svdvals(W_new.double())
    torch.testing.assert_close(s_new[:12], s_old[:12], rtol=1e-5, atol=0)
    assert edit_weight(W, None, None, "svd", svd_drop=0.0)[0] is W


def test_random_basis_keeps_the_kfac_count_and_is_seeded(weight_and_eigen):
    W, eig = weight_and_eigen
    W_kfac, kfac = edit_weight(W, eig, 0.6, "kfac")
    W_rand, rand = edit_weight(W, eig, 0.6, "random", seed=7)
    assert (rand.n_kept, rand.distinct_G, rand.distinct_A) == (kfac.n_kept, kfac.distinct_G, kfac.distinct_A)
    assert not torch.allclose(W_rand, W_kfac, atol=1e-3)
    assert torch.equal(edit_weight(W, eig, 0.6, "random", seed=7)[0], W_rand)
    assert not torch.equal(edit_weight(W, eig, 0.6, "random", seed=8)[0], W_rand)
    # It is an orthogonal projection of W onto n_kept components: ||W_new||^2 = <W_new, W>.
    W64, R64 = W.double(), W_rand.double()
    assert float((R64 * R64).sum()) == pytest.approx(float((R64 * W64).sum()), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keep_mass=1.5), r"outside \(0, 1\]"),
        (dict(keep_mass=0.0), r"outside \(0, 1\]"),
        (dict(method="magic"), "unknown edit method"),
        (dict(overrides={"9.gate": 0.5}), "names no edited module"),
        (dict(overrides={"1.gate": 2.0}), r"keep mass for 1.gate 2.0 is outside"),
        (dict(svd_drop=1.0), "svd_drop"),
        (dict(projections=("gate", "mlp")), "unknown or no projection"),
    ],
)
def test_edit_config_refuses_bad_settings(kwargs, message):
    with pytest.raises(MemkfacError, match=message):
        EditArguments(layers=[1, 2], **kwargs)


# --- whole-model edits on a tiny Llama, from an eigenbasis computed by the factor engine ---


@pytest.fixture(scope="module")
def factor_dir(tiny_model_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    blocks = torch.randint(0, 384, (8, 32), generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("factors")
    collect_factors(
        model,
        blocks,
        out,
        FactorArguments(layers=[1, 2], fisher="empirical"),
        model_fingerprint=model_fingerprint(tiny_model_dir),
        corpus_fingerprint="random-tokens",
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def eig_dir(factor_dir, tmp_path_factory):
    return compute_eigenbasis(factor_dir, tmp_path_factory.mktemp("eig") / "eigenbasis", progress=False)


def _weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def test_edited_checkpoint_reloads_with_edited_weights_and_others_unchanged(
    tiny_model_dir, eig_dir, tmp_path
):
    config = EditArguments(layers=[1, 2], projections=("gate", "up"), keep_mass=0.6, overrides={"2.up": 1.0})
    manifest = edit_model(tiny_model_dir, eig_dir, config, tmp_path / "edited", progress=False)
    edited = {
        n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(tmp_path / "edited").named_parameters()
    }
    base = _weights(tiny_model_dir)
    from memkfac.eigen import load_eigenbasis

    eig, meta = load_eigenbasis(eig_dir)
    changed = {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
               "model.layers.2.mlp.gate_proj.weight"}  # fmt: skip
    assert set(edited) == set(base)
    for name, tensor in base.items():
        if name in changed:
            expected, _ = edit_weight(tensor, eig[name.removesuffix(".weight")], 0.6)
            assert torch.equal(edited[name], expected), name
            assert not torch.equal(edited[name], tensor), name
        else:  # untouched tensors, including the rho = 1 module 2.up, are bit-identical
            assert torch.equal(edited[name], tensor), name

    assert manifest == load_manifest(tmp_path / "edited")
    assert manifest["base_model"]["fingerprint"] == model_fingerprint(tiny_model_dir)
    assert manifest["eigenbasis"]["factor_index_sha256"] == meta["factor_index_sha256"]
    assert manifest["model_fingerprint"] == model_fingerprint(tmp_path / "edited")
    assert manifest["config"]["overrides"] == {"2.up": 1.0}
    modules = {m["name"]: m for m in manifest["modules"]}
    assert sorted(modules) == sorted(
        n.removesuffix(".weight") for n in changed | {"model.layers.2.mlp.up_proj.weight"}
    )
    assert (
        modules["model.layers.2.mlp.up_proj"]["skipped"]
        and modules["model.layers.2.mlp.up_proj"]["keep_mass"] == 1.0
    )
    gate = modules["model.layers.1.mlp.gate_proj"]
    assert gate["mass_kept"] >= 0.6 and 0 < gate["frac_kept"] < 1 and gate["n_total"] == 64 * 32


def test_same_inputs_give_bit_identical_weights(tiny_model_dir, eig_dir, tmp_path):
    for method in ("kfac", "random"):
        config = EditArguments(
            layers=[1, 2], projections=("gate", "up", "down"), keep_mass=0.7, method=method
        )
        edit_model(tiny_model_dir, eig_dir, config, tmp_path / "a", progress=False, overwrite=True)
        edit_model(tiny_model_dir, eig_dir, config, tmp_path / "b", progress=False, overwrite=True)
        assert sha256_file(tmp_path / "a" / "model.safetensors") == sha256_file(
            tmp_path / "b" / "model.safetensors"
        )


def test_cli_edit_from_factor_dir_computes_the_eigenbasis_and_prints_a_table(
    tiny_model_dir, factor_dir, tmp_path, capsys
):
    factors = tmp_path / "factors"
    shutil.copytree(factor_dir, factors)
    out = tmp_path / "edited"
    argv = ["edit", str(tiny_model_dir), "--factors", str(factors), "--layers", "1-2", "--proj", "gate,up",
            "--keep-mass", "0.6", "--keep-mass-for", "1.up=0.9", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert (factors / "eigenbasis" / EIGEN_FILE).is_file()
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.up_proj" in printed and "0.9" in printed and f"wrote {out}" in printed
    modules = {m["name"]: m for m in load_manifest(out)["modules"]}
    assert modules["model.layers.1.mlp.up_proj"]["keep_mass"] == 0.9
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_cli_svd_needs_no_factors(tiny_model_dir, tmp_path):
    argv = ["edit", str(tiny_model_dir), "--method", "svd", "--svd-drop", "0.5", "--layers", "3",
            "--proj", "down", "--out", str(tmp_path / "svd"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    (module,) = load_manifest(tmp_path / "svd")["modules"]
    assert module["name"] == "model.layers.3.mlp.down_proj" and module["n_kept"] == 16


def damaged_copy(eig_dir, out, damage):
    """A copy of an eigenbasis directory with ``damage(tensors)`` applied to its tensors."""
    shutil.copytree(eig_dir, out)
    tensors = load_file(str(out / EIGEN_FILE))
    damage(tensors)
    save_file(tensors, str(out / EIGEN_FILE))
    return out


def _nan_lam(tensors):
    tensors["G.model.layers.1.mlp.gate_proj.lam"][0] = float("nan")


def _short_lam(tensors):
    tensors["G.model.layers.1.mlp.gate_proj.lam"] = tensors["G.model.layers.1.mlp.gate_proj.lam"][:-1].clone()


@pytest.mark.parametrize(
    "case, status, message",
    [
        (
            "other_model",
            1,
            "computed for the model with fingerprint [0-9a-f]{64}, but .* has fingerprint [0-9a-f]{64}",
        ),
        ("rho_out_of_range", 2, r"keep mass 1.5 is outside \(0, 1\]"),  # usage errors: 2
        ("unknown_layer", 2, "outside the model's 0..3"),
        ("layer_not_in_eigenbasis", 1, "has no module model.layers.3.mlp.gate_proj"),
        ("nan_eigenbasis", 1, "has NaN or Inf"),
        ("shape_mismatch", 1, r"shape mismatch for model.layers.1.mlp.gate_proj: eigenbasis lam is \(63,\)"),
    ],
)
def test_cli_failures_exit_nonzero_with_the_message_and_write_nothing(
    case, status, message, tiny_model_dir, eig_dir, tmp_path, capsys
):
    model, factors, layers, keep = tiny_model_dir, eig_dir, "1,2", "0.6"
    if case == "other_model":
        model = tmp_path / "other"
        build_tiny_model(model, seed=1)
    elif case == "rho_out_of_range":
        keep = "1.5"
    elif case == "unknown_layer":
        layers = "1,7"
    elif case == "layer_not_in_eigenbasis":
        layers = "2,3"
    elif case == "nan_eigenbasis":
        factors = damaged_copy(eig_dir, tmp_path / "nan-eig", _nan_lam)
    elif case == "shape_mismatch":
        factors = damaged_copy(eig_dir, tmp_path / "short-eig", _short_lam)
    out = tmp_path / "out"
    argv = ["edit", str(model), "--factors", str(factors), "--layers", layers, "--keep-mass", keep,
            "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == status
    err = capsys.readouterr().err
    assert re.search(message, err) and "fix:" in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-out*"))


def test_edit_model_refuses_unknown_layers_and_svd_only_skips_the_eigenbasis(
    tiny_model_dir, eig_dir, tmp_path
):
    with pytest.raises(MemkfacError, match=r"layer\(s\) \[7\] are not in"):
        edit_model(tiny_model_dir, eig_dir, EditArguments(layers=[1, 7]), tmp_path / "out", progress=False)
    with pytest.raises(MemkfacError, match="needs an eigenbasis"):
        edit_model(tiny_model_dir, None, EditArguments(layers=[1]), tmp_path / "out", progress=False)
    with pytest.raises(MemkfacError, match="is the input"):
        edit_model(tiny_model_dir, eig_dir, EditArguments(layers=[1]), tiny_model_dir, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "damage, message", [("corrupt", "does not match its sha256"), ("missing", "is missing")]
)
def test_cli_refuses_missing_or_corrupt_shards_and_writes_nothing(
    damage, message, tiny_model_dir, factor_dir, tmp_path, capsys
):
    factors = tmp_path / "factors"
    shutil.copytree(factor_dir, factors)
    shard = sorted(factors.glob("shard-*.safetensors"))[0]
    if damage == "corrupt":
        shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    else:
        shard.unlink()
    out = tmp_path / "out"
    argv = [
        "edit",
        str(tiny_model_dir),
        "--factors",
        str(factors),
        "--layers",
        "1",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert not out.exists() and not (factors / "eigenbasis").exists()
