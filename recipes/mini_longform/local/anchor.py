#!/usr/bin/env python3
"""The anchor: transformers' own long-form Whisper on each recording's audio.

``WhisperForConditionalGeneration.generate(..., return_timestamps=True)`` on the whole log-mel
spectrogram: 30 s windows with timestamps and sequential seeking (each window starts where the
last complete segment of the previous one ended). Writes OUT/hyp.jsonl and OUT/decode.json in
``lalmtool decode``'s format (so ``lalmtool score`` and local/table.py read them); the time is
the generation's (mel spectrogram and encoder included), and ``peak_rss_mb`` this process's
peak memory. A rerun with hyp.jsonl present does nothing.

    python3 local/anchor.py --manifest data/longform/manifest.jsonl --model DIR --out DIR
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time

import soundfile as sf
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--model", required=True, help="Whisper checkpoint directory")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if os.path.exists(os.path.join(args.out, "hyp.jsonl")):
        print(f"{args.out}: already decoded, skipped")
        return
    processor = WhisperProcessor.from_pretrained(args.model)
    model = WhisperForConditionalGeneration.from_pretrained(args.model).eval()
    rows = [json.loads(line) for line in open(args.manifest, encoding="utf-8") if line.strip()]
    records = []
    for r in rows:
        audio, rate = sf.read(r["audio"], dtype="float32")
        t0 = time.perf_counter()
        inputs = processor(audio, sampling_rate=rate, return_tensors="pt", truncation=False,
                           padding="longest", return_attention_mask=True)
        if inputs.input_features.shape[-1] < 3000:  # short: one padded window
            inputs = processor(audio, sampling_rate=rate, return_tensors="pt",
                               return_attention_mask=True)
        with torch.inference_mode():
            ids = model.generate(inputs.input_features, attention_mask=inputs.attention_mask,
                                 return_timestamps=True)
        text = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
        seconds = time.perf_counter() - t0
        duration = len(audio) / rate
        windows = math.ceil(duration / 30)
        records.append({"id": r["id"], "hyp": text, "ref": r["text"], "tokens": 1500 * windows,
                        "duration": duration, "seconds": seconds})
        print(f"{r['id']}: {duration:.1f} s decoded in {seconds:.1f} s")
    os.makedirs(args.out, exist_ok=True)
    audio_s = sum(r["duration"] for r in records)
    info = {"set": os.path.basename(os.path.normpath(args.out)), "condition": "native-longform",
            "method": "native", "params": {}, "model": args.model, "adapter": None,
            "lora": False, "backend": "whisper (transformers long-form generate)",
            "utterances": len(records), "audio_seconds": audio_s,
            "audio_tokens": sum(r["tokens"] for r in records),
            "tokens_per_s": sum(r["tokens"] for r in records) / audio_s,
            "max_audio_tokens": 1500, "decode_seconds": sum(r["seconds"] for r in records),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open(os.path.join(args.out, "decode.json"), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=1)
    with open(os.path.join(args.out, "hyp.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
