"""Cost of the reliability checks, measured in one run on this machine.

1. Stores: write and read throughput of a synthetic frames store (float16 [500, 384] per
   utterance: 10 s of whisper tiny.en frames) with fletcher32 checksums (what lalmtool writes)
   and without (stores written before checksums), and the full verification a rerun or
   ``lalmtool info --verify`` does (every dataset read, every checksum checked).
2. Audio identity: the extract fingerprint's per-file identity for N × 10 s 16 kHz WAV files:
   size + mtime_ns (stat only), the sha256 content hash lalmtool records (``audio_identity``)
   and blake2b, next to
   reading and decoding the same files (which extract does anyway).
3. ``lalmtool extract`` with whisper tiny.en over the LibriVox clips (``--copies`` times), with
   and without checksums, and its rerun on the finished store (every shard verified, nothing
   to encode). Needs the offline model (``lalmtool assets fetch whisper-tiny.en``).

    python benchmarks/bench_store_verify.py [--utts 400] [--files 1000] [--repeat 3] [--copies 4]

Files are page-cached after the first pass (warm numbers, best of --repeat): on a cold network
disk both hashing and decoding are bound by the same read of the file.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time

import h5py
import numpy as np
import soundfile as sf

from lalmtool import store as store_mod
from lalmtool.audio import audio_identity, load_audio
from lalmtool.store import ShardResult, Store, StoreWriter, plan_shards, verify_store


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_store(tmp: str, utts: int, repeat: int) -> list[str]:
    rng = np.random.default_rng(0)
    arrays = {f"u{i:05d}": rng.standard_normal((500, 384)).astype(np.float16) for i in range(utts)}
    mb = sum(a.nbytes for a in arrays.values()) / 1e6
    plain = lambda f, utt, arr: f.create_dataset(utt, data=arr)  # noqa: E731
    rows = [f"store: {utts} utterances x [500, 384] float16 = {mb:.0f} MB, 100 per shard"]
    for label, create in (("without checksums", plain), ("fletcher32", store_mod._create_dataset)):
        path = os.path.join(tmp, label.replace(" ", "_"))

        def write():
            w = StoreWriter.create(path, "feats", "f" * 64, {"stage": "extract"},
                                   plan_shards(list(arrays), 100, "feats"), force=True)
            for name in w.shards:
                w.write_shard(name, ShardResult(items=[(u, arrays[u], {"duration": 10.0})
                                                       for u in w.shards[name]]))
            w.finish()

        def read():
            st = Store(path)
            for u in st.ids:
                st[u]
            st.close()

        store_mod._create_dataset, saved = create, store_mod._create_dataset
        try:
            tw = best(write, repeat)
        finally:
            store_mod._create_dataset = saved
        tr = best(read, repeat)
        tv = best(lambda: verify_store(path), repeat)
        size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)) / 1e6
        with h5py.File(os.path.join(path, "feats.00000.h5")) as f:
            assert f["u00000"].fletcher32 == (label == "fletcher32")
        rows.append(f"  {label:18s} write {mb / tw:7.0f} MB/s  read {mb / tr:7.0f} MB/s  "
                    f"verify {mb / tv:7.0f} MB/s  on disk {size:.1f} MB")
    return rows


def bench_identity(tmp: str, files: int, repeat: int) -> list[str]:
    x = (0.3 * np.sin(np.arange(160000) / 7.0)).astype(np.float32)
    paths = []
    for i in range(files):
        p = os.path.join(tmp, f"a{i:04d}.wav")
        sf.write(p, np.roll(x, i), 16000, subtype="PCM_16")
        paths.append(p)
    mb = sum(os.path.getsize(p) for p in paths) / 1e6

    def blake2b_all():
        for p in paths:
            with open(p, "rb") as fh:
                hashlib.blake2b(fh.read()).hexdigest()

    cases = [("size + mtime_ns (stat)", lambda: [(os.stat(p).st_size, os.stat(p).st_mtime_ns)
                                                 for p in paths]),
             ("sha256 (audio_identity)", lambda: [audio_identity(p) for p in paths]),
             ("blake2b content hash", blake2b_all),
             ("load_audio (decode)", lambda: [load_audio(p) for p in paths])]
    rows = [f"audio identity: {files} x 10 s 16 kHz PCM_16 WAV = {mb:.0f} MB (page-cached)"]
    for label, fn in cases:
        t = best(fn, repeat)
        rows.append(f"  {label:24s} {t:7.3f} s  ({1000 * t / files:.3f} ms/file)")
    return rows


LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"


def bench_extract(tmp: str, copies: int) -> list[str]:
    import json

    from lalmtool.extract import extract

    wavs = sorted(f for f in os.listdir(LIBRIVOX) if f.endswith(".wav"))
    manifest = os.path.join(tmp, "m.jsonl")
    with open(manifest, "w") as fh:
        for c in range(copies):
            for w in wavs:
                fh.write(json.dumps({"id": f"{c}-{w[:-4]}", "audio": os.path.join(LIBRIVOX, w),
                                     "text": "x"}) + "\n")
    audio_s = copies * sum(sf.info(os.path.join(LIBRIVOX, w)).duration for w in wavs)
    plain = lambda f, utt, arr: f.create_dataset(utt, data=arr)  # noqa: E731
    rows = [f"extract whisper-tiny.en: {copies * len(wavs)} utterances, {audio_s:.0f} s of audio, "
            "shards of 5"]
    for label, create in (("without checksums", plain), ("fletcher32", store_mod._create_dataset)):
        out = os.path.join(tmp, label.replace(" ", "_"))
        store_mod._create_dataset, saved = create, store_mod._create_dataset
        try:
            t = time.perf_counter()
            extract(manifest, "whisper-tiny.en", out, shard_size=5, batch_size=4)
            full = time.perf_counter() - t
            t = time.perf_counter()
            extract(manifest, "whisper-tiny.en", out, shard_size=5, batch_size=4)
            rerun = time.perf_counter() - t
        finally:
            store_mod._create_dataset = saved
        rows.append(f"  {label:18s} {audio_s / full:6.1f} audio s per wall s ({full:.2f} s); "
                    f"rerun on the finished store {rerun:.2f} s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--utts", type=int, default=400)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--copies", type=int, default=4, help="LibriVox clip copies (0: no extract)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_store(tmp, a.utts, a.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        rows += bench_identity(tmp, a.files, a.repeat)
    if a.copies:
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench_extract(tmp, a.copies)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
