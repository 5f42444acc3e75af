"""One writer per output directory: an exclusive lock held for a whole run.

The lock is a file next to the output, ``.<name>.memkfac-lock``, held with ``flock``: the kernel
releases it when its process dies, however it dies, so a killed run never blocks the next one. The file
names its holder (pid, host, process start time, command, torchrun run id), so a second run is refused
at once with a message naming the first. A lock file whose holder is gone is taken over, with a note.
When ``flock`` is not enforced (some network file systems), a lock naming a process that still runs
on this host (same pid *and* start time, so a reused pid does not count) is still refused.

Under torchrun the ranks of one run are one writer: the caller takes the lock on rank 0 only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from memkfac.errors import MemkfacError

_HELD: dict[str, list] = {}  # lock path -> [file descriptor, depth]: nested claims in one process


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_info() -> dict:
    """What a lock file records about the process holding it."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start_time": _start_time(os.getpid()),
        "boot_id": _boot_id(),
        "run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:300],
        "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def holder_is_running(info: dict) -> bool:
    """Whether the process a lock file names still runs on this host (pid reuse excluded)."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    if info.get("boot_id") and info["boot_id"] != _boot_id():
        return False
    if not _alive(info["pid"]):
        return False
    started = _start_time(info["pid"])
    return info.get("start_time") is None or started is None or started == info["start_time"]


def describe(info: dict) -> str:
    run = f", torchrun run {info['run_id']}" if info.get("run_id") else ""
    return (
        f"pid {info.get('pid')} on host {info.get('host')}{run}, since {info.get('since')}: "
        f"`{info.get('command')}`"
    )


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    with contextlib.suppress(ValueError):
        info = json.loads(raw.decode("utf-8"))
        if isinstance(info, dict):
            return info
    return {}


class DirectoryLock:
    """Exclusive claim on ``target`` (a directory or file that one run writes), as a context manager."""

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        self.path = self.target.parent / f".{self.target.name}.memkfac-lock"

    def _refuse(self, info: dict) -> MemkfacError:
        return MemkfacError(
            f"{self.target} is being written by another run ({describe(info)})",
            f"wait for that run to finish, or write elsewhere; if that run is gone, delete {self.path}",
        )

    def acquire(self) -> DirectoryLock:
        key = str(self.path.resolve())
        if key in _HELD:
            _HELD[key][1] += 1
            return self
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise MemkfacError(
                    f"cannot create the lock file {self.path} for {self.target} ({e.strerror})",
                    "write the output to a directory you can write to",
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read(fd)
                os.close(fd)
                raise self._refuse(info) from None
            try:  # the holder before us may have deleted the file after we opened it: lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = _read(fd)
        if info and info.get("pid") != os.getpid() and holder_is_running(info):
            os.close(fd)
            raise self._refuse(info)
        if info:
            print(
                f"memkfac: taking over the stale lock on {self.target} ({describe(info)}; no longer running)",
                file=sys.stderr,
            )
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(holder_info(), indent=1) + "\n").encode())
        os.fsync(fd)
        _HELD[key] = [fd, 1]
        return self

    def release(self) -> None:
        key = str(self.path.resolve())
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(held[0])

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
