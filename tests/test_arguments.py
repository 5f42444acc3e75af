"""The arguments dataclasses check themselves: every bad field named at once, layer specs resolved."""

from __future__ import annotations

import pytest

from memkfac.arguments import ArgumentError
from memkfac.bands import BandArguments
from memkfac.corpora import CorpusArguments
from memkfac.editing import EditArguments
from memkfac.errors import MemkfacError
from memkfac.evaluate import EvalArguments
from memkfac.finetune import FinetuneArguments
from memkfac.targets import resolve_layers


def test_every_bad_field_is_named_at_once():
    with pytest.raises(ArgumentError) as error:
        FinetuneArguments(epochs=0, lr=-1.0, decay="cosine", train_layers="x")
    assert [p.field for p in error.value.problems] == ["epochs", "lr", "decay", "train_layers"]
    assert isinstance(error.value, MemkfacError) and isinstance(error.value, ValueError)
    assert "unknown decay 'cosine'" in str(error.value)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: EditArguments(layers="1", keep_mass=0), "keep_mass"),
        (lambda: EditArguments(layers="9-1"), "layers"),
        (lambda: EditArguments(layers=[]), "layers"),
        (lambda: EditArguments(layers=[1], overrides={"2.gate": 0.5}), "overrides"),
        (lambda: CorpusArguments(max_tokens={"factor": -1}), "max_tokens"),
        (lambda: CorpusArguments(fractions={"factor": 1.0}), "fractions"),
        (lambda: BandArguments(tasks=("no_such_task",)), "tasks"),
        (lambda: BandArguments(bases=("pca",)), "bases"),
        (lambda: EvalArguments(loose_threshold=0), "loose_threshold"),
        (lambda: EvalArguments(heldout_blocks=0), "heldout_blocks"),
    ],
)
def test_bounds_are_checked_in_the_dataclass(make, field):
    with pytest.raises(ArgumentError) as error:
        make()
    assert [p.field for p in error.value.problems] == [field]


def test_a_layer_spec_is_resolved_once_the_model_is_known():
    args = EditArguments(layers="2-3", overrides={"3.up": 0.9})  # an override is checked on resolution
    assert resolve_layers(args, 4).layers == [2, 3]
    assert resolve_layers(EditArguments(layers="all"), 4).layers == [0, 1, 2, 3]
    assert resolve_layers(EditArguments(layers=[1]), 4).layers == [1]
    with pytest.raises(MemkfacError, match="outside the model"):
        resolve_layers(args, 3)
    with pytest.raises(ArgumentError, match="names no edited module"):
        resolve_layers(EditArguments(layers="all", overrides={"3.up": 0.9}), 3)
