"""Where a model runs: checking a device or dtype setting before any work starts.

Every engine entry point that loads a model takes ``device`` (and ``dtype``) and calls
``resolve_device`` first, so that ``cuda`` on a machine without CUDA, ``cuda:3`` with one GPU or a
misspelt device fails at once with a message naming the setting (``what``: ``--device``,
``MEMKFAC_FACTOR_DEVICE``, ...), never as a traceback from inside torch halfway through a run.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from memkfac.errors import MemkfacError

if TYPE_CHECKING:  # torch is imported where a device is resolved: settings check names without it
    import torch

DEVICE_TYPES = ("cpu", "cuda", "mps")
DTYPES = ("float32", "bfloat16", "float16")
_DEVICE_NAME = re.compile(r"(cpu|mps|cuda)(:\d+)?")


def check_device_name(device: str, what: str = "device") -> str:
    """``device`` if it names a device memkfac runs on ("cpu", "cuda", "cuda:1", "mps"); whether it
    exists is ``resolve_device``'s question, asked where the work runs."""
    if not _DEVICE_NAME.fullmatch(str(device)):
        raise MemkfacError(
            f"{what} is {str(device)!r}, which is not a device memkfac runs on",
            f"use one of {', '.join(DEVICE_TYPES)} (or cuda:N for the N-th GPU)",
        )
    return str(device)


def resolve_device(device: str | torch.device, what: str = "device") -> torch.device:
    """The ``torch.device`` for ``device`` ("cpu", "cuda", "cuda:1", "mps"), checked to exist here.

    ``what`` names the setting in errors. "cuda" without an index is the current CUDA device.
    """
    import torch

    resolved = torch.device(check_device_name(device, what))
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            cuda = torch.version.cuda
            built = "a CPU-only build" if cuda is None else f"built for CUDA {cuda}"
            raise MemkfacError(
                f"{what} is {str(device)!r} but CUDA is not available here (torch {torch.__version__}, "
                f"{built}; no GPU visible)",
                f"set {what} to cpu, or run on a machine with an NVIDIA GPU and a CUDA build of torch "
                "(check nvidia-smi and CUDA_VISIBLE_DEVICES)",
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise MemkfacError(
                f"{what} is {str(device)!r} but only {count} GPU(s) are visible (cuda:0..cuda:{count - 1})",
                f"set {what} to cuda or cuda:N with N < {count} (CUDA_VISIBLE_DEVICES sets what is visible)",
            )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise MemkfacError(
            f"{what} is 'mps' but Apple's Metal backend is not available here",
            f"set {what} to cpu (mps needs macOS on Apple silicon with a torch build that has it)",
        )
    return resolved


def resolve_dtype(dtype: str, device: str | torch.device = "cpu", what: str = "dtype") -> torch.dtype:
    """The ``torch.dtype`` named ``dtype``, checked to be usable on ``device`` (bf16 on a GPU that has it)."""
    import torch

    if dtype not in DTYPES:
        raise MemkfacError(f"{what} is {dtype!r}, an unknown dtype", f"use one of {', '.join(DTYPES)}")
    device = torch.device(device)
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MemkfacError(
            f"{what} is bfloat16 but {torch.cuda.get_device_name(device)} has no bfloat16 support",
            f"set {what} to float32 (or float16) on this GPU",
        )
    return getattr(torch, dtype)
