"""Small file helpers every stage shares: atomic writes, JSON Lines reading and content
identities (files, checkpoints).

A file another program (or a rerun) may read is written under a temporary name in the same
directory and renamed when complete, so a reader sees either the old file or the new one, never a
half-written one; an OSError names the file, not its temporary.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from typing import Iterator

TMP_SUFFIX = ".tmp"
WEIGHTS_CACHE = "weights-sha256.json"  # in the asset cache: weight files' whole-content digests
RACY_NS = 2_000_000_000  # a weight file changed this shortly before it was hashed is not cached
log = logging.getLogger("lalmtool")


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path``; renamed to ``path`` if the block succeeds,
    removed if it fails (for writers that take a file name, e.g. matplotlib's ``savefig``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}{TMP_SUFFIX}.{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:  # name the file, not its .tmp
            raise OSError(e.errno, e.strerror, path) from e
        raise


def write_atomic(path: str, data: str | bytes) -> None:
    """Writes ``data`` (text as UTF-8, or bytes) to ``path`` through a temporary and a rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yields an empty temporary directory beside ``path``; when the block succeeds it takes
    ``path``'s place whole (``replace_dir``), when it fails it is removed: a reader, or a run
    killed at any point, finds the old directory or the new one, never a mix."""
    tmp = path.rstrip("/") + TMP_SUFFIX
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


def replace_dir(new: str, path: str) -> None:
    """Puts the complete directory ``new`` in ``path``'s place. The old one is moved aside
    (``path.old``) and removed last, so a kill between the renames leaves both whole; the
    next ``replace_dir`` or ``restore_dir`` finishes the job."""
    path = path.rstrip("/")
    old = path + ".old"
    restore_dir(path)
    if os.path.lexists(path):
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def restore_dir(path: str) -> None:
    """Puts back ``path.old`` when a ``replace_dir`` was killed between its two renames."""
    path = path.rstrip("/")
    if not os.path.lexists(path) and os.path.isdir(path + ".old"):
        os.replace(path + ".old", path)
    else:
        shutil.rmtree(path + ".old", ignore_errors=True)


def file_sha256(path: str) -> str:
    """sha256 of a file's content, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(name_or_path: str) -> dict:
    """A content-based identity of a checkpoint directory (or the hub id as given).

    Hashes config files and weight files whole (``weights_sha256``: cached, so only the first
    use of a checkpoint, or of a weight file changed since, reads its weights).
    """
    if not os.path.isdir(name_or_path):
        return {"hub_id": name_or_path}
    h = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(name_or_path, "*.json")))
    weights = sorted(f for ext in ("safetensors", "bin", "pt", "gguf")
                     for f in glob.glob(os.path.join(name_or_path, f"*.{ext}")))
    for f in files:
        with open(f, "rb") as fh:
            h.update(os.path.basename(f).encode() + fh.read())
    for f in weights:
        h.update(f"{os.path.basename(f)}:{os.path.getsize(f)}:{weights_sha256(f)}".encode())
    return {"dir": os.path.basename(os.path.normpath(name_or_path)), "sha256": h.hexdigest()}


def weights_sha256(path: str) -> str:
    """sha256 of a weight file's whole content, cached by the file's real path and its (inode,
    size, mtime, ctime) in ``cache_dir()/weights-sha256.json`` (outside the model directory,
    which may be read-only). The ctime catches edits that restore the mtime (``touch -r``); a
    file changed within ``RACY_NS`` before it was hashed is not cached (its timestamps might
    not change with a second edit within the same tick). An unwritable cache costs rehashing."""
    real = os.path.realpath(path)
    key = _stat_key(os.stat(real))
    cached = _read_weights_cache().get(real)
    if isinstance(cached, list) and cached[:4] == key and len(cached) == 5:
        return cached[4]
    start = time.time_ns()
    digest = file_sha256(real)
    if _stat_key(os.stat(real)) == key and max(key[2], key[3]) < start - RACY_NS:
        _cache_weights_sha256(real, [*key, digest])
    return digest


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _weights_cache_file() -> str:
    from .assets import cache_dir

    return os.path.join(cache_dir(), WEIGHTS_CACHE)


def _read_weights_cache() -> dict:
    """The weight digests cached so far: {real path: [inode, size, mtime, ctime, sha256]}
    ({} when absent or damaged: everything is hashed again)."""
    try:
        with open(_weights_cache_file(), encoding="utf-8") as fh:
            cache = json.load(fh)
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _cache_weights_sha256(path: str, entry: list) -> None:
    """Adds ``entry`` for ``path`` to the cache (dropping files that no longer exist); a cache
    that cannot be written is only logged: it costs rehashing, not correctness."""
    cache = {p: e for p, e in _read_weights_cache().items() if os.path.exists(p)}
    cache[path] = entry
    file = _weights_cache_file()
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        write_atomic(file, json.dumps(cache, indent=0))
    except OSError as e:
        log.warning("cannot cache the sha256 of %s in %s (%s): weights are hashed again on "
                    "every run; set LALMTOOL_CACHE to a writable folder", path, file, e)


def read_json(path: str, hint: str) -> dict | None:
    """The JSON document at ``path``, None when there is none; a damaged one is a ValueError
    naming it and ending with ``hint`` (what to do)."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is damaged ({e}); {hint}") from e


def iter_jsonl(path: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """Each non-blank line of a JSON Lines file as ``(line number, record, None)``, or
    ``(line number, None, problem)`` when the line is not UTF-8 or not a JSON object.

    A UTF-8 byte order mark and CRLF line ends are fine. Every line is read, so that a caller
    can report all problems at once.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, None, f"not valid JSON ({e.msg})"
                continue
            if not isinstance(rec, dict):
                yield lineno, None, f"must be a JSON object, got {type(rec).__name__}"
                continue
            yield lineno, rec, None
