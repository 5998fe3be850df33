"""Generation speed of the decoder-only backends next to what the hardware allows.

Usage: python benchmarks/bench_generate.py [--backends qwen2-audio speechllm]
           [--seconds 30] [--conditions frames uniform-k3 peaks] [--batch 1 8 16]
           [--new-tokens 48] [--beam 1] [--compile off on] [--repeats 3] [--threads N]
           [--device cpu|cuda] [--dtype float32|bfloat16] [--bandwidth GB/s]
           [--qwen-model DIR | --arch qwen2-audio-7b | --arch-config CONFIG.json]
           [--llm smollm2-135m-instruct] [--encoder whisper-tiny.en] [--json FILE]

On a GPU, the real Qwen2-Audio-7B architecture with random weights built on the device (no
download; cost does not depend on the weights' values, see ``archs.py``):

    python benchmarks/bench_generate.py --arch qwen2-audio-7b --device cuda --dtype bfloat16

Every measurement calls the backend's own ``generate_ids`` (what ``lalmtool decode`` runs) on a
batch of ``--batch`` copies of one utterance (no padding), with the end tokens replaced by an id
beyond the vocabulary so that exactly ``--new-tokens`` tokens are generated whatever the random
weights say. Per backend, ``--compile`` mode, audio length, condition and batch it prints

* audio tokens and the LLM positions of one prompt (prompt text + audio),
* prefill: the time of ``generate_ids`` with one new token (the prompt's forward pass and the
  first token),
* ms per decode step: (time for N tokens - time for 1) / (N - 1), the best of ``--repeats``,
* tokens/s: generated tokens per second of the whole call (prefill included) and of the decode
  steps alone (batch x beam / step),
* the step's lower bound: the bytes one decode step must read — every weight of the LLM that a
  step uses (all its layers, the output head; not the input embedding table, of which it reads
  B rows) and the KV cache (2 x layers x KV heads x head dim x element size per position, for the
  prompt and half the new tokens on average, per sequence and beam) — over the memory bandwidth,
  ``--bandwidth`` GB/s or, by default, measured by copying a large tensor (bytes read + written
  per second); and the ratio step time / bound (1 = the memory traffic's speed).

``--compile off on`` times both settings of the backends' ``compile`` option (static KV cache,
compiled decode step) on the same model, their runs alternating; a compiled mode's first call
per shape compiles, and that warm-up (first call - a warm call) is printed.

Backends: ``qwen2-audio`` is Qwen2-Audio's architecture at a small random size (8 decoder layers
of width 512, as ``bench_prefill.py``), a real checkpoint (``--qwen-model``), or any architecture
built with random weights on ``--device`` (``--arch``/``--arch-config``; ``--arch
qwen2-audio-tiny32`` has the 7B's 32 decoder layers at width 64: its step time is almost all
per-step overhead). ``speechllm`` is the real SmolLM2-135M-Instruct behind tiny.en (stack 4,
random projector). Features are Gaussian frames (25 Hz for qwen2-audio, 50 Hz tiny.en width for
speechllm), compressed with the toolkit's ``uniform``/``peaks`` and mean pooling.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

from lalmtool.models import load_backend
from lalmtool.pool import pool
from lalmtool.segment import peaks, uniform

from archs import ARCHS, arch_config, random_qwen2_audio  # benchmarks/archs.py

CONDITIONS = ("frames", "uniform-k2", "uniform-k3", "peaks")


# -- the lower bound ---------------------------------------------------------------------------
def kv_bytes_per_token(text_config, dtype: torch.dtype) -> int:
    """KV-cache bytes one position takes in one sequence: keys and values of every layer."""
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * text_config.num_hidden_layers * kv_heads * head_dim * item


def llm_parts(be) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    """(the decoder stack with its input embedding, the output head, the text config)."""
    core = be._core()
    if be.name == "speechllm":
        llm = core.llm
        return llm.get_decoder(), llm.get_output_embeddings(), llm.config
    return core.model.language_model, core.lm_head, core.config.get_text_config()


def step_weight_bytes(decoder: torch.nn.Module, head: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: every parameter of the decoder stack and
    the head, the input embedding table excepted (a step gathers B of its rows) unless the
    head shares it."""
    params = {id(p): p for m in (decoder, head) for p in m.parameters()}
    table = decoder.get_input_embeddings().weight
    if not any(p is table for p in head.parameters()):
        params.pop(id(table), None)
    return sum(p.numel() * p.element_size() for p in params.values())


def step_bytes(weights: int, kv_per_token: int, sequences: int, positions: int,
               new_tokens: int) -> tuple[int, float]:
    """(weight bytes, mean KV-cache bytes) a decode step reads: the cache holds the prompt's
    ``positions`` and, on average over the steps, half the new tokens, for each sequence."""
    return weights, kv_per_token * sequences * (positions + new_tokens / 2)


def measure_bandwidth(device: torch.device, mib: int | None = None, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s: a large tensor copy, bytes read + written per second."""
    mib = mib or (1024 if device.type == "cuda" else 256)
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


# -- the features --------------------------------------------------------------------------
def starts_of(frames: np.ndarray, condition: str) -> np.ndarray:
    if condition == "frames":
        return np.arange(len(frames), dtype=np.int32)
    return peaks(frames) if condition == "peaks" else uniform(frames, int(condition[-1]))


def features(be, seconds: float, condition: str) -> torch.Tensor:
    """One utterance of ``seconds`` of Gaussian frames at the backend's stored rate and width,
    compressed as ``condition`` (mean pooling)."""
    if be.name == "speechllm":
        rate, width = 50.0, be.feature_dim
    else:
        rate, width = 25.0, be._core().model.multi_modal_projector.linear.in_features
    frames = np.random.default_rng(0).standard_normal(
        (int(round(seconds * rate)), width)).astype(np.float32)
    return torch.from_numpy(pool(frames, starts_of(frames, condition), "mean"))


# -- timing --------------------------------------------------------------------------------
def never_stop(be) -> None:
    """Generation runs to max_new_tokens: the end tokens become an id beyond the vocabulary."""
    _, head, _ = llm_parts(be)
    never = int(head.weight.shape[0])
    be.stop_ids = lambda: [never]


def timed(be, feats: list[torch.Tensor], beam: int, n: int, sync) -> tuple[float, torch.Tensor]:
    sync()
    t0 = time.perf_counter()
    out = be.generate_ids(feats, beam, n)
    sync()
    return time.perf_counter() - t0, out


def measure(be, feats: list[torch.Tensor], beam: int, new_tokens: int, repeats: int,
            device: torch.device, modes: list[bool]) -> dict[bool, dict]:
    """Per ``compile`` mode (the backend's option, switched between calls on the same model):
    prefill_s (one new token), total_s (``new_tokens``), step_s, and first_s, the first call
    (warm-up: one-time initialisation, compiling under ``compile``). The modes' timed runs
    alternate, so that a machine's varying load hits them alike. A mode whose compile fell back
    to eager is left out. With both modes, the compiled row says whether its token ids are the
    eager ones (``same_ids_as_eager``)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    core = be._core()
    first, ids = {}, {}
    for mode in list(modes):
        be.compile = mode
        for m in (core, getattr(core, "llm", None)):  # a fresh static cache sized for this input
            if m is not None and hasattr(m, "_previous_max_cache_length"):
                del m._previous_max_cache_length
        first[mode], out = timed(be, feats, beam, new_tokens, sync)
        ids[mode] = out
        if out.shape[1] != new_tokens:
            raise RuntimeError(f"generated {out.shape[1]} tokens, not {new_tokens}")
        if be.compile != mode:
            print("  compile fell back to eager: left out from here on", file=sys.stderr)
            del first[mode]
            modes.remove(mode)
    ones = {mode: [] for mode in first}
    fulls = {mode: [] for mode in first}
    for _ in range(repeats):
        for mode in first:
            be.compile = mode
            ones[mode].append(timed(be, feats, beam, 1, sync)[0])
            fulls[mode].append(timed(be, feats, beam, new_tokens, sync)[0])
    out = {}
    for mode in first:
        prefill, total = min(ones[mode]), min(fulls[mode])
        out[mode] = {"first_s": first[mode], "prefill_s": prefill, "total_s": total,
                     "step_s": (total - prefill) / max(new_tokens - 1, 1)}
        if mode and False in ids:
            out[mode]["same_ids_as_eager"] = torch.equal(ids[mode], ids[False])
    return out


# -- where a step's time goes ---------------------------------------------------------------
def profile_steps(be, feats: list[torch.Tensor], beam: int, new_tokens: int) -> list[tuple]:
    """(part, ms per new token, the prefill spread over them) of an eager generation under
    cProfile: the decoder's layers and their parts, the mask built every step, the rotary
    embedding, the model's wrappers and the generation loop around the model. cProfile slows
    Python down (its per-call cost): the parts' shares are what to read, next to the unprofiled
    ms per step."""
    import cProfile
    import inspect
    import pstats

    from transformers import masking_utils
    from transformers.generation.utils import GenerationMixin

    decoder, _, _ = llm_parts(be)
    core = be._core()
    top = core.llm if be.name == "speechllm" else core
    layer = decoder.layers[0]
    parts = [("the whole call (generate)", GenerationMixin.generate),
             ("  generation loop (_sample / _beam_search)", GenerationMixin._sample),
             ("  generation loop (_sample / _beam_search)", GenerationMixin._beam_search),
             ("    the model's forward", type(top).forward),
             ("      the decoder stack", type(decoder).forward),
             ("        causal mask (every step)", masking_utils.create_causal_mask),
             ("        rotary embedding", type(decoder.rotary_emb).forward),
             ("        decoder layers", type(layer).forward),
             ("          attention", type(layer.self_attn).forward),
             ("          MLP", type(layer.mlp).forward),
             ("          RMSNorm", type(layer.input_layernorm).forward)]
    be.compile = False
    be.generate_ids(feats, beam, 2)
    profiler = cProfile.Profile()
    profiler.enable()
    be.generate_ids(feats, beam, new_tokens)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    out = {}
    for label, fn in parts:
        code = inspect.unwrap(fn).__code__
        key = (code.co_filename, code.co_firstlineno, code.co_name)
        if key in stats:
            out[label] = out.get(label, 0.0) + stats[key][3] * 1e3 / new_tokens
    return list(out.items())


# -- the run -------------------------------------------------------------------------------
def load(name: str, args, tmp: str):
    opts = {"device": args.device, "dtype": args.dtype}
    if name == "speechllm":
        return load_backend(name, args.llm, encoder=args.encoder, **opts)
    if args.arch or args.arch_config:
        return random_qwen2_audio(arch_config(args.arch, args.arch_config), tmp, args.device,
                                  getattr(torch, args.dtype))
    path = args.qwen_model or os.path.join(tmp, "qwen2-audio")
    if not args.qwen_model and not os.path.exists(path):
        from lalmtool.testing import write_random_qwen2_audio
        write_random_qwen2_audio(path, hidden=512, layers=8, heads=8, kv_heads=8,
                                intermediate=1376, audio_dim=384, max_positions=32768)
    return load_backend(name, path, **opts)


def table(rows: list[dict]) -> str:
    head = (f"{'audio':>6} {'condition':<11} {'batch':>5} {'compile':>7} {'audio tok':>9} "
            f"{'positions':>9} "
            f"{'prefill ms':>10} {'step ms':>8} {'tok/s':>8} {'step tok/s':>10} "
            f"{'weights MB':>10} {'KV MB':>8} {'bound ms':>8} {'ratio':>6} {'warm-up s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['seconds_audio']:>5.0f}s {r['condition']:<11} {r['batch']:>5} "
            f"{'on' if r['compile'] else 'off':>7} {r['audio_tokens']:>9} {r['positions']:>9} "
            f"{r['prefill_s'] * 1e3:>10.1f} "
            f"{r['step_s'] * 1e3:>8.2f} {r['tokens_per_s']:>8.1f} {r['step_tokens_per_s']:>10.1f} "
            f"{r['weight_bytes'] / 1e6:>10.1f} {r['kv_bytes'] / 1e6:>8.2f} "
            f"{r['bound_s'] * 1e3:>8.3f} {r['ratio']:>6.1f} {r['warmup_s']:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", choices=["speechllm", "qwen2-audio"],
                    default=["qwen2-audio"])
    ap.add_argument("--seconds", nargs="+", type=float, default=[30])
    ap.add_argument("--conditions", nargs="+", default=["frames", "uniform-k3", "peaks"],
                    choices=CONDITIONS)
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 16])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--beam", type=int, default=1)
    ap.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off"],
                    help="the backends' compile option (static KV cache + compiled decode step)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--bandwidth", type=float,
                    help="memory bandwidth in GB/s (default: measured by a tensor copy)")
    ap.add_argument("--llm", default="smollm2-135m-instruct", help="speechllm's LLM")
    ap.add_argument("--encoder", default="whisper-tiny.en", help="speechllm's encoder")
    ap.add_argument("--qwen-model", help="a Qwen2-Audio checkpoint instead of the random one")
    ap.add_argument("--arch", choices=sorted(ARCHS),
                    help="qwen2-audio: this architecture, random weights built on --device")
    ap.add_argument("--arch-config", help="qwen2-audio: a Qwen2-Audio config.json, as --arch")
    ap.add_argument("--profile", action="store_true",
                    help="also print where an eager step's time goes (cProfile) for the first "
                         "condition and batch")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (a step is the time between two tokens)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.bandwidth:
        bandwidth, how = args.bandwidth * 1e9, "stated"
    else:
        bandwidth, how = measure_bandwidth(device), "measured by a tensor copy"
    modes = [mode == "on" for mode in args.compile]
    results = {"bandwidth_gbs": bandwidth / 1e9, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends:
            be = load(name, args, tmp)
            never_stop(be)
            decoder, head, text_config = llm_parts(be)
            weights = step_weight_bytes(decoder, head)
            kv_token = kv_bytes_per_token(text_config, dtype)
            rows = []
            for seconds in args.seconds:
                for cond in args.conditions:
                    feats = features(be, seconds, cond)
                    positions = be.prompt_positions(feats.shape[0])
                    for b in args.batch:
                        timings = measure(be, [feats] * b, args.beam, args.new_tokens,
                                          args.repeats, device, modes)
                        w, kv = step_bytes(weights, kv_token, b * args.beam, positions,
                                           args.new_tokens)
                        bound = (w + kv) / bandwidth
                        for mode, t in timings.items():
                            rows.append({
                                "backend": name, "compile": mode, "seconds_audio": seconds,
                                "condition": cond, "batch": b, "beam": args.beam,
                                "new_tokens": args.new_tokens,
                                "audio_tokens": be.num_audio_tokens(feats),
                                "positions": positions, **t,
                                "warmup_s": max(t["first_s"] - t["total_s"], 0.0),
                                "tokens_per_s": b * args.new_tokens / t["total_s"],
                                "step_tokens_per_s": b * args.beam / t["step_s"],
                                "weight_bytes": w, "kv_bytes": kv, "bound_s": bound,
                                "ratio": t["step_s"] / bound})
                            print(f"  {name} {seconds:.0f}s {cond} batch {b} compile "
                                  f"{'on' if mode else 'off'}: {t['step_s'] * 1e3:.2f} ms/step",
                                  file=sys.stderr)
            label = (args.arch or args.arch_config if name == "qwen2-audio" else None) or \
                os.path.basename(os.path.normpath(be.model_path))
            print(f"\n{name} ({label}), {args.device} {args.dtype}, "
                  f"{torch.get_num_threads()} threads, beam {args.beam}, {args.new_tokens} new "
                  f"tokens; bandwidth {bandwidth / 1e9:.1f} GB/s ({how}); KV cache "
                  f"{kv_token / 2**10:.1f} KiB per position; ratio = step / bound")
            print(table(rows))
            limit = be.position_limit()
            over = sorted({f"{r['seconds_audio']:.0f}s {r['condition']}" for r in rows
                           if limit and r["positions"] + args.new_tokens > limit})
            if over:
                print(f"beyond the LLM's {limit} positions (decode refuses these): "
                      f"{', '.join(over)}")
            same = [r["same_ids_as_eager"] for r in rows if "same_ids_as_eager" in r]
            if same:
                print(f"compiled token ids == eager token ids: {sum(same)} of {len(same)} rows")
            results["rows"].extend(rows)
            if args.profile:
                feats = features(be, args.seconds[0], args.conditions[0])
                step = next(r["step_s"] for r in rows if not r["compile"])
                print(f"\nwhere an eager step goes ({args.seconds[0]:.0f}s "
                      f"{args.conditions[0]}, batch {args.batch[0]}; {step * 1e3:.2f} ms per "
                      f"step unprofiled): ms per new token under cProfile, share of the call")
                prof = profile_steps(be, [feats] * args.batch[0], args.beam, args.new_tokens)
                whole = prof[0][1]
                for label, ms in prof:
                    print(f"{label:<46} {ms:>8.3f} {ms / whole:>6.1%}")
                results.setdefault("profile", {})[name] = dict(prof)
            del be
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
