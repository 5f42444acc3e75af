"""Band activation analysis: band membership by hand, activations on inputs aligned with known directions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from memkfac.bands import (
    BAND_NAMES,
    BandBasis,
    TokenSource,
    band_activation_rows,
    band_means,
    block_source,
    kfac_band_basis,
    plot_band_ratios,
    probe_source,
    projection_means,
    svd_band_basis,
    text_source,
)
from memkfac.errors import MemkfacError


def test_kfac_band_membership_by_hand():
    # masses lam_i * mu_j: row 0 = 50 40 30 20 10, row 1 = 5 4 3 2 1; 10 components ranked by mass:
    # top10 = rank 0 (v0); 10-25 = ranks 1-2 (v1, v2); 25-50 = ranks 3-4 (v3, v4); bottom50 = ranks 5-9 (all)
    basis = kfac_band_basis(torch.tensor([10.0, 1.0]), torch.tensor([5.0, 4, 3, 2, 1]), torch.eye(5))
    expected = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(basis.weights, expected.double())
    # per-direction means 1 on v0 only: top band mean 1, bottom band mean 1/5
    assert torch.allclose(
        band_means(basis, torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64)),
        torch.tensor([1.0, 0, 0, 0.2], dtype=torch.float64),
    )


def test_svd_bands_follow_singular_value_rank():
    U, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    V, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(1)))
    W = (
        U @ torch.diag(torch.arange(10.0, 4.0, -1)) @ V[:, :6].T
    )  # singular values 10..5, right vectors V[:, :6]
    basis = svd_band_basis(W)
    assert basis.weights.sum(0).tolist() == [1, 1, 1, 3]  # 6 components: ranks 0 | 1 | 2 | 3-5
    assert torch.allclose((basis.V.T @ V[:, :6]).abs(), torch.eye(6), atol=1e-5)


class _ToyLM(nn.Module):
    """Embeddings are scaled standard basis vectors, so token t's MLP input is exactly scale * e_t."""

    def __init__(self, d: int = 5):
        super().__init__()
        self.embed = nn.Embedding(d, d)
        self.embed.weight.data = torch.diag(torch.arange(1.0, d + 1))  # token t -> (t + 1) * e_t
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(d, 3, bias=False)

    def forward(self, input_ids, attention_mask=None):
        return self.mlp.gate_proj(self.embed(input_ids))


def test_activation_on_inputs_aligned_with_known_eigenvectors():
    model = _ToyLM()
    basis = kfac_band_basis(torch.tensor([10.0, 1.0]), torch.tensor([5.0, 4, 3, 2, 1]), torch.eye(5))
    basis = dataclasses.replace(basis, module="mlp.gate_proj", layer=0, proj="gate")
    # clean text is token 0 (along v0, the top-mass direction); "memorized" text is token 4 (along v4,
    # used only by 25-50 and bottom50 components). Sequences of unequal length are padded with token 0,
    # which must not count: a padded position would add activation on v0.
    clean = TokenSource([[0, 0, 0], [0]], [[0, 1, 2], [0]])
    memorized = TokenSource([[1, 4, 4, 4], [4]], [[1, 2, 3], [0]])  # position 0 of the first is not measured
    rows = band_activation_rows(
        model, [basis], {"clean": clean, "memorized": memorized}, batch_size=2, progress=False
    )
    table = {(r["source"], r["band"]): r for r in rows}
    # clean: |v0^T x| = 1 on v0 only -> band means 1, 0, 0, 1/5
    assert [table[("clean", b)]["mean_activation"] for b in BAND_NAMES] == pytest.approx([1, 0, 0, 0.2])
    # memorized: |v4^T x| = 5 on v4 only -> 25-50 has v3, v4: 5/2; bottom50 has all five: 5/5
    assert [table[("memorized", b)]["mean_activation"] for b in BAND_NAMES] == pytest.approx([0, 0, 2.5, 1])
    assert table[("memorized", "bottom50")]["ratio_to_clean"] == pytest.approx(5.0)
    assert table[("memorized", "top10")]["ratio_to_clean"] == 0.0
    assert table[("clean", "top10")]["n_tokens"] == 4 and table[("memorized", "top10")]["n_tokens"] == 4


def test_projection_means_match_a_direct_computation_on_a_tiny_llama(tiny_model_dir):
    from memkfac.tiny import build_tiny_model

    model, tokenizer = build_tiny_model(arch="llama", seed=0)
    name = "model.layers.2.mlp.up_proj"
    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    basis = BandBasis(V=Q, weights=torch.ones(32, 1, dtype=torch.float64), basis="kfac", module=name)
    texts = ["The quick brown fox jumps over the lazy dog.", "def function(self, value): return value + 1"]
    means, n = projection_means(model, [basis], text_source(texts, tokenizer), batch_size=2, progress=False)
    captured = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, i: captured.append(i[0][0]))
    with torch.no_grad():
        for t in texts:
            model(torch.tensor([tokenizer(t).input_ids]))
    handle.remove()
    x = torch.cat(captured)  # (n_tokens, 32), each text on its own: no padding involved
    assert n == x.shape[0]
    assert torch.allclose(means[0], (x @ Q).abs().mean(0).double(), atol=1e-5)


def test_band_rows_and_plot_on_tiny_model(tmp_path):
    from memkfac.probes import Probe
    from memkfac.tiny import build_tiny_model

    model, tokenizer = build_tiny_model(arch="llama", seed=0)
    g = torch.Generator().manual_seed(0)
    bases = []
    for proj in ("gate", "up"):
        name = f"model.layers.3.mlp.{proj}_proj"
        U_A, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
        kfac = kfac_band_basis(torch.rand(64, generator=g), torch.rand(32, generator=g), U_A)
        svd = svd_band_basis(model.get_submodule(name).weight.detach())
        bases += [dataclasses.replace(b, module=name, layer=3, proj=proj) for b in (kfac, svd)]
    probes = [
        Probe(id=f"p{i}", prefix=f"Customer record {i}: name", suffix=" Alice, phone 555 0100")
        for i in range(3)
    ]
    sources = {
        "clean": block_source(torch.randint(1, 384, (4, 16), generator=g)),
        "memorized": probe_source(probes, tokenizer, model.config.vocab_size),
        "copying": text_source(["Repeat the code exactly.\nCode: ab12\nRepeated: ab12"], tokenizer),
    }
    rows = band_activation_rows(model, bases, sources, max_tokens=30, progress=False)
    assert len(rows) == 4 * 3 * 4  # (gate, up) x (kfac, svd), 3 sources, 4 bands
    assert all(r["ratio_to_clean"] == pytest.approx(1.0) for r in rows if r["source"] == "clean")
    assert all(r["n_tokens"] <= 30 and r["mean_activation"] > 0 for r in rows)
    suffix_len = len(tokenizer(" Alice, phone 555 0100", add_special_tokens=False).input_ids)
    assert next(r for r in rows if r["source"] == "memorized")["n_tokens"] == 3 * suffix_len
    png = plot_band_ratios(rows, tmp_path / "bands.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(MemkfacError, match="clean"):
        band_activation_rows(model, bases, {"memorized": sources["memorized"]}, progress=False)


@pytest.mark.slow
def test_bands_command_end_to_end(tiny_model_dir, memkfac_home, tmp_path, capsys):
    from memkfac.cli import main
    from memkfac.corpora import CorpusArguments, build_corpus
    from memkfac.probes import Probe, write_probe_set
    from memkfac.tables import read_table
    from memkfac.tiny import build_tiny_model

    _, tokenizer = build_tiny_model(arch="llama", seed=0)
    notes = tmp_path / "notes.txt"
    notes.write_text(
        "\n\n".join(f"Note {i}: the quick brown fox {i * 7} jumps over the lazy dog." for i in range(200))
    )
    corpus = build_corpus(
        CorpusArguments(str(notes), block_len=16), tokenizer, tmp_path / "corpus", progress=False
    )
    factors = tmp_path / "factors"
    argv = ["factors", str(tiny_model_dir), "--corpus", str(corpus), "--layers", "2-3", "--proj", "gate,up"]
    assert (
        main(
            [
                *argv,
                "--tokens",
                "300",
                "--block-len",
                "16",
                "--batch-size",
                "4",
                "--quiet",
                "--out",
                str(factors),
            ]
        )
        == 0
    )
    probes = tmp_path / "canaries.jsonl"
    write_probe_set(
        [Probe(id=f"m{i}", prefix=f"Customer {i} email:", suffix=" alice@example.com") for i in range(4)]
        + [
            Probe(id=f"c{i}", prefix=f"Customer {i} phone:", suffix=" +1 555 0100", kind="control")
            for i in range(4)
        ],
        probes,
    )
    bands = [
        "bands",
        str(tiny_model_dir),
        "--factors",
        str(factors),
        "--layers",
        "3",
        "--probes",
        str(probes),
    ]
    bands += ["--clean", str(corpus), "--tasks", "copying", "--max-tokens", "200", "--quiet"]
    assert main(bands) == 0
    assert "bottom50" in capsys.readouterr().out
    rows = read_table("band_activation").to_pylist()
    sources = {"clean", "memorized", "control", "copying"}
    assert {r["source"] for r in rows} == sources and {r["basis"] for r in rows} == {"kfac", "svd"}
    assert len(rows) == 2 * 2 * len(sources) * 4  # (gate, up) x (kfac, svd) x sources x bands
    assert all(r["probe_set"] == "canaries" and r["layer"] == 3 for r in rows)
    assert (memkfac_home / "plots" / "bands-base-canaries.png").is_file()
    # the factors belong to the base model: another model is refused with status 1
    other = tmp_path / "other"
    build_tiny_model(other, arch="llama", seed=1)
    assert main([bands[0], str(other), *bands[2:]]) == 1
    assert "was computed for the model with fingerprint" in capsys.readouterr().err
