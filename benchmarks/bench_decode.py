"""Decoding speed: utterances per second at batch 1 vs batch 16 (greedy, same hypotheses).

Usage: python benchmarks/bench_decode.py [--model whisper-tiny.en] [--copies 4] [--feats STORE]

Without ``--feats`` it extracts the real LibriVox clips (repeated ``--copies`` times) as native
Whisper frames (padded 30 s windows) and as trimmed frames pooled with ``peaks``, decodes each
store at both batch sizes and prints utt/s, the speed-up and whether the hypotheses agree.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from lalmtool.decode import decode
from lalmtool.extract import extract
from lalmtool.pool import pool_store
from lalmtool.segment import segment

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"


def hyps(out: str) -> dict:
    with open(os.path.join(out, "hyp.jsonl")) as fh:
        return {r["id"]: r["hyp"] for r in map(json.loads, fh)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="whisper-tiny.en")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--feats", nargs="*", help="decode these stores instead")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stores = args.feats
        if not stores:
            manifest = os.path.join(tmp, "m.jsonl")
            with open(manifest, "w") as fh:
                for c in range(args.copies):
                    for w in sorted(os.listdir(LIBRIVOX)):
                        if w.endswith(".wav"):
                            fh.write(json.dumps({"id": f"{c}-{w[:-4]}", "text": "x",
                                                 "audio": os.path.join(LIBRIVOX, w)}) + "\n")
            native = extract(manifest, args.model, f"{tmp}/native", trim=False)["store"]
            frames = extract(manifest, args.model, f"{tmp}/frames")["store"]
            segment(frames, "peaks", f"{tmp}/seg")
            stores = [native, pool_store(frames, f"{tmp}/seg", "mean", f"{tmp}/peaks")["store"]]
        print(f"{'store':<10} {'utts':>5} {'tok/s':>7} {'b=1 utt/s':>10} {'b=16 utt/s':>11} "
              f"{'speed-up':>9} {'same hyps':>10}")
        for st in stores:
            r = {}
            for b in (1, 16):
                r[b] = decode(st, args.model, f"{tmp}/dec{b}", batch_size=b, force=True,
                              max_new_tokens=args.max_new_tokens)
                r[b]["hyps"] = hyps(f"{tmp}/dec{b}")
            print(f"{os.path.basename(st):<10} {r[1]['utterances']:>5} {r[1]['tokens_per_s']:>7.1f} "
                  f"{r[1]['utt_per_s']:>10.2f} {r[16]['utt_per_s']:>11.2f} "
                  f"{r[16]['utt_per_s'] / r[1]['utt_per_s']:>8.1f}x "
                  f"{str(r[1]['hyps'] == r[16]['hyps']):>10}")


if __name__ == "__main__":
    main()
