"""One writer per output directory.

``with output_lock(out_dir): ...`` holds ``OUT/.lock`` for the duration of a stage's writing.
The lock is an ``fcntl.flock`` on that file, so the kernel releases it when its holder exits in
any way (SIGKILL included); the file records the holder's host, pid and start time, for the
message another run gets. A lock file left by a process that is gone is taken over with a log
message. The lock is re-entrant within a process, and worker processes forked while it is held
share it (they inherit the open file), so ``--nj`` workers never lock each other out. Under
``torchrun`` (``WORLD_SIZE`` > 1) only rank 0 takes the lock: the other ranks of the same job
write alongside it, and they wait at the stage's barrier for rank 0, which fails on a held lock.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from typing import Iterator

from .store import StoreError

LOCK_FILE = ".lock"
log = logging.getLogger(__name__)

_held: dict[str, tuple[int, int]] = {}  # realpath of the lock file -> (fd, depth), this process


class LockError(StoreError):
    """Another live process is writing the same output directory."""


def _holder_text(raw: str) -> str:
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on host {h['host']} since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace")


def _acquire(path: str, out_dir: str) -> int:
    """Open and flock ``path``; retried while another holder removes the file under us."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(_read(fd))
            os.close(fd)
            raise LockError(
                f"{out_dir} is being written by {holder}; wait for it to finish, "
                f"or remove {path} if that process is gone") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the previous holder may have unlinked the file between our open and flock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def output_lock(out_dir: str) -> Iterator[str]:
    """Holds the write lock of ``out_dir`` (created if missing); yields the lock file's path.

    Raises LockError when a live process holds it. An OSError (read-only directory, full disk)
    propagates with the path in it.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(out_dir, LOCK_FILE))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and int(os.environ.get("RANK", 0)) != 0:
        yield path  # a torchrun rank other than 0: its job's rank 0 holds the lock
        return
    if path in _held:  # re-entrant: an outer caller in this process holds it already
        fd, depth = _held[path]
        _held[path] = (fd, depth + 1)
        try:
            yield path
        finally:
            fd, depth = _held[path]
            _held[path] = (fd, depth - 1)
        return
    fd = _acquire(path, out_dir)
    try:
        stale = _read(fd).strip()
        if stale:
            log.warning("%s: taking over a stale lock left by %s (no longer running)",
                        out_dir, _holder_text(stale))
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
    except OSError as e:  # a full disk: name the file
        os.close(fd)
        raise OSError(e.errno, e.strerror, path) from e
    except BaseException:
        os.close(fd)
        raise
    _held[path] = (fd, 1)
    try:
        yield path
    finally:
        del _held[path]
        try:
            os.unlink(path)  # removed while still held, so no one can take a dying file
        except OSError:
            pass
        os.close(fd)
