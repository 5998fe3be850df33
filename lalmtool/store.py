"""Feature stores: a directory of HDF5 shards that plain h5py can read.

Layout (the public contract, also in README.md)::

    STORE/store.json        {"kind", "fingerprint", "meta", "shards": {file: [utterance ids]}}
    STORE/feats.00000.h5    one dataset per utterance at the root, named by its id
    STORE/skipped.jsonl     utterances skipped under --on-error skip (id, error)

Every shard file carries the attributes ``fingerprint`` and ``meta`` (JSON) and ``skipped``
(JSON list). A shard is written under a temporary name by a single writer and renamed when
complete, so a shard file that exists is whole; a rerun redoes only missing shards. The shard
plan (which utterances go in which file) depends only on the input, never on ``--nj`` or the
number of ranks, so an interrupted and resumed run writes exactly the same store.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Iterator

import h5py
import numpy as np

STORE_FILE = "store.json"
SKIPPED_FILE = "skipped.jsonl"
TMP_SUFFIX = ".tmp"


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
        info = _read_json(os.path.join(path, STORE_FILE))
        if info is None:
            raise StoreError(f"{path}: no {STORE_FILE}; create the store first")
        self.path, self.kind = path, info["kind"]
        self.fp, self.meta, self.shards = info["fingerprint"], info["meta"], info["shards"]

    @classmethod
    def create(cls, path: str, kind: str, fp: str, meta: dict, shards: dict[str, list[str]],
               force: bool = False) -> "StoreWriter":
        os.makedirs(path, exist_ok=True)
        existing = _read_json(os.path.join(path, STORE_FILE))
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
        return [s for s in self.shards if not os.path.exists(os.path.join(self.path, s))]

    def write_shard(self, name: str, result: ShardResult) -> None:
        final = os.path.join(self.path, name)
        for stale in glob.glob(f"{final}{TMP_SUFFIX}*"):
            os.remove(stale)  # this shard's writer was killed before: only we write it now
        tmp = f"{final}{TMP_SUFFIX}.{os.getpid()}"
        expected = set(self.shards[name])
        got = {utt for utt, _, _ in result.items} | {s["id"] for s in result.skipped}
        if got != expected:
            raise StoreError(f"shard {name}: produced {sorted(got ^ expected)[:5]} unexpectedly")
        with h5py.File(tmp, "w") as f:
            f.attrs["fingerprint"] = self.fp
            f.attrs["meta"] = json.dumps(self.meta)
            f.attrs["skipped"] = json.dumps(result.skipped)
            for utt, arr, attrs in result.items:
                ds = f.create_dataset(utt, data=arr)
                for k, v in attrs.items():
                    ds.attrs[k] = v
        os.replace(tmp, final)

    def finish(self, extra_skipped: list[dict] = ()) -> list[dict]:
        """Writes ``skipped.jsonl`` once every shard exists; returns the skipped utterances.

        ``extra_skipped`` are utterances left out before sharding (bad manifest entries).
        """
        missing = self.pending()
        if missing:
            raise StoreError(f"{self.path}: {len(missing)} shard(s) still missing: {missing[:3]}")
        skipped = list(extra_skipped)
        for name in self.shards:
            with h5py.File(os.path.join(self.path, name), "r") as f:
                skipped += json.loads(f.attrs["skipped"])
        write_atomic(os.path.join(self.path, SKIPPED_FILE),
                     "".join(json.dumps(s) + "\n" for s in skipped))
        for stale in glob.glob(os.path.join(self.path, f"*{TMP_SUFFIX}*")):
            os.remove(stale)  # left by a killed writer: never part of a finished store
        return skipped


class Store:
    """Read access to a finished store. HDF5 files are opened lazily, per process."""

    def __init__(self, path: str):
        info = _read_json(os.path.join(path, STORE_FILE))
        if info is None:
            raise StoreError(f"{path} is not a lalmtool store (no {STORE_FILE}); "
                             "make it with `lalmtool extract`, `segment` or `pool`.")
        self.path, self.kind = path, info["kind"]
        self.fingerprint, self.meta = info["fingerprint"], info["meta"]
        self.shards: dict[str, list[str]] = info["shards"]
        missing = [s for s in self.shards if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise StoreError(f"{path} is incomplete: {len(missing)} of {len(self.shards)} shards "
                             f"missing ({missing[0]}, ...). Rerun the stage that writes it.")
        self._files: dict[str, h5py.File] = {}
        self._pid = os.getpid()
        self._where: dict[str, str] = {}
        for name, ids in self.shards.items():
            present = set(self._file(name).keys())
            for utt in ids:
                if utt in present:
                    self._where[utt] = name
        self.ids = list(self._where)

    def _file(self, name: str) -> h5py.File:
        if self._pid != os.getpid():  # forked: never share HDF5 handles across processes
            self._files, self._pid = {}, os.getpid()
        if name not in self._files:
            self._files[name] = h5py.File(os.path.join(self.path, name), "r")
        return self._files[name]

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, utt: str) -> bool:
        return utt in self._where

    def __getitem__(self, utt: str) -> np.ndarray:
        return self.dataset(utt)[()]

    def dataset(self, utt: str) -> h5py.Dataset:
        if utt not in self._where:
            raise StoreError(f"utterance {utt!r} is not in store {self.path}")
        return self._file(self._where[utt])[utt]

    def attrs(self, utt: str) -> dict:
        return dict(self.dataset(utt).attrs)

    def skipped(self) -> list[dict]:
        out = []
        for name in self.shards:
            out += json.loads(self._file(name).attrs["skipped"])
        return out

    def items(self) -> Iterator[tuple[str, np.ndarray, dict]]:
        for utt in self.ids:
            ds = self.dataset(utt)
            yield utt, ds[()], dict(ds.attrs)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self):  # picklable for DataLoader workers: reopen lazily there
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}{TMP_SUFFIX}.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _clear(path: str) -> None:
    for f in glob.glob(os.path.join(path, "*.h5*")) + [
        os.path.join(path, STORE_FILE), os.path.join(path, SKIPPED_FILE)
    ]:
        if os.path.exists(f):
            os.remove(f)


def condition_of(store: Store) -> tuple[str, dict, str]:
    """(method, parameters, short label) of the compression a store holds."""
    meta = store.meta
    if store.kind == "feats":
        method = "frames" if meta.get("trim", True) else "native"
        return method, {}, method
    method, params = meta["method"], dict(meta.get("params", {}))
    params["reduce"] = meta.get("reduce", "mean")
    label = "-".join([method, params["reduce"]] + [
        f"{k[0] if k == 'k' else k}{v:g}" if isinstance(v, (int, float)) else f"{k}{v}"
        for k, v in params.items() if k not in ("reduce", "target_rate")])
    return method, params, label
