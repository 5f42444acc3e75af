"""The edit methods by name: one registry for the config and the pipeline, runs, and the edit check."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from memkfac import editing
from memkfac.methods import METHODS, EditInputs, apply_edit, check_edited_model, forget_sequences
from memkfac.probes import Probe

PROBES = [
    Probe(id=f"{kind}-{split}", prefix=f"{kind} {split} cue:", suffix=" secret 42", kind=kind, split=split)
    for kind in ("memorized", "control")
    for split in ("sweep", "holdout")
]


def test_every_method_is_named_by_its_arguments():
    """An entry ``method: X`` selects the arguments class whose ``method`` field accepts X."""
    assert set(editing.METHODS) | {"balanced_subnet"} <= set(METHODS)
    for name, method in METHODS.items():
        field = {f.name: f for f in dataclasses.fields(method.arguments)}["method"]
        hints = typing.get_type_hints(method.arguments)
        assert name in typing.get_args(hints["method"]), (name, field)


def test_forget_set_is_the_memorized_sweep_split(tiny_model_dir):
    from memkfac.models import load_model

    _, tokenizer = load_model(tiny_model_dir)
    (ids,) = forget_sequences(PROBES, tokenizer)
    assert tokenizer.decode(ids) == "memorized sweep cue: secret 42"


def test_an_edit_passes_its_check_until_the_config_changes(tiny_model_dir, tmp_path):
    args = editing.EditArguments(layers="2-3", method="svd", svd_drop=0.25)
    out = tmp_path / "edit"
    manifest = apply_edit(args, EditInputs(model_dir=tiny_model_dir), out, progress=False)
    assert manifest["config"]["layers"] == [2, 3]
    found = check_edited_model(out, PROBES, args=args, subject_dir=tiny_model_dir)
    assert found["problems"] == [] and found["finite_logits"] and found["probes"] == 4
    changed = dataclasses.replace(args, svd_drop=0.5)
    problems = check_edited_model(out, PROBES, args=changed, subject_dir=tiny_model_dir)["problems"]
    assert problems == ["manifest arguments differ from the config"]
    assert check_edited_model(tiny_model_dir, PROBES[:2])["problems"] == []  # an unedited model


def test_a_method_without_its_inputs_is_a_clear_error(tiny_model_dir, tmp_path):
    from memkfac.balanced_subnet import BSNArguments
    from memkfac.errors import MemkfacError

    with pytest.raises(MemkfacError, match="needs an eigenbasis"):
        apply_edit(editing.EditArguments(layers=[1]), EditInputs(model_dir=tiny_model_dir), tmp_path / "a")
    with pytest.raises(MemkfacError, match="forget and retain"):
        apply_edit(BSNArguments(layers="all"), EditInputs(model_dir=tiny_model_dir), tmp_path / "b")


@pytest.mark.parametrize(
    "args",
    [
        "ga_gd",
        "npo",
        "noise",
    ],
)
def test_baselines_pass_the_edit_check_like_any_edit(tiny_model_dir, tmp_path, args):
    """The pipeline's check of an edited model (manifest names its inputs and arguments) holds for them."""
    import torch

    from memkfac.forget_set import ForgetSetArguments
    from memkfac.label_free import LabelFreeArguments

    args = (
        LabelFreeArguments(layers="2-3", method="noise", noise_norm=0.01)
        if args == "noise"
        else ForgetSetArguments(layers="2-3", method=args, steps=2)
    )
    retain = torch.randint(1, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    inputs = EditInputs(model_dir=tiny_model_dir, probes=PROBES, retain=retain)
    out = tmp_path / "edit"
    manifest = apply_edit(args, inputs, out, progress=False)
    assert manifest["arguments"]["layers"] == [2, 3]
    found = check_edited_model(out, PROBES, args=args, subject_dir=tiny_model_dir)
    assert found["problems"] == [] and found["finite_logits"]
    changed = dataclasses.replace(args, seed=1)
    assert check_edited_model(out, PROBES, args=changed, subject_dir=tiny_model_dir)["problems"] == [
        "manifest arguments differ from the config"
    ]
