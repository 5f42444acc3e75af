"""Device and dtype settings are checked before any work: each bad setting gets a MemkfacError naming it."""

from __future__ import annotations

import pytest
import torch

from memkfac.devices import resolve_device, resolve_dtype
from memkfac.errors import MemkfacError


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_cpu_resolves():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", "meta"])
def test_unknown_device_names_the_setting(device):
    with pytest.raises(MemkfacError, match=r"(?s)--device is .* not a device memkfac runs on.*cpu, cuda"):
        resolve_device(device, "--device")


def test_cuda_without_cuda_names_the_setting_and_the_fix(no_cuda):
    with pytest.raises(MemkfacError, match=r"MEMKFAC_FACTOR_DEVICE is 'cuda' but CUDA is not available") as e:
        resolve_device("cuda", "MEMKFAC_FACTOR_DEVICE")
    assert "set MEMKFAC_FACTOR_DEVICE to cpu" in str(e.value)


def test_cuda_index_beyond_the_visible_gpus(one_gpu):
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(MemkfacError, match=r"compute.device is 'cuda:3' but only 1 GPU\(s\) are visible"):
        resolve_device("cuda:3", "compute.device")


def test_mps_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(MemkfacError, match="mps.*not available"):
        resolve_device("mps")


def test_dtypes(one_gpu, monkeypatch):
    with pytest.raises(MemkfacError, match="'float8', an unknown dtype"):
        resolve_dtype("float8")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(MemkfacError, match="Tesla V100 has no bfloat16 support"):
        resolve_dtype("bfloat16", "cuda", "--dtype")


def _entry_points(tmp_path):
    """Every engine entry point that loads a model, called with device="cuda" and inputs that do not
    exist: the device error must come first, before anything is read."""
    from memkfac.balanced_subnet import BSNArguments, train_balanced_subnet
    from memkfac.bands import BandArguments, run_band_analysis
    from memkfac.compare import run_comparison
    from memkfac.downstream import DownstreamArguments, run_downstream
    from memkfac.editing import EditArguments, edit_model
    from memkfac.eigen import compute_eigenbasis
    from memkfac.evaluate import EvalArguments, HeldOut, evaluate_utility, reference_topk
    from memkfac.inject import InjectArguments, inject_canaries
    from memkfac.methods import EditInputs, apply_edit, check_edited_model
    from memkfac.models import load_model
    from memkfac.resurgence import ResurgenceArguments, attack_rows, run_resurgence

    missing, out, blocks = tmp_path / "missing", tmp_path / "out", torch.zeros(2, 8, dtype=torch.long)
    return {
        "load_model": lambda: load_model(missing, device="cuda"),
        "inject_canaries": lambda: inject_canaries(
            missing, [], blocks, blocks, InjectArguments(), out, device="cuda"
        ),
        "train_balanced_subnet": lambda: train_balanced_subnet(
            missing, [], [], BSNArguments(layers=[0]), out, device="cuda"
        ),
        "attack_rows": lambda: attack_rows(missing, missing, [], blocks, device="cuda"),
        "run_comparison": lambda: run_comparison(missing, [], missing, device="cuda"),
        "run_band_analysis": lambda: run_band_analysis(
            missing, missing, [], blocks, BandArguments(layers=[0]), device="cuda"
        ),
        "edit_model": lambda: edit_model(missing, missing, EditArguments(layers=[0]), out, device="cuda"),
        "compute_eigenbasis": lambda: compute_eigenbasis(missing, out, device="cuda"),
        "reference_topk": lambda: reference_topk(missing, HeldOut(blocks, "h", "f"), device="cuda"),
        "run_downstream": lambda: run_downstream(missing, DownstreamArguments(device="cuda")),
        # what the pipeline's assets call
        "apply_edit": lambda: apply_edit(
            BSNArguments(layers=[0]), EditInputs(model_dir=missing), out, device="cuda"
        ),
        "check_edited_model": lambda: check_edited_model(missing, [], device="cuda"),
        "evaluate_utility": lambda: evaluate_utility(
            missing,
            missing,
            HeldOut(blocks, "h", "f"),
            EvalArguments(),
            variant="v",
            reference_name="b",
            device="cuda",
        ),
        "run_resurgence": lambda: run_resurgence(
            missing, missing, [], blocks, ResurgenceArguments(), variant="v", probe_set="p", device="cuda"
        ),
    }


ENTRY_POINTS = [
    "load_model",
    "inject_canaries",
    "train_balanced_subnet",
    "attack_rows",
    "run_comparison",
    "run_band_analysis",
    "edit_model",
    "compute_eigenbasis",
    "reference_topk",
    "run_downstream",
    "apply_edit",
    "check_edited_model",
    "evaluate_utility",
    "run_resurgence",
]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_checks_the_device_first(name, tmp_path, no_cuda):
    calls = _entry_points(tmp_path)
    assert sorted(calls) == sorted(ENTRY_POINTS)
    with pytest.raises(MemkfacError, match="'cuda' but CUDA is not available"):
        calls[name]()
    assert not (tmp_path / "out").exists()
