"""Target discovery on every tiny architecture, name patterns, and layer specs."""

from __future__ import annotations

import pytest

from memkfac.errors import MemkfacError
from memkfac.targets import Target, find_targets, parse_layers
from memkfac.tiny import TINY_ARCHITECTURES, build_tiny_model


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_finds_gate_up_down_of_every_architecture(arch):
    model, _ = build_tiny_model(arch=arch)
    targets = find_targets(model, layers=[1, 3])
    assert [(t.layer, t.proj) for t in targets] == [(i, p) for i in (1, 3) for p in ("gate", "up", "down")]
    gate, up, down = targets[:3]
    assert gate == Target("model.layers.1.mlp.gate_proj", 1, "gate", 32, 64)
    assert (down.in_features, down.out_features) == (64, 32)
    assert gate.input_group == up.input_group == "model.layers.1.mlp.gate_up_proj"
    assert down.input_group == down.name


def test_projection_filter_and_all_layers():
    model, _ = build_tiny_model()
    targets = find_targets(model, projections=("gate", "up"))
    assert len(targets) == 8 and {t.proj for t in targets} == {"gate", "up"}
    with pytest.raises(MemkfacError, match="unknown projection"):
        find_targets(model, projections=("o",))


def test_patterns_override_the_default_rule():
    model, _ = build_tiny_model()
    globbed = find_targets(model, patterns=["*.layers.2.self_attn.[qv]_proj"])
    assert [(t.name, t.layer, t.proj) for t in globbed] == [
        ("model.layers.2.self_attn.q_proj", 2, "q"),
        ("model.layers.2.self_attn.v_proj", 2, "v"),
    ]
    regexed = find_targets(model, layers=[0], patterns=[r"re:model\.layers\.\d+\.mlp\.(up|down)_proj"])
    assert [t.name for t in regexed] == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


def test_no_match_lists_the_linear_modules_found():
    model, _ = build_tiny_model()
    with pytest.raises(MemkfacError) as e:
        find_targets(model, patterns=["*.fc_in"])
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "lm_head" in msg and "fix:" in msg
    with pytest.raises(MemkfacError, match="in layers \\[7\\]"):
        find_targets(model, layers=[7])


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("22,23,24", [22, 23, 24]),
        ("22-24", [22, 23, 24]),
        ("20-21, 25", [20, 21, 25]),
        ("all", list(range(30))),
        ("-1", [29]),
    ],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 30) == expected


@pytest.mark.parametrize("spec", ["30", "x", "", "24-22", "-31"])
def test_parse_layers_rejects_bad_specs(spec):
    with pytest.raises(MemkfacError, match="layer spec"):
        parse_layers(spec, 30)
