"""``--device`` (and ``--dtype``) on every command that runs a model, from one helper: a misspelt
device is a usage error (exit 2); a device this machine lacks fails at the start naming the option
(exit 1), before any model is read."""

from __future__ import annotations

import pytest
import torch

from memkfac.cli import main

# each command with the least it needs to parse (the paths are never read: the device check comes first)
COMMANDS = {
    "eval": ["m", "--probes", "p.jsonl", "--variant", "v"],
    "compare": ["m", "--probes", "p.jsonl", "--corpus", "c"],
    "inject": ["m"],
    "bsn": ["m", "--probes", "p.jsonl", "--retain", "c", "--layers", "1", "--out", "o"],
    "mine": ["m", "--text", "stdlib"],
    "bands": ["m", "--factors", "f", "--layers", "1", "--probes", "p.jsonl", "--clean", "c"],
    "downstream": ["m", "--variant", "v"],
    "edit": ["m", "--layers", "1", "--factors", "f", "--out", "o"],
    "factors": ["m", "--out", "o"],
    "eigen": ["f"],
}
WITH_DTYPE = {"eval", "compare", "mine", "bands", "downstream", "factors"}  # the others train or edit in fp32


@pytest.mark.parametrize("command", COMMANDS)
def test_a_misspelt_device_is_a_usage_error(command, capsys):
    assert main([command, *COMMANDS[command], "--device", "gpu0"]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "not a device memkfac runs on" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("command", COMMANDS)
def test_an_absent_device_fails_at_the_start_naming_the_option(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEMKFAC_HOME", str(tmp_path))
    assert main([command, *COMMANDS[command], "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert f"memkfac {command}: error: --device is 'cuda' but CUDA is not available here" in err, err
    assert "set --device to cpu" in err
    assert list(tmp_path.iterdir()) == []  # nothing was written


@pytest.mark.parametrize("command", COMMANDS)
def test_dtype_is_offered_where_the_model_only_runs_forward(command, capsys):
    status = main([command, *COMMANDS[command], "--dtype", "float64"])
    assert status == 2
    err = capsys.readouterr().err
    if command in WITH_DTYPE:
        assert "argument --dtype: invalid choice: 'float64'" in err, err
    else:
        assert "unrecognized arguments: --dtype float64" in err, err
