"""Where a model runs: checking a device or dtype setting before any work starts.

Every engine entry point that loads a model takes ``device`` (and ``dtype``) and calls
``resolve_device`` first, so that ``cuda`` on a machine without CUDA, ``cuda:3`` with one GPU or a
misspelt device fails at once with a message naming the setting (``what``: ``--device``,
``MEMKFAC_FACTOR_DEVICE``, ...), never as a traceback from inside torch halfway through a run.
Under torchrun, ``rank_device`` places each process of a node on its own GPU and ``process_group``
joins the ranks (the ``memkfac factors`` command and the pipeline's Pipes factor script share both).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
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


def rank_device(device: str, what: str = "device", processes: str = "processes") -> torch.device:
    """This process's ``torch.device``: ``device`` checked (``resolve_device``); under torchrun with
    several processes on this node (``LOCAL_WORLD_SIZE``), local process r takes cuda:r, after checking
    that the node has a GPU for each (several processes on mps are refused). ``what`` and ``processes``
    name the device and the process-count settings in errors."""
    import torch

    resolved = resolve_device(device, what)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world > 1 and resolved.type == "mps":
        raise MemkfacError(
            f"{processes}={local_world} processes on mps: there is one Apple GPU", f"set {processes} to 1"
        )
    if local_world > 1 and resolved.type == "cuda":
        visible = torch.cuda.device_count()
        if local_world > visible:
            raise MemkfacError(
                f"{processes} is {local_world} but this node has {visible} visible GPU(s); "
                "each process takes one",
                f"set {processes} to at most {visible}, or give the step more GPUs",
            )
        resolved = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(resolved)
    return resolved


@contextlib.contextmanager
def process_group(device: str | torch.device) -> Iterator[tuple[int, int]]:
    """Under torchrun (``WORLD_SIZE`` > 1), this process in the process group for the block: NCCL on
    cuda, gloo otherwise. Yields ``(rank, world)``; ``(0, 1)`` outside torchrun."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield 0, 1
        return
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), world
    finally:
        dist.destroy_process_group()
