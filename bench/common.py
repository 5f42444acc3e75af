"""What the benchmarks share: timing that waits for the device, and the result file.

Each benchmark writes ``bench/results/<name>.json`` (atomically) with the machine it ran on, so that a
number in docs/results.md can be traced to a run and the conditions it ran under.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from memkfac.paths import write_json

RESULTS = Path(__file__).resolve().parent / "results"
T = TypeVar("T")


def sync(device: torch.device | None) -> None:
    """Wait for queued GPU work, so that a timer measures it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device | None = None) -> tuple[T, float]:
    """``(fn(), seconds)``, synchronizing ``device`` before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def machine() -> dict:
    """Where and under what load a benchmark ran."""
    return {
        "machine": " ".join(f"{platform.machine()} {platform.processor() or ''} {platform.node()}".split()),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
    }


def write_result(name: str, result: dict) -> Path:
    """Write ``result`` and ``machine()`` to ``bench/results/<name>.json``; print and return the path."""
    path = write_json(RESULTS / f"{name}.json", {**machine(), **result})
    print(f"-> {path}")
    return path
