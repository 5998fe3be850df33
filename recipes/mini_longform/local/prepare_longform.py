#!/usr/bin/env python3
"""Long test recordings: held-out sentences read one after another by voices no adapter saw.

Each recording is one voice (an espeak-ng variant or flite voice that recipes/mini never trains
on) reading WordNet sentences that no mini set holds (the sentence pool is split exactly as
recipes/mini splits it, with room for up to ``RESERVED_TRAIN`` training sentences before the
long-form ones), with 0.3-0.7 s of silence between sentences, until it lasts the asked
number of seconds. Nothing is repeated inside a recording or across recordings. Writes
OUT/longform/manifest.jsonl (id, audio, text, duration, voice) and OUT/longform/wav/*.wav;
a rerun with the same options reuses the audio.

    python3 local/prepare_longform.py --out data --seconds 60 80 100 120
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

import numpy as np
import soundfile as sf

MINI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "mini", "local")
sys.path.insert(0, MINI)
import corpus  # noqa: E402
import tts  # noqa: E402

RATE = tts.SAMPLE_RATE
#: mini's held-out sets (test, dev) and room for this many training sentences come first
RESERVED_TRAIN = 5000
#: voices recipes/mini never trains on (its ESPEAK_VARIANTS and FLITE_VOICES leave them out)
VOICES = (tts.Voice("espeak", "en-us+f4", 150, 50), tts.Voice("espeak", "en-gb+david", 150, 45),
          tts.Voice("espeak", "en-us+belinda", 150, 50), tts.Voice("espeak", "en-gb+f1", 150, 50),
          tts.Voice("espeak", "en-gb-x-rp+anika", 150, 50),
          tts.Voice("espeak", "en-us+alicia", 150, 50))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="data directory (writes OUT/longform/)")
    ap.add_argument("--seconds", type=float, nargs="+", default=[60, 80, 100, 120],
                    help="length of each recording (one voice each, in the order of VOICES)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if len(args.seconds) > len(VOICES):
        raise SystemExit(f"at most {len(VOICES)} recordings (one unseen voice each)")
    sizes = {"test": 100, "dev": 100, "train": RESERVED_TRAIN, "longform": 40 * len(args.seconds)}
    pool = corpus.split_sentences(corpus.load_sentences(), sizes, args.seed)["longform"]
    rng = random.Random(f"longform-{args.seed}")
    d = os.path.join(args.out, "longform")
    os.makedirs(os.path.join(d, "wav"), exist_ok=True)
    rows = []
    for seconds, voice in zip(args.seconds, VOICES):
        uid = f"longform-{voice.name.replace('+', '-')}-{seconds:g}s"
        path = os.path.join(d, "wav", uid + ".wav")
        waves, texts, length = [], [], 0
        while length < seconds * RATE:
            if not pool:
                raise SystemExit("ran out of held-out sentences: ask for shorter recordings")
            text = pool.pop(0)
            wave = tts.synthesize(text, voice)
            gap = np.zeros(int(rng.uniform(0.3, 0.7) * RATE), dtype=np.float32)
            waves += [wave, gap]
            texts.append(text)
            length += len(wave) + len(gap)
        audio = np.concatenate(waves[:-1])
        tmp = path + ".tmp.wav"
        sf.write(tmp, audio, RATE, subtype="PCM_16")
        os.replace(tmp, path)
        rows.append({"id": uid, "audio": os.path.abspath(path), "text": " ".join(texts),
                     "duration": round(len(audio) / RATE, 3), "voice": voice.tag})
    tmp = os.path.join(d, "manifest.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, os.path.join(d, "manifest.jsonl"))
    print(f"{d}/manifest.jsonl: {len(rows)} recordings, "
          f"{sum(r['duration'] for r in rows) / 60:.1f} min, "
          f"{sum(len(r['text'].split()) for r in rows)} words")


if __name__ == "__main__":
    main()
