"""`lalmtool transcribe` against transformers' own long-form Whisper, back to back on the same
recordings: real-time factor, peak memory and WER.

Usage: python benchmarks/bench_transcribe.py --manifest data/longform/manifest.jsonl \
           --model whisper-tiny.en --adapter exp/lora/uniform-mean-k3/adapter \
           [--join-seconds 600] [--ct2 DIR]

For each recording of the manifest (``audio`` and ``text``; e.g. recipes/mini_longform's
``data/longform``; ``--join-seconds S``: instead, one recording of at least S seconds made by
joining them in turn, their transcripts joined) four ways of getting its transcript, each
timed on all recordings in turn:

* ``transcribe``: ``lalmtool.Transcriber(model, adapter)`` (the adapter's compression, 30 s
  pieces);
* ``ct2``: ``Transcriber`` on the adapter exported with ``lalmtool export --format ct2``
  (``--ct2 DIR``, else exported here as int8 into a temporary folder);
* ``pipeline``: ``transformers.pipeline("automatic-speech-recognition", chunk_length_s=30)``
  (batched chunks with strides, the chunks' texts merged);
* ``generate``: ``WhisperForConditionalGeneration.generate(return_timestamps=True)`` on the
  whole log-mel (sequential 30 s windows, each starting where the last complete segment ended).

Each runs in a fresh process (its peak resident memory is its own: model load included), after
one warm-up recording. WER after Whisper's English normalizer (jiwer). Prints a table and the
ratios of transcribe to the faster anchor (real-time factor) and to that anchor's WER.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time


def _run(way: str, model_dir: str, adapter: str | None, rows: list[dict], queue,
         ct2: str | None = None) -> None:
    import soundfile as sf
    import torch

    torch.set_num_threads(torch.get_num_threads())
    audio = [sf.read(r["audio"], dtype="float32")[0] for r in rows]
    if way in ("transcribe", "ct2"):  # the adapter, or its CTranslate2 export
        from lalmtool import Transcriber

        t = Transcriber(ct2, device="cpu") if way == "ct2" else \
            Transcriber(model_dir, adapter=adapter, device="cpu")
        run = lambda a: t.transcribe([a])[0].text  # noqa: E731
    elif way == "pipeline":
        from transformers import pipeline

        asr = pipeline("automatic-speech-recognition", model=model_dir, chunk_length_s=30,
                       device="cpu")
        run = lambda a: asr({"raw": a, "sampling_rate": 16000})["text"]  # noqa: E731
    else:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        processor = WhisperProcessor.from_pretrained(model_dir)
        model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()

        def run(a):
            inputs = processor(a, sampling_rate=16000, return_tensors="pt", truncation=False,
                               padding="longest", return_attention_mask=True)
            if inputs.input_features.shape[-1] < 3000:
                inputs = processor(a, sampling_rate=16000, return_tensors="pt",
                                   return_attention_mask=True)
            with torch.inference_mode():
                ids = model.generate(inputs.input_features, attention_mask=inputs.attention_mask,
                                     return_timestamps=True)
            return processor.batch_decode(ids, skip_special_tokens=True)[0]
    run(audio[0][: 16000 * 5])  # warm-up
    hyps, seconds = [], 0.0
    for a in audio:
        t0 = time.perf_counter()
        hyps.append(run(a).strip())
        seconds += time.perf_counter() - t0
    queue.put({"way": way, "hyps": hyps, "seconds": seconds,
               "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _joined(rows: list[dict], seconds: float, folder: str) -> list[dict]:
    """One recording of at least ``seconds``: ``rows``' audio joined in turn (cycled), their
    transcripts joined."""
    import numpy as np
    import soundfile as sf

    waves, texts, total, i = [], [], 0.0, 0
    while total < seconds:
        r = rows[i % len(rows)]
        wave, rate = sf.read(r["audio"], dtype="float32")
        waves.append(wave)
        texts.append(r["text"])
        total += len(wave) / rate
        i += 1
    path = os.path.join(folder, f"joined-{total:.0f}s.wav")
    sf.write(path, np.concatenate(waves), rate)
    return [{"id": os.path.basename(path)[:-4], "audio": path, "text": " ".join(texts),
             "duration": total}]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--model", default="whisper-tiny.en")
    ap.add_argument("--adapter", required=True, help="recipes/mini's uniform-mean-k3 adapter")
    ap.add_argument("--ways", nargs="+", default=["transcribe", "ct2", "pipeline", "generate"])
    ap.add_argument("--ct2", help="the adapter exported with --format ct2 (default: exported "
                                  "here, int8)")
    ap.add_argument("--join-seconds", type=float,
                    help="one recording of at least this many seconds: the manifest's joined")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    import jiwer

    from lalmtool.assets import resolve_model
    from lalmtool.score import get_normalizer

    normalize = get_normalizer("whisper_english")

    model_dir = resolve_model(args.model)
    rows = [json.loads(line) for line in open(args.manifest, encoding="utf-8") if line.strip()]
    base = os.path.dirname(os.path.abspath(args.manifest))
    for r in rows:
        r["audio"] = r["audio"] if os.path.isabs(r["audio"]) else os.path.join(base, r["audio"])
    audio_s = sum(float(r.get("duration") or 0) for r in rows)
    tmp = tempfile.mkdtemp(prefix="bench_transcribe-")
    if args.join_seconds:
        rows, audio_s = _joined(rows, args.join_seconds, tmp), None
    if "ct2" in args.ways and not args.ct2:
        from lalmtool.export import export

        args.ct2 = os.path.join(tmp, "ct2")
        export(args.adapter, args.ct2, model=model_dir, format="ct2", quantization="int8")
    if not audio_s:
        import soundfile as sf
        audio_s = sum(sf.info(r["audio"]).duration for r in rows)
    refs = [normalize(r["text"]) for r in rows]
    out = []
    ctx = mp.get_context("spawn")
    for way in args.ways:
        queue = ctx.Queue()
        p = ctx.Process(target=_run, args=(way, model_dir, args.adapter, rows, queue, args.ct2))
        p.start()
        res = queue.get()
        p.join()
        hyps = [normalize(h) for h in res["hyps"]]
        m = jiwer.process_words(refs, hyps)
        out.append({"way": way, "rtf": res["seconds"] / audio_s, "seconds": res["seconds"],
                    "peak_mb": res["peak_mb"], "wer": 100 * m.wer,
                    "sub_del_ins": [m.substitutions, m.deletions, m.insertions]})
    print(f"{len(rows)} recordings, {audio_s:.0f} s of audio; model {args.model}, adapter "
          f"{args.adapter}")
    print(f"{'way':<11} {'RTF':>7} {'seconds':>8} {'peak MB':>8} {'WER %':>6}  S/D/I")
    for r in out:
        print(f"{r['way']:<11} {r['rtf']:>7.4f} {r['seconds']:>8.1f} {r['peak_mb']:>8.0f} "
              f"{r['wer']:>6.2f}  {'/'.join(map(str, r['sub_del_ins']))}")
    anchors = [r for r in out if r["way"] in ("pipeline", "generate")]
    for ours in (r for r in out if r["way"] in ("transcribe", "ct2")):
        if not anchors:
            break
        fast = min(anchors, key=lambda r: r["rtf"])
        print(f"{ours['way']} against the faster anchor ({fast['way']}): "
              f"{fast['rtf'] / ours['rtf']:.2f}x faster, WER {ours['wer']:.2f} vs "
              f"{fast['wer']:.2f} ({ours['wer'] / fast['wer'] if fast['wer'] else float('nan'):.2f}x)")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
