"""One writer per output folder: convert, train (rank 0 of a run) and sweep hold an exclusive lock on
their output folder for the whole run.

    with OutputLock(out, "convert"):
        ...                                    # nobody else writes into `out` meanwhile

The lock is `fcntl.flock` on `out/.fastrsb.lock`. The kernel releases a flock when its holder dies, so
a lock left by a killed process (kill -9, a lost node's process on a local disk) is simply taken by the
next run: there are no stale locks to clean up. While held, the file names the holder (pid, host,
command, since when) as one JSON line, so a second run is refused with one line that says who holds
the folder and what to do; on release the file is emptied (and left in place: deleting a lock file
races with the next process opening it).
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from .errors import FastRSBError

LOCK_NAME = ".fastrsb.lock"


class FolderInUse(FastRSBError):
    """Another process holds the output folder's lock."""


class OutputLock:
    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        """Take the lock or raise FolderInUse naming its holder. The folder must exist."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderInUse(self.refusal(holder)) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": self.what}
        try:  # who holds it is for the message only: a full disk must not stop the run from starting
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError:
            pass
        return self

    def refusal(self, holder: dict | None) -> str:
        if holder:
            who = (f"another fastrsb {holder.get('what', 'run')} (pid {holder.get('pid')} on {holder.get('host')}, "
                   f"running `{holder.get('command')}` since {holder.get('since')})")
        else:
            who = "another process"
        return (f"{self.folder} is in use by {who}; wait for it to finish or stop it, or give this {self.what} "
                f"another output folder (the lock is {self.path}; a killed holder's lock is released by itself)")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "-c")):  # python -m fastrsb ...
        argv[0] = "fastrsb"
    elif argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)[:300]
