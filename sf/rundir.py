"""Owning a run dir: one job at a time writes it, and workers do not outlive their launcher.

`RunDirLock` is an OS lock (`flock`) on ``<run dir>/.sf.lock`` that rank 0 holds for the life of the job; the
kernel releases it when the process dies, however it dies, so a stale lock never blocks a rerun. The file also
records who holds it (pid, host, start time), which is what a second job prints when it refuses to start.
`flock` is honoured across nodes on NFS (Linux emulates it with POSIX locks) and on Lustre mounted with
``-o flock``.

`die_with_launcher` makes a worker started by a launcher process (torchrun, the deepspeed launcher) receive a
signal (SIGHUP in `sf.train`) when that launcher dies, even by SIGKILL: the worker then checkpoints at the end
of its step and exits, instead of training on alone (torch elastic starts each worker in its own session, so killing the launcher's
process group does not reach them).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import time
from pathlib import Path

LOCK_FILE = ".sf.lock"
_PR_SET_PDEATHSIG = 1


class RunDirBusy(RuntimeError):
    """Another live job holds the run dir."""


class RunDirLock:
    """An exclusive, non-blocking lock on a run dir, held until `release` or the process's death."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunDirBusy naming the holder; OSError (e.g. an unwritable dir) passes through."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirBusy(f"run dir {self.path.parent} is in use by another job ({holder}): wait for it to end, "
                             f"or stop it (docs/troubleshooting.md, 'Stopping a job')") from None
        os.ftruncate(fd, 0)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """'pid 123 on host h since 2026-01-01 12:00:00', from the lock file (what its holder wrote)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        record = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {record['pid']} on host {record['host']} since {record['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def launched_by_local_launcher() -> bool:
    """True in a worker process that torchrun (torch elastic) or the deepspeed launcher started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_SIZE" in os.environ


def die_with_launcher(sig: int = signal.SIGHUP) -> bool:
    """Ask the kernel to send `sig` to this process when its parent (the launcher) dies (Linux only).

    Returns whether it was armed. If the parent is already gone, the signal is sent now.
    """
    if not launched_by_local_launcher() or not hasattr(os, "getppid"):
        return False
    parent = os.getppid()
    if parent == 1:  # already orphaned
        os.kill(os.getpid(), sig)
        return True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # not Linux
        return False
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), sig)
    return True
