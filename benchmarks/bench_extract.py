"""extract throughput: the whole stage vs a bare encoder forward on the same batches.

Usage: python benchmarks/bench_extract.py [--model whisper-tiny.en] [--copies 8] [--batch-size 4]
           [--pack 30] [--manifest recipes/mini/data/train/manifest.jsonl]

Runs ``lalmtool extract`` over the real LibriVox clips (repeated ``--copies`` times) and times
the encoder alone on the same 30 s windows in the same batches (log-mel features precomputed),
then prints audio seconds per wall second for both and the pipeline overhead; with ``--pack``,
also ``extract --pack`` on the same manifest in the same run: encoder windows and speed, and
the ratios to the unpacked extract. ``--manifest`` extracts that manifest instead (e.g. the mini
recipe's training set), packed and not, back to back, without the bare-encoder comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from lalmtool.audio import load_audio
from lalmtool.extract import extract
from lalmtool.models import load_backend

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="whisper-tiny.en")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--pack", type=float, help="also extract --pack SECONDS (e.g. 30)")
    ap.add_argument("--manifest", help="extract this manifest (packed and not, with --pack) "
                    "instead of the LibriVox copies; no bare-encoder timing")
    args = ap.parse_args()
    if args.manifest:
        args.pack = args.pack or 30.0
        return compare_packed(args)
    wavs = sorted(f for f in os.listdir(LIBRIVOX) if f.endswith(".wav"))
    with tempfile.TemporaryDirectory() as tmp:
        manifest = os.path.join(tmp, "m.jsonl")
        with open(manifest, "w") as fh:
            for c in range(args.copies):
                for w in wavs:
                    fh.write(json.dumps({"id": f"{c}-{w[:-4]}", "audio": os.path.join(LIBRIVOX, w),
                                         "text": "x"}) + "\n")
        be = load_backend("whisper", args.model)
        waves = [load_audio(os.path.join(LIBRIVOX, w)) for w in wavs] * args.copies
        waves.sort(key=len)  # extract batches each shard by length, too
        audio_s = sum(len(w) for w in waves) / 16000
        mels = [be.features(waves[i : i + args.batch_size], sampling_rate=16000,
                            return_tensors="pt").input_features
                for i in range(0, len(waves), args.batch_size)]
        with torch.inference_mode():
            be.model.model.encoder(mels[0])  # warm-up
            t0 = time.perf_counter()
            for mel in mels:
                be.model.model.encoder(mel)
            bare = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = extract(manifest, args.model, os.path.join(tmp, "feats"),
                        batch_size=args.batch_size, shard_size=len(waves))
        full = time.perf_counter() - t0
        if args.pack:
            t0 = time.perf_counter()
            packed = extract(manifest, args.model, os.path.join(tmp, "packed"),
                             batch_size=args.batch_size, shard_size=len(waves), pack=args.pack)
            pack_s = time.perf_counter() - t0
    print(f"utterances {len(waves)}, audio {audio_s:.1f} s, batch {args.batch_size}, "
          f"threads {torch.get_num_threads()}")
    print(f"bare encoder forward : {audio_s / bare:8.1f} audio s per wall s ({bare:.2f} s)")
    print(f"lalmtool extract     : {audio_s / full:8.1f} audio s per wall s ({full:.2f} s, "
          f"model load and store writing included)")
    print(f"pipeline overhead    : {100 * (full / bare - 1):8.1f} %")
    if args.pack:
        print(f"extract --pack {args.pack:g}  : {audio_s / pack_s:8.1f} audio s per wall s "
              f"({pack_s:.2f} s), {packed['windows']} encoder windows against "
              f"{plain['windows']}: {plain['windows'] / packed['windows']:.1f}x fewer, "
              f"{full / pack_s:.1f}x faster")


def compare_packed(args) -> None:
    """One window per utterance, then ``--pack``, on ``--manifest``, back to back."""
    from lalmtool.manifest import audio_hours, load_manifest

    utts, _ = load_manifest(args.manifest)
    audio_s = audio_hours(utts) * 3600
    times, out = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        first = os.path.join(tmp, "first.jsonl")  # warm-up: imports and first forward untimed
        with open(args.manifest, encoding="utf-8") as src, open(first, "w") as fh:
            row = json.loads(next(line for line in src if line.strip()))
            row["audio"] = os.path.join(os.path.dirname(os.path.abspath(args.manifest)),
                                        row["audio"])  # (relative to its manifest)
            fh.write(json.dumps(row) + "\n")
        extract(first, args.model, os.path.join(tmp, "warm-up"), batch_size=args.batch_size)
        for name, pack in (("one window per utterance", None), (f"--pack {args.pack:g}",
                                                               args.pack)):
            t0 = time.perf_counter()
            out[name] = extract(args.manifest, args.model, os.path.join(tmp, str(pack)),
                                batch_size=args.batch_size, pack=pack)
            times[name] = time.perf_counter() - t0
    print(f"{args.manifest}: {len(utts)} utterances, {audio_s:.0f} s of audio, "
          f"threads {torch.get_num_threads()}")
    for name, sec in times.items():
        print(f"{name:26s}: {sec:7.1f} s, {out[name]['windows']} encoder windows, "
              f"{audio_s / sec:6.1f} audio s per wall s")
    (a, ta), (b, tb) = times.items()
    print(f"packed: {out[a]['windows'] / out[b]['windows']:.1f}x fewer windows, "
          f"{ta / tb:.1f}x faster")


if __name__ == "__main__":
    main()
