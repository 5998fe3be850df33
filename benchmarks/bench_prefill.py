"""What compression saves in a decoder-only LALM: LLM prefill time, peak memory and FLOPs.

Usage: python benchmarks/bench_prefill.py [--backends qwen2-audio speechllm]
           [--seconds 30 120 600] [--repeats 2] [--device cpu|cuda] [--dtype float32|bfloat16]
           [--qwen-model DIR | --arch qwen2-audio-7b | --arch-config CONFIG.json]
           [--random-frames] [--llm smollm2-135m-instruct] [--encoder whisper-tiny.en]
           [--json FILE]

On a GPU, the real Qwen2-Audio-7B architecture with random weights built on the device (no
download; cost does not depend on the weights' values):

    python benchmarks/bench_prefill.py --arch qwen2-audio-7b --device cuda --dtype bfloat16

For every backend, audio length and condition it builds the decoder's input for one utterance
exactly as ``lalmtool decode`` does (prompt, audio positions, left padding) and runs the LLM's
prefill: one forward pass over the whole prompt that fills the KV cache (what ``generate`` does
before its first token). It prints

* audio tokens and LLM positions (prompt included),
* prefill time (the best of ``--repeats`` warm runs),
* peak memory of the prefill above what was allocated before it (weights and inputs excluded):
  ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the growth of the process's peak resident
  set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; large blocks are returned to
  the system on free, so each run's peak is its own),
* FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``: matrix products and attention
  (the attention counted as the full L x L square, as that counter does, causal or not),

each also as a ratio to frame level, next to the *ideal* ratio: the ratio of audio tokens
(0.5 for 2x compression). Costs that grow linearly with the sequence land near the ideal; the
attention's quadratic term pulls below it for long audio; the fixed text prompt pulls above it
for short audio.

The audio is the five real LibriVox clips (24.7 s), encoded once by the real Whisper tiny.en
encoder and repeated to each length, so that ``peaks`` finds the boundaries it finds on real
speech. Conditions: frame level, uniform k=2 and k=3 (mean pooling and downsampling cost the
same: equal token counts) and ``peaks``.

Backends:
* ``speechllm``: the real SmolLM2-135M-Instruct behind the real tiny.en encoder (stack 4,
  MLP projector, randomly initialised: cost does not depend on training).
* ``qwen2-audio``: Qwen2-Audio's architecture at a small size, randomly initialised (written by
  ``write_random_qwen2_audio``: 8 decoder layers of width 512, 8 heads, MLP width 1376 = the 7B's
  ratio) — or a real checkpoint with ``--qwen-model``. Its frame level is the tower's 25 Hz
  output; here that is the tiny.en frames averaged in pairs, as the tower's own pooler does, and
  every compressor runs on those 25 Hz frames. ``--arch``/``--arch-config`` build that
  architecture (``benchmarks/archs.py``) with random weights directly on ``--device`` instead.

``--random-frames`` replaces the real frames by Gaussian ones (no assets needed; ``peaks`` then
cuts about one token in three).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

if __name__ == "__main__" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    # blocks >= 64 KiB are mmap-ed and unmapped on free, so freed memory never hides a peak
    os.execve(sys.executable, [sys.executable, *sys.argv],
              {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

import numpy as np
import soundfile as sf
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from lalmtool.models import load_backend
from lalmtool.pool import pool
from lalmtool.segment import peaks, uniform

from archs import ARCHS, PeakMemory, arch_config, random_qwen2_audio  # benchmarks/archs.py
from family_archs import ARCHS as ALL_FAMILY_ARCHS, random_audio_llm  # benchmarks/family_archs.py

#: The audio LLM families' real architectures (run through the generic audio LLM backend).
FAMILY_ARCHS = sorted(set(ALL_FAMILY_ARCHS) - set(ARCHS))

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_counter.flop_registry:  # the CPU kernel of SDPA: count it like the others
    flop_counter.register_flop_formula(_CPU_SDPA, get_raw=True)(flop_counter.sdpa_flop)
CONDITIONS = ("frames", "uniform-k2", "uniform-k3", "peaks")


def real_frames(encoder: str) -> np.ndarray:
    """Whisper frames [T, D] at 50 Hz of the LibriVox clips, concatenated."""
    waves = [sf.read(os.path.join(LIBRIVOX, f), dtype="float32")[0]
             for f in sorted(os.listdir(LIBRIVOX)) if f.endswith(".wav")]
    be = load_backend("whisper", encoder)
    return np.concatenate([f.numpy() for f in be.encode(waves)])


def starts_of(frames: np.ndarray, condition: str) -> np.ndarray:
    """Segment starts of ``condition`` on ``frames`` (every frame its own segment at frame level)."""
    if condition == "frames":
        return np.arange(len(frames), dtype=np.int32)
    return peaks(frames) if condition == "peaks" else uniform(frames, int(condition[-1]))


def prefill_fn(be, feats: torch.Tensor):
    """(run, audio tokens, LLM positions): ``run()`` is one prefill of ``feats``, as decode does."""
    batch = be.build_inputs([feats], padding_side="left")
    if be.name == "speechllm":
        core = be._core()
        with torch.inference_mode():
            embeds = core.embed(batch.input_ids, batch.audio_mask, batch.audio)

        def run():
            return core.llm(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, use_cache=True, logits_to_keep=1)
    else:
        from lalmtool.models.base import logits_only

        def run():
            with logits_only(be._core().get_output_embeddings(), lambda h: h[:, -1:]):
                return be.model(**batch.model_inputs(), use_cache=True)
    return run, be.num_audio_tokens(feats), int(batch.attention_mask.sum())


def measure(run, device: torch.device, repeats: int) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        with PeakMemory(device) as mem, FlopCounterMode(display=False) as flops:
            run()  # first run: memory and FLOPs (the counter's overhead is per op, not per flop)
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - t0)
    return {"seconds": min(times), "peak_mib": mem.mib, "gflop": flops.get_total_flops() / 1e9}


def load(name: str, args, tmp: str):
    opts = {"device": args.device, "dtype": args.dtype}
    if name == "speechllm":
        return load_backend(name, args.llm, encoder=args.encoder, **opts)
    if args.arch in FAMILY_ARCHS:
        return random_audio_llm(args.arch, tmp, args.device, getattr(torch, args.dtype),
                                args.layers)
    if args.arch or args.arch_config:
        return random_qwen2_audio(arch_config(args.arch, args.arch_config), tmp, args.device,
                                  getattr(torch, args.dtype))
    path = args.qwen_model or os.path.join(tmp, "qwen2-audio")
    if not args.qwen_model:
        from lalmtool.testing import write_random_qwen2_audio
        write_random_qwen2_audio(path, hidden=512, layers=8, heads=8, kv_heads=8,
                                intermediate=1376, audio_dim=384, max_positions=32768)
    return load_backend(name, path, **opts)


def table(rows: list[dict]) -> str:
    head = (f"{'audio':>6} {'condition':<11} {'audio tok':>9} {'positions':>9} {'ideal':>6} "
            f"{'prefill s':>9} {'ratio':>6} {'peak MiB':>9} {'ratio':>6} {'GFLOP':>9} {'ratio':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ref = next(x for x in rows if x["seconds_audio"] == r["seconds_audio"]
                   and x["condition"] == "frames")
        ratio = {k: r[k] / ref[k] if ref[k] > 0 else float("nan")
                 for k in ("audio_tokens", "seconds", "peak_mib", "gflop")}
        r["ratios"] = ratio
        lines.append(f"{r['seconds_audio']:>5.0f}s {r['condition']:<11} {r['audio_tokens']:>9} "
                     f"{r['positions']:>9} {ratio['audio_tokens']:>6.3f} {r['seconds']:>9.3f} "
                     f"{ratio['seconds']:>6.3f} {r['peak_mib']:>9.1f} {ratio['peak_mib']:>6.3f} "
                     f"{r['gflop']:>9.1f} {ratio['gflop']:>6.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", choices=["speechllm", "qwen2-audio"],
                    help="default: both; qwen2-audio alone with --arch/--arch-config")
    ap.add_argument("--seconds", nargs="+", type=float, default=[30, 120, 600])
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs; the best is kept")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--llm", default="smollm2-135m-instruct", help="speechllm's LLM")
    ap.add_argument("--encoder", default="whisper-tiny.en",
                    help="Whisper encoder: speechllm's, and the features for every backend")
    ap.add_argument("--qwen-model", help="a Qwen2-Audio checkpoint instead of the random one")
    ap.add_argument("--arch", choices=sorted(ARCHS) + FAMILY_ARCHS,
                    help="this real architecture, random weights built on --device: "
                         "qwen2-audio's, or an audio LLM family's (benchmarks/family_archs.py)")
    ap.add_argument("--layers", type=int,
                    help="a family --arch at this LLM depth (CPU runs); default: its own")
    ap.add_argument("--arch-config", help="qwen2-audio: a Qwen2-Audio config.json, as --arch")
    ap.add_argument("--random-frames", action="store_true",
                    help="Gaussian frames instead of real speech through tiny.en (no assets)")
    ap.add_argument("--json", help="also write the rows (with ratios) here")
    args = ap.parse_args(argv)
    family = args.arch in FAMILY_ARCHS
    if family:
        args.backends = ["audio-llm"]
    elif args.backends is None:
        args.backends = (["qwen2-audio"] if args.arch or args.arch_config
                         else ["speechllm", "qwen2-audio"])
    args.conditions = ["frames"] + [c for c in args.conditions if c != "frames"]  # the reference
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = (np.random.default_rng(0).standard_normal((1250, 384)).astype(np.float32)
            if args.random_frames or family else real_frames(args.encoder))  # 50 Hz, tiny.en
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends:
            be = load(name, args, tmp)
            real, rate = (base, 50.0) if name == "speechllm" else (
                pool(base, starts_of(base, "uniform-k2")), 25.0)  # the tower's 25 Hz
            width = (be.feature_dim if name == "speechllm" else
                     be._core().get_input_embeddings().weight.shape[1] if family else
                     be._core().model.multi_modal_projector.linear.in_features)
            if family:  # Gaussian audio tokens at the family's native rate
                rate = be.frame_rate
                real = np.random.default_rng(0).standard_normal(
                    (int(30 * rate), width)).astype(np.float32)
            warm_up, _, _ = prefill_fn(be, torch.randn(100, width))
            with torch.inference_mode():
                warm_up()  # one-time initialisation stays out of the first measurement
            rows = []
            for seconds in args.seconds:
                tiled = np.resize(real, (int(round(seconds * rate)), real.shape[1]))
                # a real checkpoint wider than tiny.en reads random frames cut where tiny.en's are
                source = tiled if width == tiled.shape[1] else np.random.default_rng(0) \
                    .standard_normal((len(tiled), width)).astype(np.float32)
                for cond in args.conditions:
                    feats = torch.from_numpy(pool(source, starts_of(tiled, cond), "mean"))
                    run, tokens, positions = prefill_fn(be, feats)
                    rows.append({"seconds_audio": seconds, "condition": cond,
                                 "audio_tokens": tokens, "positions": positions,
                                 **measure(run, device, args.repeats)})
                    print(f"  {name} {seconds:.0f}s {cond}: {rows[-1]}", file=sys.stderr)
            core = be._core()
            attn = (core.llm if name == "speechllm" else core).config._attn_implementation
            label = (args.arch or args.arch_config if name != "speechllm" else None) or \
                os.path.basename(os.path.normpath(be.model_path))
            print(f"\n{be.name} ({label}"
                  f"{f', {args.layers} LLM layers' if family and args.layers else ''}), "
                  f"{args.device} {args.dtype}, attention {attn}, {torch.get_num_threads()} "
                  f"threads; ratios are to frame level, ideal = ratio of audio tokens")
            print(table(rows))
            limit = getattr(be, "position_limit", lambda: None)()
            over = sorted({f"{r['seconds_audio']:.0f}s {r['condition']}" for r in rows
                           if limit and r["positions"] > limit})
            if over:
                print(f"beyond the LLM's {limit} positions (max_position_embeddings; decode "
                      f"refuses these): {', '.join(over)}")
            results[name] = rows
            del be
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
