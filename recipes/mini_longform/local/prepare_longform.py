#!/usr/bin/env python3
"""Long recordings from the five real LibriVox clips of pocketsphinx-testdata.

Each recording joins the clips (in a new random order on every pass, 0.5 s of silence between
them) until it lasts the asked number of minutes; its transcript is the clips' transcripts in
the same order. Writes OUT/longform/manifest.jsonl and OUT/longform/wav/*.wav; a rerun with the
same options rewrites the same files.

    python3 local/prepare_longform.py --out data --minutes 2 3 4
"""
from __future__ import annotations

import argparse
import json
import os
import random

import numpy as np
import soundfile as sf

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"
RATE = 16000


def clips() -> list[tuple[np.ndarray, str]]:
    """(waveform, transcript) of each clip, from its ``transcription`` file."""
    out = []
    for line in open(os.path.join(LIBRIVOX, "transcription"), encoding="utf-8"):
        uid = line.split("(")[-1].strip(" )\n")
        text = line.split("</s>")[0].replace("<s>", "").strip()
        wave, rate = sf.read(os.path.join(LIBRIVOX, uid + ".wav"), dtype="float32")
        if rate != RATE:
            raise SystemExit(f"{uid}.wav: {rate} Hz, expected {RATE}")
        out.append((wave, text))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="data directory (writes OUT/longform/)")
    ap.add_argument("--minutes", type=float, nargs="+", default=[2, 3, 4])
    ap.add_argument("--gap", type=float, default=0.5, help="seconds of silence between clips")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not os.path.isdir(LIBRIVOX):
        raise SystemExit(f"{LIBRIVOX} not found: install pocketsphinx-testdata")
    pieces, rng = clips(), random.Random(args.seed)
    gap = np.zeros(int(args.gap * RATE), dtype=np.float32)
    d = os.path.join(args.out, "longform")
    os.makedirs(os.path.join(d, "wav"), exist_ok=True)
    rows = []
    for minutes in args.minutes:
        waves, texts, length = [], [], 0
        while length < minutes * 60 * RATE:
            for wave, text in rng.sample(pieces, len(pieces)):
                waves += [wave, gap]
                texts.append(text)
                length += len(wave) + len(gap)
                if length >= minutes * 60 * RATE:
                    break
        uid = f"librivox-{minutes:g}min"
        path = os.path.join(d, "wav", uid + ".wav")
        audio = np.concatenate(waves[:-1])
        sf.write(path, audio, RATE)
        rows.append({"id": uid, "audio": os.path.abspath(path), "text": " ".join(texts),
                     "duration": len(audio) / RATE})
    with open(os.path.join(d, "manifest.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{d}/manifest.jsonl: {len(rows)} recordings, "
          f"{sum(r['duration'] for r in rows) / 60:.1f} min")


if __name__ == "__main__":
    main()
