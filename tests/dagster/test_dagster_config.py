"""The pipeline YAML: the shipped configs load, and bad input is rejected naming the key."""

from __future__ import annotations

import pytest
import yaml

from memkfac.errors import MemkfacError
from resources.config import default_config_path, load_config, parse_config
from tests.dagster.conftest import TINY_CONFIG


def _tiny_raw() -> dict:
    return yaml.safe_load(TINY_CONFIG.read_text().replace("${MEMKFAC_HOME}", "/data"))


def test_default_config_loads_with_variants():
    config = load_config(default_config_path())
    assert list(config.models) == ["smollm2-135m"]
    assert config.variants[0] == "smollm2-135m__base"
    assert "smollm2-135m__kfac-r0.95" in config.variants
    assert config.resurgence_variants == ["smollm2-135m__base", "smollm2-135m__kfac-r0.95"]
    assert config.resurgence.steps == (10, 50, 200)


def test_env_references_expand(tiny_home):
    config = load_config(TINY_CONFIG)
    assert config.models["tiny-llama"].source == f"{tiny_home}/inputs/tiny-llama"


def test_unset_env_reference_names_key(monkeypatch, tmp_path):
    monkeypatch.delenv("MEMKFAC_HOME", raising=False)
    with pytest.raises(MemkfacError, match=r"models.tiny-llama.source references \$\{MEMKFAC_HOME\}"):
        load_config(TINY_CONFIG)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["models"].update({"../evil": {"source": "x"}}),
            r"models\.\.\./evil: invalid model name",
        ),
        (lambda c: c["models"].update({"a__b": {"source": "x"}}), r"models\.a__b: .* contains '__'"),
        (
            lambda c: c["edits"].update({"base": {"method": "kfac", "layers": "1"}}),
            r"edits\.base: 'base' is reserved",
        ),
        (lambda c: c["edits"]["kfac-r0.9"].update(keep_mass=1.5), r"edits\.kfac-r0\.9\.keep_mass is 1\.5"),
        (lambda c: c["edits"]["kfac-r0.9"].update(method="magic"), r"edits\.kfac-r0\.9\.method is 'magic'"),
        (lambda c: c["edits"]["kfac-r0.9"].pop("layers"), r"edits\.kfac-r0\.9\.layers is missing"),
        (lambda c: c["edits"]["kfac-r0.9"].update(rho=0.5), r"unknown key edits\.kfac-r0\.9\.rho"),
        (lambda c: c.update(probe_sets=["/etc/passwd"]), r"probe_sets\[0\]: invalid probe-set name"),
        (lambda c: c["resurgence"].update(steps=[50, 10]), r"resurgence\.steps is \[50, 10\]"),
        (lambda c: c["resurgence"].update(edits=["nope"]), r"resurgence\.edits names 'nope'"),
        (lambda c: c["resurgence"].update(general_len=64), r"general_len is 64; the corpus blocks"),
        (lambda c: c["resurgence"].update(general_len=0), r"resurgence\.general_len is 0"),
        (lambda c: c.update(modells={}), r"unknown key modells"),
        (lambda c: c["models"]["tiny-llama"].update(source=3), r"models\.tiny-llama\.source has type int"),
        (lambda c: c["evaluation"].update(stres=True), r"unknown key evaluation\.stres"),
        (lambda c: c["evaluation"].update(mia="yes"), r"evaluation\.mia has type str"),
        (lambda c: c["evaluation"].update(stress_t=True), r"evaluation\.stress_t is a boolean"),
    ],
)
def test_bad_config_names_the_key(edit, message):
    raw = _tiny_raw()
    edit(raw)
    with pytest.raises(MemkfacError, match=message):
        parse_config(raw)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(MemkfacError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(MemkfacError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", [default_config_path(), TINY_CONFIG])
def test_config_sections_fit_the_engine_arguments(path, monkeypatch, tmp_path):
    """Every engine section of the shipped configs builds its memkfac arguments object (no typos)."""

    from memkfac.balanced_subnet import BSNArguments
    from memkfac.canaries import CanaryArguments
    from memkfac.editing import EditArguments
    from memkfac.factors import FactorArguments
    from memkfac.finetune import FinetuneArguments
    from memkfac.inject import InjectArguments
    from memkfac.resurgence import ResurgenceArguments
    from memkfac.targets import parse_layers
    from memkfac.tiny import tiny_config

    monkeypatch.setenv("MEMKFAC_HOME", str(tmp_path))
    config = load_config(path)
    n_layers = 30 if path == default_config_path() else tiny_config().num_hidden_layers
    CanaryArguments(**config.canaries)
    injection = dict(config.injection)
    finetune = FinetuneArguments(**injection.pop("finetune", {}))
    InjectArguments(**injection, finetune=finetune)
    factors = dict(config.factors)
    FactorArguments(layers=parse_layers(str(factors.pop("layers")), n_layers), **factors)
    for spec in config.edits.values():
        layers = parse_layers(spec.layers, n_layers)
        if spec.method == "balanced_subnet":
            BSNArguments(layers=layers, projections=spec.projections, seed=spec.seed, **spec.options).check()
        else:
            EditArguments(
                layers=layers,
                projections=spec.projections,
                keep_mass=spec.keep_mass,
                method=spec.method,
                svd_drop=spec.svd_drop,
                seed=spec.seed,
                **spec.options,
            )
    r = config.resurgence
    ResurgenceArguments(
        steps=r.steps,
        recipes=r.recipes,
        lr=r.lr,
        batch_size=r.batch_size,
        general_len=r.general_len,
        train_layers=r.train_layers,
        seed=r.seed,
    )
    from assets.analysis import _downstream_args
    from assets.evaluation import eval_arguments

    _downstream_args(config)
    eval_arguments(config)


@pytest.mark.parametrize("bad", ["../x", "/etc", "a/b", "..", ""])
def test_store_paths_stay_inside_the_data_root(bad, tmp_path):
    from resources.store import ArtifactStore

    store = ArtifactStore(home=str(tmp_path))
    for path_of in (
        store.edit_dir,
        store.factor_dir,
        store.probe_file,
        lambda n: store.eval_table("memorization", n),
    ):
        with pytest.raises(MemkfacError, match="invalid"):
            path_of(bad)
