"""The edit methods by name: each one's arguments dataclass, how it runs, and the check of its output.

A pipeline ``edits:`` entry names a method and gives its arguments (``resources/config.py`` builds
the union of every method's arguments from ``METHODS``); ``apply_edit`` runs it. Every method reads
the same ``EditInputs``: the model, its K-FAC eigenbasis (methods that use curvature), the canary
probe set (the forget set is its memorized ``sweep`` half: the ``holdout`` half stays unseen, as for
the K-FAC edit's tuning), general-text blocks to retain. ``apply_edit`` takes the device.

The methods: the K-FAC edit and its controls (``kfac``, ``per_side``, ``svd``, ``random``:
``memkfac.editing``), the label-free baselines (``identity_basis``, ``block_deletion``, ``noise``:
``memkfac.label_free``) and the forget-set baselines (``balanced_subnet``: ``memkfac.balanced_subnet``;
``ga_gd``, ``npo``: ``memkfac.forget_set``). A forget-set method run without a forget set raises.

To add a method: an ``*Arguments`` dataclass with a ``method: Literal["<name>"]`` field and a
``__post_init__`` that checks the values, a run function ``(args, inputs, out_dir, progress,
overwrite, device) -> manifest`` that writes a checkpoint with ``memkfac.checkpoint.save_checkpoint``
(its manifest records the arguments under ``"arguments"``), and an entry in ``METHODS``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from memkfac import editing
from memkfac.balanced_subnet import BSNArguments, train_balanced_subnet
from memkfac.devices import resolve_device
from memkfac.editing import EditArguments, edit_model
from memkfac.forget_set import FORGET_SET_METHODS, ForgetSetArguments, train_forget_set
from memkfac.generation import probe_token_ids
from memkfac.label_free import LABEL_FREE_METHODS, LabelFreeArguments, edit_label_free
from memkfac.probes import Probe
from memkfac.targets import resolve_layers


@dataclass(frozen=True)
class EditInputs:
    model_dir: Path  # the model to edit (a Hugging Face directory)
    eigen_dir: Path | None = None  # its K-FAC eigenbasis, for the methods that use curvature
    probes: Sequence[Probe] = ()  # the canary probe set; its memorized sweep probes are the forget set
    retain: torch.Tensor | None = None  # (n_blocks, block_len) token ids of general text to keep


@dataclass(frozen=True)
class EditMethod:
    arguments: type  # the method's *Arguments dataclass
    # (args, inputs, out_dir, progress, overwrite, device: where the model is edited or trained)
    run: Callable[[Any, EditInputs, Path, bool, bool, str], dict]


def probe_sequences(probes: Sequence[Probe], tokenizer) -> list[list[int]]:
    """Token ids of each probe's prefix followed by its suffix."""
    return [sum(probe_token_ids(p, tokenizer), []) for p in probes]


def forget_probes(probes: Sequence[Probe]) -> list[Probe]:
    """The forget set of the methods that train on one: the memorized probes of split sweep."""
    return [p for p in probes if p.kind == "memorized" and p.split == "sweep"]


def forget_sequences(probes: Sequence[Probe], tokenizer) -> list[list[int]]:
    """The forget set's token ids, prefix followed by suffix."""
    return probe_sequences(forget_probes(probes), tokenizer)


def _forget_set(inputs: EditInputs) -> tuple[list[tuple[list[int], list[int]]], list]:
    """``(forget (prefix, suffix) ids, retain blocks)`` of ``inputs``, checked by the trainer before it
    loads anything."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(inputs.model_dir)
    forget = [tuple(probe_token_ids(p, tokenizer)) for p in forget_probes(inputs.probes)]
    return forget, [] if inputs.retain is None else inputs.retain.tolist()


def _curvature_edit(
    args: EditArguments, inputs: EditInputs, out_dir: Path, progress: bool, overwrite: bool, device: str
) -> dict:
    eigen_dir = None if args.method == "svd" else inputs.eigen_dir
    return edit_model(
        inputs.model_dir, eigen_dir, args, out_dir, progress=progress, overwrite=overwrite, device=device
    )


def _label_free(
    args: LabelFreeArguments, inputs: EditInputs, out_dir: Path, progress: bool, overwrite: bool, device: str
) -> dict:
    # the edit is a few eigenvector products per module: it runs where edit_label_free puts it (the CPU)
    eigen_dir = None if args.method == "noise" else inputs.eigen_dir
    return edit_label_free(inputs.model_dir, eigen_dir, args, out_dir, progress=progress, overwrite=overwrite)


def _forget_set_method(
    args: ForgetSetArguments, inputs: EditInputs, out_dir: Path, progress: bool, overwrite: bool, device: str
) -> dict:
    forget, retain = _forget_set(inputs)
    return train_forget_set(inputs.model_dir, forget, retain, args, out_dir, progress, overwrite, device)


def _balanced_subnet(
    args: BSNArguments, inputs: EditInputs, out_dir: Path, progress: bool, overwrite: bool, device: str
) -> dict:
    from transformers import AutoTokenizer

    forget = forget_sequences(inputs.probes, AutoTokenizer.from_pretrained(inputs.model_dir))
    retain = [] if inputs.retain is None else inputs.retain.tolist()
    return train_balanced_subnet(inputs.model_dir, forget, retain, args, out_dir, progress, overwrite, device)


METHODS: dict[str, EditMethod] = {
    **{name: EditMethod(EditArguments, _curvature_edit) for name in editing.METHODS},
    "balanced_subnet": EditMethod(BSNArguments, _balanced_subnet),
    **{name: EditMethod(ForgetSetArguments, _forget_set_method) for name in FORGET_SET_METHODS},
    **{name: EditMethod(LabelFreeArguments, _label_free) for name in LABEL_FREE_METHODS},
}
DEFAULT_METHOD = EditArguments.method  # what an edit entry without ``method`` runs: K-FAC editing


def apply_edit(
    args,
    inputs: EditInputs,
    out_dir: Path,
    progress: bool = True,
    overwrite: bool = False,
    device: str = "cpu",
) -> dict:
    """Run the method ``args.method`` names on ``inputs.model_dir``, writing ``out_dir``; its manifest.

    ``out_dir`` must be new, empty or, with ``overwrite``, an earlier checkpoint of the same method.
    ``device`` is where the weights are edited (or the mask trained); checked before anything runs.
    """
    resolve_device(device)  # before a method reads anything (BalancedSubnet tokenizes the forget set)
    return METHODS[args.method].run(args, inputs, out_dir, progress, overwrite, device)


def mean_fraction_kept(manifest: dict) -> float | None:
    """Mean fraction of components kept over the edited modules (None: the method keeps no such count)."""
    kept = [m["frac_kept"] for m in manifest.get("modules", []) if m.get("frac_kept") is not None]
    return sum(kept) / len(kept) if kept else None


def recorded_arguments(manifest: dict) -> dict | None:
    """The arguments an edit manifest records (``"arguments"``; the K-FAC edit's ``"config"``)."""
    return manifest.get("arguments", manifest.get("config"))


def check_edited_model(
    model_dir: Path,
    probes: Sequence[Probe],
    *,
    args=None,
    subject_dir: Path | None = None,
    factor_index: Path | None = None,
    device: str = "cpu",
) -> dict:
    """Load ``model_dir`` and run the probes (prefix + suffix) through it; for an edit (``args``), also
    check that its manifest names the current inputs: the ``subject_dir`` it was made from, its own
    weights, the factors of ``factor_index`` (methods that use curvature) and ``args`` themselves.

    Returns ``{"problems": [...], "finite_logits", "probes", "tokens"}``; no problems means it passed.
    """
    from memkfac.checkpoint import load_manifest
    from memkfac.finetune import collate
    from memkfac.fingerprint import model_fingerprint, sha256_file
    from memkfac.models import load_model

    model, tokenizer = load_model(model_dir, device=device)
    batch = collate(probe_sequences(probes, tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits
    finite = bool(torch.isfinite(logits[mask.bool()]).all())  # padding aside
    problems = [] if finite else ["non-finite logits"]
    if args is not None:
        manifest = load_manifest(model_dir)
        if manifest["base_model"]["fingerprint"] != model_fingerprint(subject_dir):
            problems.append("manifest base fingerprint differs from the subject model")
        if manifest["model_fingerprint"] != model_fingerprint(model_dir):
            problems.append("manifest weight fingerprint differs from the files")
        eigen = manifest.get("eigenbasis")
        if eigen is not None and eigen["factor_index_sha256"] != sha256_file(factor_index):
            problems.append("manifest eigenbasis comes from other factors than the current ones")
        wanted = json.loads(json.dumps(asdict(resolve_layers(args, model.config.num_hidden_layers))))
        if recorded_arguments(manifest) != wanted:
            problems.append("manifest arguments differ from the config")
    return {
        "problems": problems,
        "finite_logits": finite,
        "probes": len(batch["input_ids"]),
        "tokens": int(batch["attention_mask"].sum()),
    }
