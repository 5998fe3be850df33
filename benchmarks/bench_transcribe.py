"""`lalmtool transcribe` against transformers' own long-form Whisper, back to back on the same
recordings: real-time factor, peak memory and WER.

Usage: python benchmarks/bench_transcribe.py --manifest data/longform/manifest.jsonl \
           --model whisper-tiny.en --adapter exp/lora/uniform-mean-k3/adapter [--repeats 1]

For each recording of the manifest (``audio`` and ``text``; e.g. recipes/mini_longform's
``data/longform``) three ways of getting its transcript, each timed on all recordings in turn:

* ``transcribe``: ``lalmtool.Transcriber(model, adapter)`` (the adapter's compression, 30 s
  pieces);
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
import time


def _run(way: str, model_dir: str, adapter: str | None, rows: list[dict], queue) -> None:
    import soundfile as sf
    import torch

    torch.set_num_threads(torch.get_num_threads())
    audio = [sf.read(r["audio"], dtype="float32")[0] for r in rows]
    if way == "transcribe":
        from lalmtool import Transcriber

        t = Transcriber(model_dir, adapter=adapter, device="cpu")
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


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--model", default="whisper-tiny.en")
    ap.add_argument("--adapter", required=True, help="recipes/mini's uniform-mean-k3 adapter")
    ap.add_argument("--ways", nargs="+", default=["transcribe", "pipeline", "generate"])
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
    if not audio_s:
        import soundfile as sf
        audio_s = sum(sf.info(r["audio"]).duration for r in rows)
    refs = [normalize(r["text"]) for r in rows]
    out = []
    ctx = mp.get_context("spawn")
    for way in args.ways:
        queue = ctx.Queue()
        p = ctx.Process(target=_run, args=(way, model_dir, args.adapter, rows, queue))
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
    ours = next((r for r in out if r["way"] == "transcribe"), None)
    anchors = [r for r in out if r["way"] != "transcribe"]
    if ours and anchors:
        fast = min(anchors, key=lambda r: r["rtf"])
        print(f"transcribe against the faster anchor ({fast['way']}): "
              f"{fast['rtf'] / ours['rtf']:.2f}x faster, WER {ours['wer']:.2f} vs "
              f"{fast['wer']:.2f} ({ours['wer'] / fast['wer'] if fast['wer'] else float('nan'):.2f}x)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
