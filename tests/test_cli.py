"""The `memkfac` command as a user meets it: instant help, --version, exit codes, one positional MODEL."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

import memkfac
from memkfac.cli import build_parser, main
from memkfac.models import DEFAULT_MODEL

PROJECT = Path(__file__).resolve().parents[1]

# Every command that reads a model, and MODEL's default where it may be left out.
MODEL_COMMANDS = {
    **dict.fromkeys(("edit", "eval", "compare", "factors", "downstream", "bands", "bsn")),
    **dict.fromkeys(("model prepare", "corpus build", "inject", "mine"), DEFAULT_MODEL),
}


def _commands(parser: argparse.ArgumentParser, path: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every leaf command's parser by its words, e.g. ``"model prepare"``."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        return {path: parser}
    found = {}
    for name, child in groups[0].choices.items():
        found |= _commands(child, f"{path} {name}".strip())
    return found


def test_help_of_every_command_imports_no_torch():
    """`memkfac --help` and `memkfac CMD --help` build the whole parser without torch or transformers."""
    commands = [c.split() for c in _commands(build_parser())]
    code = (
        "import json, sys\n"
        "from memkfac.cli import main\n"
        "codes = [main([*argv, '--help']) for argv in [[]] + json.loads(sys.argv[1])]\n"
        "heavy = [m for m in ('torch', 'transformers', 'dagster') if m in sys.modules]\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy}))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, json.dumps(commands)], capture_output=True, text=True, check=True
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0] * (len(commands) + 1), "heavy": []}
    assert ["model", "prepare"] in commands and ["probes", "validate"] in commands and ["eigen"] in commands


def test_version_is_the_package_metadata(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"memkfac {importlib.metadata.version('memkfac')}"
    assert importlib.metadata.version("memkfac") == memkfac.__version__  # one version, in memkfac/__init__


def test_every_command_that_reads_a_model_takes_it_as_the_positional_model():
    commands = _commands(build_parser())
    assert set(MODEL_COMMANDS) <= set(commands)
    for words, parser in commands.items():
        assert not any("--model" in a.option_strings for a in parser._actions), words
        model = [a for a in parser._actions if a.dest == "model" and not a.option_strings]
        if words in MODEL_COMMANDS:
            assert model and model[0].metavar == "MODEL", words
            assert parser.get_default("model") == MODEL_COMMANDS[words], words
        else:
            assert not model, words
    parse = build_parser().parse_args
    assert parse(["inject"]).model == DEFAULT_MODEL
    assert parse(["inject", "my/model_dir", "--epochs", "2"]).model == "my/model_dir"
    assert parse(["mine", "my_dir", "--text", "stdlib"]).model == "my_dir"
    assert parse(["corpus", "build", "--corpus", "notes.txt"]).model == DEFAULT_MODEL


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["edit", "M", "--layers", "1", "--keep-mass", "0", "--out", "E"],
            "argument --keep-mass: keep mass 0.0",
        ),
        (["edit", "M", "--layers", "1", "--keep-mass", "six", "--out", "E"], "expected a number such as 0.6"),
        (
            ["edit", "M", "--layers", "1", "--keep-mass-for", "1.up=1.5", "--out", "E"],
            "keep mass 1.5 is outside",
        ),
        (["edit", "M", "--layers", "1", "--out", "E"], "--method kfac needs --factors"),
        (["eval", "M", "--probes", "p.jsonl", "--variant", "a/b"], "argument --variant: invalid name 'a/b'"),
        (
            [
                "bands",
                "M",
                "--factors",
                "F",
                "--layers",
                "1",
                "--probes",
                "p",
                "--clean",
                "c",
                "--variant",
                "..",
            ],
            "argument --variant: invalid name '..'",
        ),
        (
            ["factors", "M", "--tokens", "0", "--out", "F"],
            "argument --tokens: expected an integer >= 1, got '0'",
        ),
        (
            ["factors", "M", "--block-len", "1", "--out", "F"],
            "argument --block-len: expected an integer >= 2",
        ),
        (["inject", "--epochs", "-1"], "argument --epochs: expected an integer >= 1"),
        (
            ["downstream", "M", "--variant", "v", "--n-items", "10"],
            "argument --n-items: expected an integer >= 200",
        ),
        (["downstream", "M"], "MODEL and --variant are required"),
        (
            ["compare", "M", "--probes", "p", "--corpus", "c", "--rhos", "0.9,x"],
            "expected comma-separated numbers",
        ),
        (["edit", "M", "--layers", "1", "--out", "E", "--bogus"], "unrecognized arguments: --bogus"),
        (["edit"], "the following arguments are required: MODEL"),
    ],
)
def test_a_bad_value_is_a_usage_error_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEMKFAC_HOME", str(tmp_path / "home"))
    assert main(argv) == 2  # model "M" does not exist: reaching it would be a runtime error, status 1
    err = capsys.readouterr().err
    assert message in err, err
    assert "usage: memkfac" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layers", "7"], "layer spec '7' names layers [7] outside the model's 0..3"),
        (["--layers", "1-x"], "cannot parse layer spec '1-x'"),
        (
            ["--layers", "1", "--keep-mass-for", "2.gate=0.8"],
            "keep-mass override '2.gate' names no edited module",
        ),
        (["--layers", "1", "--proj", "gate,mlp"], "unknown or no projections: ['gate', 'mlp']"),
    ],
)
def test_a_value_the_model_cannot_take_is_a_usage_error(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "edited"
    assert main(["edit", str(tiny_model_dir), "--method", "svd", *extra, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "usage: memkfac edit" in err
    assert not out.exists()


def test_a_runtime_error_exits_1_with_the_fix_and_no_traceback(tmp_path, capsys):
    argv = [
        "edit",
        str(tmp_path / "no-model"),
        "--method",
        "svd",
        "--layers",
        "1",
        "--out",
        str(tmp_path / "e"),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("memkfac edit: error:") and "fix:" in err
    assert "usage:" not in err and "Traceback" not in err


def test_the_installed_command_exits_with_these_statuses(tmp_path):
    memkfac_cmd = Path(sys.executable).with_name("memkfac")

    def status(*argv: str) -> int:
        return subprocess.run([memkfac_cmd, *argv], capture_output=True, cwd=tmp_path).returncode

    assert status("--version") == 0
    assert status("factors", "M", "--tokens", "0", "--out", "F") == 2
    assert status("no-such-command") == 2
    assert status("probes", "validate", str(tmp_path / "missing.jsonl")) == 1
