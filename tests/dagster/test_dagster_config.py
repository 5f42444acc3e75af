"""The pipeline YAML: the shipped configs load, and bad input is rejected on load naming the key path.

Every section gets a misspelled key at each depth, a wrong type and an out-of-range value; the
problems of one file are reported together; the published JSON Schema is the models' current one.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from memkfac.errors import MemkfacError
from resources.config import (
    SCHEMA_PATH,
    ConfigError,
    default_config_path,
    json_schema,
    load_config,
    parse_config,
)
from tests.dagster.conftest import PROJECT, TINY_CONFIG


def _tiny_raw() -> dict:
    return yaml.safe_load(TINY_CONFIG.read_text().replace("${MEMKFAC_HOME}", "/data"))


def _problems(change) -> dict[str, str]:
    """``{key path: problem and fix}`` of the tiny config after ``change(raw)``."""
    raw = _tiny_raw()
    change(raw)
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    return {p.key: f"{p.problem}; {p.fix}" for p in error.value.problems}


def _baseline(name: str, method: str, key: str, value):
    """A change adding edit ``name`` of ``method`` (a baseline) with ``key: value``."""
    return _set("edits", name, value={"method": method, "layers": "1-2", key: value})


def _set(*path, value):
    """A change setting ``raw[path[0]]...[path[-1]] = value`` (creating mappings on the way)."""

    def change(raw):
        node = raw
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    return change


# (change, key path, words of its problem or fix)
MISSPELLED = [
    (_set("modells", value={}), "modells", "did you mean 'models'"),
    (_set("models", "tiny-llama", "sorce", value="x"), "models.tiny-llama.sorce", "did you mean 'source'"),
    (_set("corpus", "blok_len", value=32), "corpus.blok_len", "did you mean 'block_len'"),
    (_set("corpus", "max_tokens", "factr", value=64), "corpus.max_tokens.factr", "did you mean 'factor'"),
    (
        _set("corpus", "fractions", value={"factor": 0.8, "fintune": 0.2}),
        "corpus.fractions.fintune",
        "finetune",
    ),
    (_set("canaries", "n_trainde", value=8), "canaries.n_trainde", "did you mean 'n_trained'"),
    (_set("injection", "canaries_per_bach", value=4), "injection.canaries_per_bach", "'canaries_per_batch'"),
    (_set("injection", "finetune", "epochz", value=3), "injection.finetune.epochz", "did you mean 'epochs'"),
    (_set("factors", "max_tokenz", value=5), "factors.max_tokenz", "did you mean 'max_tokens'"),
    (
        _set("edits", "kfac-r0.9", "keep_mas", value=0.9),
        "edits.kfac-r0.9.keep_mas",
        "did you mean 'keep_mass'",
    ),
    (_set("edits", "balanced-subnet", "epoch", value=2), "edits.balanced-subnet.epoch", "'epochs'"),
    (_set("edits", "balanced-subnet", "keep_mass", value=0.5), "edits.balanced-subnet.keep_mass", "ratio"),
    (_set("edits", "kfac-r0.9", "method", value="kfc"), "edits.kfac-r0.9.method", "did you mean 'kfac'"),
    (_baseline("ga-gd", "ga_gd", "stepz", 3), "edits.ga-gd.stepz", "did you mean 'steps'"),
    (_baseline("npo", "npo", "bta", 0.1), "edits.npo.bta", "did you mean 'beta'"),
    (
        _baseline("flat", "block_deletion", "block_fractoin", 0.1),
        "edits.flat.block_fractoin",
        "block_fraction",
    ),
    (_set("edits", "x", value={"method": "npoo", "layers": "1"}), "edits.x.method", "did you mean 'npo'"),
    (_set("evaluation", "stres", value=True), "evaluation.stres", "did you mean 'stress'"),
    (_set("downstream", "n_itemz", value=10), "downstream.n_itemz", "did you mean 'n_items'"),
    (_set("bands", "taks", value=["copying"]), "bands.taks", "did you mean 'tasks'"),
    (_set("resurgence", "stepz", value=[1]), "resurgence.stepz", "did you mean 'steps'"),
    (_set("resurgence", "arms", value=["retian"]), "resurgence.arms[0]", "did you mean 'retain'"),
    # the key before the attack arms: its replacement named, with the mapping of its values
    (_set("resurgence", "recipes", value=["general"]), "resurgence.recipes", "did you mean 'arms'"),
    (_set("resurgence", "recipes", value=["general"]), "resurgence.recipes", "partial_forget -> relearn"),
    (_set("mlflow", "experimnt", value="x"), "mlflow.experimnt", "did you mean 'experiment'"),
    (_set("compute", "devise", value="cpu"), "compute.devise", "did you mean 'device'"),
    (
        _set("compute", "steps", "memorization_evl", value={"dtype": "bfloat16"}),
        "compute.steps.memorization_evl",
        "did you mean 'memorization_eval'",
    ),
    (_set("compute", "steps", "factors", "dtyp", value="bfloat16"), "compute.steps.factors.dtyp", "'dtype'"),
    (_set("compute", "slurm", "partiton", value="gpu"), "compute.slurm.partiton", "'partition'"),
    (_set("compute", "k8s", "volume", value="home"), "compute.k8s.volume", "'volume_claim'"),
    (_set("watch", "max_recal_pct", value=5), "watch.max_recal_pct", "did you mean 'max_recall_pct'"),
]
WRONG_TYPE = [
    (_set("models", "tiny-llama", "source", value=3), "models.tiny-llama.source", "give a string"),
    (
        _set("models", "tiny-llama", "inject_canaries", value="yes"),
        "models.tiny-llama.inject_canaries",
        "true",
    ),
    (_set("corpus", "block_len", value="32"), "corpus.block_len", "whole number"),
    (_set("corpus", "max_tokens", "factor", value=1.5), "corpus.max_tokens.factor", "whole number"),
    (_set("canaries", "seed", value=0.5), "canaries.seed", "whole number"),
    (_set("canaries", value={"file": 3}), "canaries.file", "give a string"),
    (_set("injection", value=5), "injection", "mapping"),
    (_set("injection", "finetune", "lr", value="fast"), "injection.finetune.lr", "give a number"),
    (_set("factors", "layers", value=3.5), "factors.layers", "a list or a string"),
    (_set("factors", "projections", value="gate"), "factors.projections", "list"),
    (
        _set("edits", "kfac-r0.9", "overrides", value={"2.gate": "high"}),
        "edits.kfac-r0.9.overrides.2.gate",
        "number",
    ),
    (_set("edits", "svd-drop25", "layers", value=[2, "x"]), "edits.svd-drop25.layers[1]", "whole number"),
    (_set("evaluation", "mia", value="yes"), "evaluation.mia", "true or false"),
    (_baseline("npo", "npo", "beta", "high"), "edits.npo.beta", "number"),
    (_baseline("ga-gd", "ga_gd", "steps", 2.5), "edits.ga-gd.steps", "whole number"),
    (_baseline("noise", "noise", "overrides", {"1.up": "big"}), "edits.noise.overrides.1.up", "number"),
    (_set("evaluation", "stress_t", value=True), "evaluation.stress_t", "whole number"),
    (
        _set("evaluation", "max_perplexity_increase", value="10%"),
        "evaluation.max_perplexity_increase",
        "number",
    ),
    (_set("downstream", "tasks", value="copying"), "downstream.tasks", "list"),
    (_set("bands", "max_tokens", value=[500]), "bands.max_tokens", "whole number"),
    (_set("resurgence", "edits", value="kfac-r0.9"), "resurgence.edits", "list"),
    (_set("resurgence", "unrelated_count", value="ten"), "resurgence.unrelated_count", "whole number"),
    (_set("resurgence", "arms", value="retain"), "resurgence.arms", "list"),
    (_set("mlflow", "tracking_uri", value=5), "mlflow.tracking_uri", "string"),
    (_set("compute", "device", value=0), "compute.device", "give a string"),
    (_set("compute", "processes", value="2"), "compute.processes", "whole number"),
    (_set("compute", "threads", value=1.5), "compute.threads", "whole number"),
    (_set("compute", "steps", value=["factors"]), "compute.steps", "mapping"),
    (_set("compute", "steps", "factors", "threads", value="4"), "compute.steps.factors.threads", "whole"),
    (_set("compute", "slurm", "extra_args", value="--qos=x"), "compute.slurm.extra_args", "list"),
    (_set("compute", "k8s", "gpus", value="one"), "compute.k8s.gpus", "whole number"),
    (_set("watch", "interval_seconds", value="5m"), "watch.interval_seconds", "whole number"),
]
OUT_OF_RANGE = [
    (_set("models", value={}), "models", "is empty"),
    (_set("corpus", "block_len", value=1), "corpus.block_len", "below 2"),
    (
        _set("corpus", "fractions", value={"factor": 0.5, "finetune": 0.1, "heldout": 0.1}),
        "corpus.fractions",
        "1",
    ),
    (_set("canaries", "n_trained", value=1), "canaries.n_trained", "sweep and a holdout"),
    (_set("injection", "heldout_blocks", value=0), "injection.heldout_blocks", "below 1"),
    (_set("injection", "finetune", "decay", value="cosine"), "injection.finetune.decay", "constant"),
    (_set("injection", "finetune", "epochs", value=0), "injection.finetune.epochs", "below 1"),
    (_set("factors", "batch_size", value=0), "factors.batch_size", "must be positive"),
    (_set("factors", "layers", value="3-1"), "factors.layers", "names no layers"),
    (_set("edits", "kfac-r0.9", "keep_mass", value=0), "edits.kfac-r0.9.keep_mass", "outside (0, 1]"),
    (_set("edits", "kfac-r0.9", "keep_mass", value=1.5), "edits.kfac-r0.9.keep_mass", "outside (0, 1]"),
    (
        _set("edits", "kfac-r0.9", "overrides", value={"2.gate": 0}),
        "edits.kfac-r0.9.overrides",
        "outside (0, 1]",
    ),
    (_set("edits", "svd-drop25", "svd_drop", value=1.0), "edits.svd-drop25.svd_drop", "outside [0, 1)"),
    (_set("edits", "balanced-subnet", "ratio", value=1.5), "edits.balanced-subnet.ratio", "(0, 1)"),
    (_baseline("ga-gd", "ga_gd", "steps", 0), "edits.ga-gd.steps", "below 1"),
    (_baseline("npo", "npo", "beta", 0), "edits.npo.beta", "not positive"),
    (_baseline("flat", "block_deletion", "block_fraction", 1.5), "edits.flat.block_fraction", "[0, 1]"),
    (_baseline("id", "identity_basis", "keep_mass", 0), "edits.id.keep_mass", "outside (0, 1]"),
    (_baseline("noise", "noise", "noise_norm", -0.1), "edits.noise.noise_norm", "below 0"),
    (_set("evaluation", "batch_size", value=0), "evaluation.batch_size", "below 1"),
    (_set("evaluation", "max_perplexity_increase", value=-0.1), "evaluation.max_perplexity_increase", "0"),
    (_set("downstream", "n_items", value=10), "downstream.n_items", "below 200"),
    (_set("bands", "bases", value=["kfac", "pca"]), "bands.bases[1]", "use one of kfac, svd"),
    (_set("bands", "tasks", value=["no_such_task"]), "bands.tasks", "unknown generated task"),
    (_set("resurgence", "steps", value=[50, 10]), "resurgence.steps", "increasing and positive"),
    (_set("resurgence", "general_len", value=64), "resurgence.general_len", "corpus.block_len (32)"),
    (_set("resurgence", "edits", value=["nope"]), "resurgence.edits[0]", "not under edits"),
    (_set("resurgence", "cron", value="weekly"), "resurgence.cron", "five fields"),
    (_set("resurgence", "unrelated_count", value=0), "resurgence.unrelated_count", "below 1"),
    (_set("resurgence", "unrelated_len", value=64), "resurgence.unrelated_len", "corpus.block_len (32)"),
    (_set("resurgence", "seed", value=-1), "resurgence.seed", "below 0"),
    (_set("resurgence", "arms", value=[]), "resurgence.arms", "non-empty selection"),
    (_set("compute", "device", value="gpu"), "compute.device", "not a device memkfac runs on"),
    (_set("compute", "device", value="cuda:x"), "compute.device", "cuda:N for the N-th GPU"),
    (_set("compute", "dtype", value="float64"), "compute.dtype", "float32, bfloat16, float16"),
    (_set("compute", "threads", value=0), "compute.threads", "below 1"),
    (_set("compute", "processes", value=0), "compute.processes", "greater than or equal to 1"),
    (
        _set("compute", "steps", "factors", "device", value="tpu"),
        "compute.steps.factors.device",
        "not a device",
    ),
    (_set("compute", "steps", "bands", "threads", value=0), "compute.steps.bands.threads", "below 1"),
    (
        _set("compute", "steps", "injection", "dtype", value="bfloat16"),
        "compute.steps.injection.dtype",
        "remove compute.steps.injection.dtype",
    ),
    (_set("compute", "dtype", value="float16"), "compute.dtype", "factor collection does not run in"),
    (
        _set("compute", "steps", "factors", "dtype", value="float16"),
        "compute.steps.factors.dtype",
        "use float32 or bfloat16",
    ),
    (
        _set("compute", value={"device": "cuda:1", "processes": 2}),
        "compute.device",
        "each process takes its own GPU",
    ),
    (
        _set("compute", value={"device": "cuda", "processes": 4, "slurm": {"gpus": 2}}),
        "compute.slurm.gpus",
        "one GPU per process",
    ),
    (_set("compute", "k8s", "gpus", value=-1), "compute.k8s.gpus", "greater than or equal to 0"),
    (_set("factors", "model_dtype", value="bfloat16"), "factors.model_dtype", "compute.steps.factors.dtype"),
    (_set("downstream", "device", value="cuda"), "downstream.device", "compute.steps.downstream.device"),
    (_set("watch", "interval_seconds", value=5), "watch.interval_seconds", "below 30"),
    (_set("watch", "max_recall_pct", value=120), "watch.max_recall_pct", "outside [0, 100]"),
]


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        pytest.param(*case, id=f"{kind}-{case[1]}")
        for kind, cases in (("misspelled", MISSPELLED), ("type", WRONG_TYPE), ("range", OUT_OF_RANGE))
        for case in cases
    ],
)
def test_bad_key_fails_on_load_naming_its_path(change, key, words):
    problems = _problems(change)
    assert key in problems, problems
    assert words in problems[key], problems[key]


def test_every_section_is_covered():
    """Each top-level section is broken in all three ways above (mlflow holds two free strings: no range).
    ``extends`` is read before validation: test_extends_lays_a_file_over_another breaks it."""
    sections = set(json_schema()["properties"]) - {"extends"}
    for cases, exempt in ((MISSPELLED, set()), (WRONG_TYPE, set()), (OUT_OF_RANGE, {"mlflow"})):
        covered = {re.split(r"[.\[]", key)[0] for _, key, _ in cases}
        assert sections - exempt <= covered, sections - exempt - covered


def test_all_problems_are_reported_at_once():
    def change(raw):
        raw["injection"]["finetune"]["epochz"] = 3
        raw["corpus"]["max_tokens"]["factr"] = 4
        raw["edits"]["kfac-r0.9"]["keep_mass"] = 0
        raw["evaluation"]["mia"] = "yes"
        raw["modells"] = {}

    problems = _problems(change)
    assert set(problems) == {
        "injection.finetune.epochz",
        "corpus.max_tokens.factr",
        "edits.kfac-r0.9.keep_mass",
        "evaluation.mia",
        "modells",
    }


def test_config_error_message_lists_every_key_and_the_fix():
    raw = _tiny_raw()
    raw["factors"]["fisher"] = "true"
    raw["downstream"]["n_itemz"] = 10
    with pytest.raises(MemkfacError) as error:
        parse_config(raw, "my.yaml")
    text = str(error.value)
    assert "pipeline config my.yaml has 2 errors" in text
    assert "factors.fisher: is 'true'; use one of sampled, empirical" in text
    assert "downstream.n_itemz: is not a known key; did you mean 'n_items'?" in text


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (lambda c: c["models"].update({"../evil": {"source": "x"}}), "models.../evil", "invalid model name"),
        (lambda c: c["models"].update({"a__b": {"source": "x"}}), "models.a__b", "contains '__'"),
        (lambda c: c["edits"].update({"base": {"layers": "1"}}), "edits.base", "reserved"),
        (lambda c: c["edits"].update({"x/y": {"layers": "1"}}), "edits.x/y", "invalid edit name"),
        (lambda c: c["edits"]["kfac-r0.9"].pop("layers"), "edits.kfac-r0.9.layers", "is missing"),
        (lambda c: c["models"]["tiny-llama"].pop("source"), "models.tiny-llama.source", "is missing"),
        (lambda c: c.update(canaries={"file": "inputs/none.jsonl"}), "canaries.file", "does not exist"),
        (
            lambda c: c.update(canaries={"file": "/etc/hostname", "n_trained": 8}),
            "canaries.n_trained",
            "set together with canaries.file",
        ),
    ],
)
def test_names_and_canary_file_are_checked(change, key, words, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMKFAC_HOME", str(tmp_path))
    problems = _problems(change)
    assert words in problems[key], problems


def test_default_and_tiny_configs_load_into_engine_arguments(monkeypatch, tmp_path):
    from memkfac.balanced_subnet import BSNArguments
    from memkfac.canaries import CanaryArguments
    from memkfac.editing import EditArguments
    from memkfac.finetune import FinetuneArguments

    default = load_config(default_config_path())
    assert list(default.models) == ["smollm2-135m"]
    assert default.variants[0] == "smollm2-135m__base"
    # the attack suite tests the edit expected to be the champion on the default (README numbers)
    assert default.resurgence_variants == ["smollm2-135m__base", "smollm2-135m__kfac-r0.9"]
    assert default.resurgence.arguments.steps == (10, 50, 200)
    assert default.resurgence.arguments.arms == ("retain", "relearn", "unrelated")
    assert (default.resurgence.arguments.unrelated_count, default.resurgence.arguments.unrelated_len) == (
        10,
        16,
    )
    assert default.resurgence.arguments.eval_batch_size == default.evaluation.arguments.batch_size == 64
    assert default.resurgence.arguments.batch_size == 2
    assert default.corpus.max_tokens == {"factor": 51200, "finetune": 65536, "heldout": 16384}
    assert default.factors.max_tokens == 51200
    assert default.canaries == CanaryArguments(n_trained=64, n_control=64, seed=0)
    assert default.injection.finetune == FinetuneArguments(
        epochs=14, lr=6e-4, warmup_steps=12, decay="linear", train_layers="14-29", train_embeddings=False
    )
    assert list(default.edits) == ["kfac-r0.9", "balanced-subnet"]
    assert default.edits["kfac-r0.9"] == EditArguments(layers="22-24", keep_mass=0.9)
    # 80 BalancedSubnet steps: 10 epochs over the 32 sweep canaries at 4 a step
    assert default.edits["balanced-subnet"] == BSNArguments(layers="22-24", epochs=10)
    assert default.edit_of("smollm2-135m__base") is None

    # configs/full.yaml: the default at the scale of docs/results.md's larger run
    full = load_config(default_config_path().with_name("full.yaml"))
    assert full.canaries == CanaryArguments(n_trained=128, n_control=128, seed=0)
    assert list(full.edits) == ["kfac-r0.9", "balanced-subnet", "kfac-r0.95", "svd-drop25"]
    assert full.edits["balanced-subnet"] == BSNArguments(layers="22-24", epochs=5)
    assert full.edit_of("smollm2-135m__svd-drop25").method == "svd"
    assert full.factors.max_tokens == 102400 and full.resurgence.arguments.batch_size == 4
    assert full.resurgence_variants == default.resurgence_variants

    monkeypatch.setenv("MEMKFAC_HOME", str(tmp_path))
    tiny = load_config(TINY_CONFIG)
    assert tiny.models["tiny-llama"].source == f"{tmp_path}/inputs/tiny-llama"
    assert tiny.canaries == CanaryArguments(n_trained=8, n_control=4, seed=0)
    assert tiny.canary_file is None and tiny.canary_source == tiny.canaries
    assert tiny.factors.layers == "all" and tiny.downstream.tasks == ("copying",)


def test_left_out_sections_take_the_engine_defaults():
    from memkfac.bands import BandArguments
    from memkfac.inject import InjectArguments

    config = parse_config({"models": {"m": {"source": "smollm2-135m"}}, "bands": None})
    assert config.injection == InjectArguments() and config.bands == BandArguments()
    assert config.downstream is None and config.edits == {} and config.variants == ["m__base"]


def test_yaml_floats_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("models: {m: {source: x}}\ninjection: {finetune: {lr: 6e-4}}\n")
    assert load_config(path).injection.finetune.lr == 6e-4


def test_env_references_expand_and_unset_ones_name_the_key(tiny_home, monkeypatch):
    assert load_config(TINY_CONFIG).models["tiny-llama"].source == f"{tiny_home}/inputs/tiny-llama"
    monkeypatch.delenv("MEMKFAC_HOME")
    with pytest.raises(ConfigError, match=r"models.tiny-llama.source: references \$\{MEMKFAC_HOME\}"):
        load_config(TINY_CONFIG)


def test_relative_canary_file_is_resolved_against_the_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMKFAC_HOME", str(tmp_path))
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "s.jsonl").write_text("{}\n")  # its content is checked by the canaries asset
    raw = _tiny_raw()
    raw["canaries"] = {"file": "inputs/s.jsonl"}
    config = parse_config(raw)
    assert config.canary_file == tmp_path / "inputs" / "s.jsonl" == config.canary_source


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(MemkfacError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(MemkfacError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_published_schema_is_current_and_the_configs_name_it():
    """Regenerate with: python -m resources.config --schema > configs/pipeline.schema.json"""
    assert json.loads(SCHEMA_PATH.read_text()) == json_schema()
    for config in sorted((PROJECT / "configs").glob("*.yaml")):
        assert config.read_text().startswith("# yaml-language-server: $schema=pipeline.schema.json\n"), config


def test_schema_describes_every_section_and_forbids_unknown_keys():
    schema = json_schema()
    defs = schema["$defs"]
    assert schema["additionalProperties"] is False and schema["then"] == {"required": ["models"]}
    assert schema["if"] == {"not": {"required": ["extends"]}} and "extends" in schema["properties"]
    assert defs["InjectArguments"]["properties"]["finetune"] == {"$ref": "#/$defs/FinetuneArguments"}
    assert all(d.get("additionalProperties") is False for d in defs.values() if "properties" in d)
    assert defs["FinetuneArguments"]["properties"]["decay"]["enum"] == ["constant", "linear"]
    edit = schema["properties"]["edits"]["additionalProperties"]["anyOf"]
    assert {e["$ref"].rsplit("/", 1)[-1] for e in edit} == {
        "EditArguments",
        "BSNArguments",
        "ForgetSetArguments",
        "LabelFreeArguments",
    }
    resurgence = defs["ResurgenceSection"]["properties"]
    assert {"steps", "lr", "edits", "cron"} <= set(resurgence) and "arguments" not in resurgence


def test_check_command_exit_status(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {m: {source: x}}\nfactors: {fisher: true}\n")
    run = subprocess.run(
        [sys.executable, "-m", "resources.config", str(bad)], cwd=PROJECT, capture_output=True, text=True
    )
    assert run.returncode == 2 and "factors.fisher: is True" in run.stderr


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


def test_baselines_are_edit_methods_of_the_config():
    from memkfac.forget_set import ForgetSetArguments
    from memkfac.label_free import LabelFreeArguments

    raw = _tiny_raw()
    raw["edits"] |= {
        "ga-gd": {"method": "ga_gd", "layers": "1-2", "steps": 40, "lr": 1e-4},
        "npo": {"method": "npo", "layers": "1-2", "beta": 0.2},
        "identity": {"method": "identity_basis", "layers": "1-2", "keep_mass": 0.9},
        "flat": {"method": "block_deletion", "layers": "1-2", "block_fraction": 0.3},
        "noise": {"method": "noise", "layers": "1-2", "noise_norm": 0.05},
    }
    config = parse_config(raw)
    assert config.edits["ga-gd"] == ForgetSetArguments(layers="1-2", steps=40, lr=1e-4)
    assert config.edits["npo"] == ForgetSetArguments(layers="1-2", method="npo", beta=0.2)
    assert config.edits["flat"] == LabelFreeArguments(
        layers="1-2", method="block_deletion", block_fraction=0.3
    )
    assert config.edit_of("tiny-llama__noise").noise_norm == 0.05


def test_extends_lays_a_file_over_another(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMKFAC_HOME", str(tmp_path))
    base = yaml.safe_load(TINY_CONFIG.read_text())
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    child = tmp_path / "sub" / "child.yaml"
    child.parent.mkdir()
    child.write_text(
        "extends: ../base.yaml\n"
        "canaries: {n_trained: 10}\n"  # a mapping merges: n_control and seed stay the base's
        "downstream: {tasks: [arithmetic]}\n"  # a list replaces
        'edits:\n  svd-drop25: null\n  kfac-r0.5: {method: kfac, layers: "2-3", keep_mass: 0.5}\n'
    )
    config = load_config(child)
    assert config.canaries.n_trained == 10 and config.canaries.n_control == base["canaries"]["n_control"]
    assert config.downstream.tasks == ("arithmetic",)
    assert "svd-drop25" not in config.edits and set(base["edits"]) - {"svd-drop25"} < set(config.edits)
    assert config.edits["kfac-r0.5"].keep_mass == 0.5
    assert list(config.models) == list(base["models"])

    # problems name the files, whichever holds the key
    child.write_text("extends: ../base.yaml\ncanaries: {n_trained: 1}\n")
    with pytest.raises(ConfigError, match=r"child.yaml \(extending .*base.yaml\)") as e:
        load_config(child)
    assert "canaries.n_trained" in str(e.value)

    for text, words in [
        ("extends: missing.yaml\n", "missing.yaml does not exist .*child.yaml extends it"),
        ("extends: child.yaml\n", "extend each other in a cycle"),
        ("extends: [../base.yaml]\n", "extends: is"),
        ("extend: ../base.yaml\n", "did you mean 'extends'"),
    ]:
        child.write_text(text)
        with pytest.raises(MemkfacError, match=words):
            load_config(child)
