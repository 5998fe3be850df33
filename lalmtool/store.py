"""Feature stores: a directory of HDF5 shards that plain h5py can read.

Layout (the public contract, also in README.md)::

    STORE/store.json        {"kind", "fingerprint", "meta", "shards": {file: [utterance ids]}}
    STORE/feats.00000.h5    one dataset per utterance at the root, named by its id
    STORE/skipped.jsonl     utterances skipped under --on-error skip (id, error)
    STORE/verified.json     shards found whole: {"fingerprint", "shards": {file: [inode, size,
                            mtime_ns]}}

Every shard file carries the attributes ``fingerprint`` and ``meta`` (JSON) and ``skipped``
(JSON list). Datasets are chunked with HDF5's fletcher32 checksum filter, so bytes damaged after
writing fail to read instead of being read as features (plain h5py verifies it on every read).
A shard is written under a temporary name by a single writer and renamed when complete; a rerun
redoes the shards that are missing or fail verification (unreadable, truncated, a checksum
error, another fingerprint than store.json's, other utterances than planned). Verifying reads
every byte, so a finished stage records each shard's inode, size and modification time in
``verified.json``; a rerun verifies again only the shards whose record no longer matches (or
was modified within the record's own timestamp tick: git's rule for "racily clean" files).
``lalmtool info --verify`` always reads everything (bit rot changes no timestamp). Opening a
``Store`` (what every later stage reads through) checks each shard's fingerprint and utterance
names against store.json's plan, reading no data: a shard replaced by a copy of another one is
refused, naming it. The shard plan (which utterances go in which file) depends only on the
input, never on ``--nj`` or the number of ranks, so an interrupted and resumed run writes
exactly the same store.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

import h5py
import numpy as np

from .fileio import TMP_SUFFIX, read_json, write_atomic

STORE_FILE = "store.json"
SKIPPED_FILE = "skipped.jsonl"
VERIFIED_FILE = "verified.json"
MAX_OPEN = 64  # shard files a Store keeps open at once (least recently used closed first)
CHUNK_BYTES = 1 << 20  # rows per checksummed chunk: about this many bytes
log = logging.getLogger("lalmtool")


class StoreError(RuntimeError):
    """A store that cannot be used as asked (incomplete, fingerprint mismatch, missing id)."""


def fingerprint(obj) -> str:
    """sha256 of the canonical JSON of everything that determines a store's content."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def check_dataset_name(utt_id: str) -> str | None:
    """Why ``utt_id`` cannot name an HDF5 dataset / file, or None when it can."""
    if not utt_id or not utt_id.strip():
        return "empty id"
    if utt_id != utt_id.strip():
        return "leading or trailing whitespace"
    if "/" in utt_id or "\\" in utt_id:
        return "contains a path separator ('/' or '\\')"
    if utt_id in (".", ".."):
        return "reserved name"
    if any(ord(c) < 32 for c in utt_id):
        return "contains control characters"
    return None


def plan_shards(ids: list[str], shard_size: int, prefix: str) -> dict[str, list[str]]:
    """Split ``ids`` (in the given order) into fixed shards ``{prefix}.{n:05d}.h5``."""
    if shard_size < 1:
        raise ValueError("shard size must be >= 1")
    return {
        f"{prefix}.{n // shard_size:05d}.h5": ids[n : n + shard_size]
        for n in range(0, len(ids), shard_size)
    }


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def plan_problem(f: h5py.File, fp: str, ids: list[str]) -> str | None:
    """Why the open shard ``f`` is not the shard of a store with fingerprint ``fp`` that holds
    these planned ``ids`` (written or skipped), or None. Cheap: reads its attributes and dataset
    names only, no data; a damaged file raises (h5py's OSError, KeyError...)."""
    if f.attrs.get("fingerprint") != fp:
        return ("was written with other inputs or settings (its fingerprint "
                f"{str(f.attrs.get('fingerprint'))[:12]} differs from store.json's)")
    done = set(f.keys()) | {s["id"] for s in json.loads(f.attrs["skipped"])}
    if done != set(ids):
        missing, extra = sorted(set(ids) - done), sorted(done - set(ids))
        parts = ([f"missing {missing[:3]}"] if missing else []) + (
            [f"unplanned {extra[:3]}"] if extra else [])
        return f"holds other utterances than store.json plans for it ({', '.join(parts)})"
    return None


def shard_problem(path: str, fp: str, ids: list[str]) -> str | None:
    """Why the shard file ``path`` is not a whole shard of a store with fingerprint ``fp`` and
    these planned ``ids`` (``plan_problem``, then reading every dataset, which verifies its
    checksum), or None."""
    try:
        with h5py.File(path, "r") as f:
            why = plan_problem(f, fp, ids)
            if why:
                return why
            for utt in f:
                f[utt][()]
    except Exception as e:  # h5py raises OSError, KeyError, RuntimeError... for damaged files
        return f"is damaged ({_short(e)})"
    return None


def _create_dataset(f: h5py.File, utt: str, arr: np.ndarray) -> h5py.Dataset:
    """A dataset for ``arr``, checksummed (fletcher32) in chunks of about CHUNK_BYTES."""
    arr = np.asarray(arr)
    if arr.size == 0 or arr.ndim == 0:
        return f.create_dataset(utt, data=arr)
    rows = max(1, min(arr.shape[0], CHUNK_BYTES // max(1, arr[0].nbytes)))
    return f.create_dataset(utt, data=arr, chunks=(rows, *arr.shape[1:]), fletcher32=True)


@dataclass
class ShardResult:
    """What a worker produced for one shard: arrays with per-utterance attributes, and skips."""

    items: list[tuple[str, np.ndarray, dict]] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


class StoreWriter:
    """Writes the shards of one store; each shard atomically, by one process.

    ``StoreWriter.create`` (one process: the parent of ``--nj`` workers, or rank 0) checks the
    fingerprint, clears what is stale and records the shard plan; workers then construct a
    ``StoreWriter(path)`` on it.
    """

    def __init__(self, path: str):
        info = _read_store_json(path)
        if info is None:
            raise StoreError(f"{path}: no {STORE_FILE}; create the store first")
        self.path, self.kind = path, info["kind"]
        self.fp, self.meta, self.shards = info["fingerprint"], info["meta"], info["shards"]
        self._verified = _recorded_whole(path, self.fp)  # shard -> (inode, size, mtime) found whole

    @classmethod
    def create(cls, path: str, kind: str, fp: str, meta: dict, shards: dict[str, list[str]],
               force: bool = False) -> "StoreWriter":
        os.makedirs(path, exist_ok=True)
        try:
            existing = _read_store_json(path)
        except StoreError as e:  # unreadable: rewritten; shards are checked by their own attrs
            log.warning("%s; writing it again (each shard's fingerprint is checked)", e)
            existing = None
        mismatch = existing is not None and (
            existing["fingerprint"] != fp or existing["shards"] != shards)
        if mismatch and not force:
            raise StoreError(
                f"{path} already holds a {existing.get('kind')} store made with different "
                f"inputs or settings (fingerprint {existing['fingerprint'][:12]} there, "
                f"{fp[:12]} now). Use another --out, or --force to recompute it."
            )
        if force or mismatch:
            _clear(path)
        write_atomic(os.path.join(path, STORE_FILE), json.dumps(
            {"kind": kind, "fingerprint": fp, "meta": meta, "shards": shards}, indent=1))
        return cls(path)

    def pending(self) -> list[str]:
        """Shards still to write: missing, or present but failing ``shard_problem`` (logged)."""
        todo = []
        for name, ids in self.shards.items():
            file = os.path.join(self.path, name)
            try:
                st = os.stat(file)
            except FileNotFoundError:
                todo.append(name)
                continue
            key = _stamp(st)
            if self._verified.get(name) == key:
                continue
            why = shard_problem(file, self.fp, ids)
            if why:
                log.warning("%s %s: it will be written again", file, why)
                todo.append(name)
            else:
                self._verified[name] = key
        return todo

    def write_shard(self, name: str, result: ShardResult) -> None:
        final = os.path.join(self.path, name)
        for stale in glob.glob(f"{final}{TMP_SUFFIX}*"):
            os.remove(stale)  # this shard's writer was killed before: only we write it now
        tmp = f"{final}{TMP_SUFFIX}.{os.getpid()}"
        expected = set(self.shards[name])
        got = {utt for utt, _, _ in result.items} | {s["id"] for s in result.skipped}
        if got != expected:
            raise StoreError(f"shard {name}: produced {sorted(got ^ expected)[:5]} unexpectedly")
        try:
            # built in memory, then written with plain file I/O: HDF5 cannot close a file whose
            # write failed (a full disk), and its handle then crashes the interpreter later on
            size = sum(np.asarray(a).nbytes for _, a, _ in result.items) + (1 << 20)
            with h5py.File(tmp, "w", driver="core", backing_store=False, block_size=size) as f:
                f.attrs["fingerprint"] = self.fp
                f.attrs["meta"] = json.dumps(self.meta)
                f.attrs["skipped"] = json.dumps(result.skipped)
                for utt, arr, attrs in result.items:
                    ds = _create_dataset(f, utt, arr)
                    for k, v in attrs.items():
                        ds.attrs[k] = v
                f.flush()
                image = f.id.get_file_image()
            with open(tmp, "wb") as fh:
                fh.write(image)
            del image
            os.replace(tmp, final)
        except OSError as e:  # full disk, read-only or vanished directory: nothing half-written
            if os.path.exists(tmp):
                os.remove(tmp)
            raise StoreError(f"cannot write {final}: {_short(e)}. Free space or choose a "
                             "writable --out, then rerun: finished shards are kept") from e
        self._verified[name] = _stamp(os.stat(final))

    def finish(self, extra_skipped: list[dict] = ()) -> list[dict]:
        """Writes ``skipped.jsonl`` once every shard exists; returns the skipped utterances.

        ``extra_skipped`` are utterances left out before sharding (bad manifest entries).
        """
        missing = [s for s in self.shards if not os.path.exists(os.path.join(self.path, s))]
        if missing:
            raise StoreError(f"{self.path}: {len(missing)} shard(s) still missing: {missing[:3]}")
        skipped = list(extra_skipped)
        for name in self.shards:
            with h5py.File(os.path.join(self.path, name), "r") as f:
                skipped += json.loads(f.attrs["skipped"])
        write_atomic(os.path.join(self.path, SKIPPED_FILE),
                     "".join(json.dumps(s) + "\n" for s in skipped))
        # every shard is whole now: verified by pending() or written by this run
        write_atomic(os.path.join(self.path, VERIFIED_FILE), json.dumps({
            "fingerprint": self.fp,
            "shards": {s: _stamp(os.stat(os.path.join(self.path, s))) for s in self.shards}}))
        for stale in glob.glob(os.path.join(self.path, f"*{TMP_SUFFIX}*")):
            os.remove(stale)  # left by a killed writer: never part of a finished store
        return skipped


class StoreMeta(dict):
    """A store's ``meta`` (store.json), read one way. Still the plain JSON mapping that the
    stages write (a later stage keeps its source's meta under ``source_meta``); the properties
    answer what readers ask of it, for stores of this release and of earlier ones:

    ``stage``, ``source`` (the meta of the store this one was made from), ``extracted`` (the
    extract's meta at the root of that chain), ``backend``, ``backend_options`` (every option
    the features were extracted with; earlier stores: the options given, ``backend_opts``),
    ``frame_rate`` (stored rows per second of audio), ``source_frame_rate`` (the encoder's
    frames per second), ``trim``, ``condition`` and ``compression_steps``.
    """

    @property
    def stage(self) -> str:
        return self.get("stage", "extract")

    @property
    def source(self) -> StoreMeta | None:
        return StoreMeta(self["source_meta"]) if "source_meta" in self else None

    @property
    def extracted(self) -> StoreMeta:
        meta = self
        while meta.source is not None:
            meta = meta.source
        return meta

    @property
    def backend(self) -> str | None:
        return self.extracted.get("backend")

    @property
    def backend_options(self) -> dict:
        root = self.extracted
        return dict(root.get("backend_options") or root.get("backend_opts") or {})

    @property
    def frame_rate(self) -> float:
        return float(self.get("frame_rate") or self.source_frame_rate)

    @property
    def source_frame_rate(self) -> float:
        root = self.extracted
        return float(self.get("source_frame_rate") or root.get("source_frame_rate")
                     or root.get("frame_rate") or 50.0)

    @property
    def trim(self) -> bool:
        return bool(self.extracted.get("trim", True))

    def condition(self, reduce: str | None = None) -> tuple[str, dict, str]:
        """(method, parameters, label) of the compression the store holds (a boundary store:
        pooled by ``reduce``); the label is the condition's name that recipes, decode and
        reports use (``frames``, ``native``, ``uniform-mean-k3``, ``uniform-learnt-k10``)."""
        if "method" not in self:  # encoder frames, not compressed
            method = "frames" if self.trim else "native"
            return method, {}, method
        params = dict(self.get("params", {}))
        params["reduce"] = reduce or self.get("reduce", "mean")
        label = "-".join([self["method"], params["reduce"]] + [
            f"{k[0] if k == 'k' else k}{v:g}" if isinstance(v, (int, float)) else f"{k}{v}"
            for k, v in params.items() if k not in ("reduce", "target_rate")])
        return self["method"], params, label

    def compression_steps(self, reduce: str | None = None) -> list[dict]:
        """The compressions that lead from the encoder's frames to these features, in order:
        ``{"method", "params", "reduce"}`` each (``[]`` for frames; a boundary store counts as
        pooled by ``reduce``). What ``lalmtool transcribe`` repeats in memory."""
        steps, meta = [], self
        if meta.stage == "segment":
            steps.append({"method": meta["method"], "params": meta.get("params", {}),
                          "reduce": reduce or "mean"})
            meta = meta.source
        while meta.stage == "pool":
            steps.insert(0, {"method": meta["method"], "params": meta.get("params", {}),
                             "reduce": meta.get("reduce", "mean")})
            meta = meta.source
        return [{**s, "params": {k: v for k, v in s["params"].items() if k != "target_rate"}}
                for s in steps]


class Store:
    """Read access to a finished store. HDF5 files are opened lazily, per process."""

    def __init__(self, path: str, max_open: int = MAX_OPEN):
        info = _read_store_json(path)
        if info is None:
            raise StoreError(f"{path} is not a lalmtool store (no {STORE_FILE}); "
                             "make it with `lalmtool extract`, `segment` or `pool`.")
        self.path, self.kind = path, info["kind"]
        self.fingerprint, self.meta = info["fingerprint"], StoreMeta(info["meta"])
        self.shards: dict[str, list[str]] = info["shards"]
        missing = [s for s in self.shards if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise StoreError(f"{path} is incomplete: {len(missing)} of {len(self.shards)} shards "
                             f"missing ({missing[0]}, ...). Rerun the stage that writes it.")
        self.max_open = max(1, max_open)
        self._files: OrderedDict[str, h5py.File] = OrderedDict()
        self._pid = os.getpid()
        self._where: dict[str, str] = {}
        for name, ids in self.shards.items():
            self._check_plan(name, ids)
        self.ids = list(self._where)

    def _check_plan(self, name: str, ids: list[str]) -> None:
        """StoreError unless shard ``name`` holds exactly its planned ``ids`` (``plan_problem``:
        no data read); records where each of its utterances is."""
        f = self._file(name)
        why = self._guard(name, plan_problem, f, self.fingerprint, ids)
        if why:
            raise StoreError(self._damaged(name, why))
        present = set(self._guard(name, f.keys))
        for utt in ids:
            if utt in present:
                self._where[utt] = name

    def _damaged(self, name: str, why: str) -> str:
        stage = self.meta.get("stage", "the stage") if isinstance(self.meta, dict) else "the stage"
        return (f"{os.path.join(self.path, name)} {why}; rerun `lalmtool {stage}` with the same "
                f"--out ({self.path}) to redo it")

    def _guard(self, name: str, fn, *args, utt: str | None = None):
        """``fn(*args)``; an HDF5 failure (damaged file, checksum error) names the shard."""
        try:
            return fn(*args)
        except StoreError:
            raise
        except Exception as e:
            where = f" (utterance {utt!r})" if utt else ""
            raise StoreError(self._damaged(name, f"is damaged{where}: {_short(e)}")) from e

    def _file(self, name: str) -> h5py.File:
        if self._pid != os.getpid():  # forked: never share HDF5 handles across processes
            self._files, self._pid = OrderedDict(), os.getpid()
        if name in self._files:
            self._files.move_to_end(name)
            return self._files[name]
        f = self._guard(name, h5py.File, os.path.join(self.path, name), "r")
        self._files[name] = f
        while len(self._files) > self.max_open:  # keep few handles open (ulimit -n)
            self._files.popitem(last=False)[1].close()
        return f

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, utt: str) -> bool:
        return utt in self._where

    def __getitem__(self, utt: str) -> np.ndarray:
        ds = self.dataset(utt)
        return self._guard(self._where[utt], ds.__getitem__, (), utt=utt)

    def dataset(self, utt: str) -> h5py.Dataset:
        """The h5py dataset of ``utt``: use it at once (its file may be closed later on)."""
        if utt not in self._where:
            raise StoreError(f"utterance {utt!r} is not in store {self.path}")
        name = self._where[utt]
        return self._guard(name, self._file(name).__getitem__, utt, utt=utt)

    def attrs(self, utt: str) -> dict:
        return self._guard(self._where.get(utt, ""), dict, self.dataset(utt).attrs, utt=utt)

    def skipped(self) -> list[dict]:
        out = []
        for name in self.shards:
            out += self._guard(name, lambda: json.loads(self._file(name).attrs["skipped"]))
        return out

    def items(self) -> Iterator[tuple[str, np.ndarray, dict]]:
        for utt in self.ids:
            yield utt, self[utt], self.attrs(utt)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = OrderedDict()

    def __getstate__(self):  # picklable for DataLoader workers: reopen lazily there
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()
        return state


def verify_store(path: str) -> tuple[int, list[tuple[str, str]]]:
    """Checks every shard of the store at ``path`` (reading all data, which verifies the
    checksums); returns (shards checked, [(shard file, problem)])."""
    info = _read_store_json(path)
    if info is None:
        raise StoreError(f"{path} is not a lalmtool store (no {STORE_FILE})")
    problems = []
    for name, ids in info["shards"].items():
        file = os.path.join(path, name)
        why = "is missing" if not os.path.exists(file) else shard_problem(
            file, info["fingerprint"], ids)
        if why:
            problems.append((file, why))
    return len(info["shards"]), problems


def _read_store_json(path: str) -> dict | None:
    """store.json of the store at ``path``, None when absent; StoreError when unusable."""
    file = os.path.join(path, STORE_FILE)
    if os.path.isfile(path):
        raise StoreError(f"{path} is a file, not a store directory")
    hint = f"rerun the stage that wrote {path} with the same options to write it again"
    try:
        info = read_json(file, hint)
    except UnicodeDecodeError as e:
        raise StoreError(f"{file} is damaged ({e}); {hint}") from e
    except ValueError as e:
        raise StoreError(str(e)) from e
    if info is not None and not (isinstance(info, dict) and {"kind", "fingerprint", "meta",
                                                            "shards"} <= set(info)):
        raise StoreError(f"{file} lacks kind/fingerprint/meta/shards; rerun the stage that "
                         f"wrote {path} with the same options to write it again")
    return info


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _recorded_whole(path: str, fp: str) -> dict[str, tuple]:
    """The shards of the store with fingerprint ``fp`` that ``verified.json`` records as whole,
    by (inode, size, mtime). A record is kept only for shards last modified before it was
    written: one modified within the record's own timestamp tick may have changed unseen."""
    file = os.path.join(path, VERIFIED_FILE)
    try:
        recorded, written = read_json(file, "") or {}, os.stat(file).st_mtime_ns
    except (OSError, ValueError):  # absent or damaged: every shard is verified again
        return {}
    if not isinstance(recorded, dict) or recorded.get("fingerprint") != fp:
        return {}
    return {name: tuple(key) for name, key in (recorded.get("shards") or {}).items()
            if isinstance(key, list) and len(key) == 3 and key[2] < written}


def _clear(path: str) -> None:
    for f in glob.glob(os.path.join(path, "*.h5*")) + [
        os.path.join(path, STORE_FILE), os.path.join(path, SKIPPED_FILE),
        os.path.join(path, VERIFIED_FILE)
    ]:
        if os.path.exists(f):
            os.remove(f)
