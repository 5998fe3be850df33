"""Stage 5, ``lalmtool decode``: stored (compressed) features → hypotheses.

Writes ``OUT/hyp.jsonl`` (id, hyp, ref when known, tokens = audio tokens fed to the decoder,
duration = audio seconds, seconds = decode time attributed to the utterance; ``chunks`` when it
was decoded in pieces, ``cut`` when generation stopped at its token cap) and
``OUT/decode.json`` (the condition, paths, rates and speed). Batches are sorted by length.
Hypotheses are appended as they come, so an interrupted decode resumes where it stopped; under
``torchrun`` each rank decodes its own shards and rank 0 merges the parts.

Everything that determines the hypotheses is fingerprinted: the store, the model's and the
adapter's content (not their names), the manifest's content (the references), the search
settings and the backend options. A rerun with the same inputs skips; with other inputs it is
refused, naming what differs, unless ``force``. Options are checked before anything in ``OUT``
is touched. Backend options are the adapter's training options updated by ``backend_opts``; the
tap of the store, of the adapter and of the decode must agree. LoRA is merged into float32
weights only; in bfloat16/float16 it stays unmerged (merging would round the adapter away).
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from . import record
from .fileio import file_sha256, model_identity, read_json, write_atomic
from .lock import output_lock
from .manifest import read_manifest
from .models import (BACKENDS, check_adapter_base, check_backend_options, check_tap,
                     concrete_backend, load_for_decoding, model_directory,
                     training_options)
from .parallel import barrier, check_out, dist_info, progress, resolve_device
from .store import Store, StoreError, fingerprint

log = logging.getLogger("lalmtool")
MARKER = "decode.fingerprint"


def decode(feats: str, model: str, out: str, adapter: str | None = None,
           backend: str = "whisper", beam: int = 1, batch_size: int = 16,
           max_new_tokens: int | None = None, manifest: str | None = None,
           set_name: str | None = None, device: str = "cpu", force: bool = False,
           backend_opts: dict | None = None, label: str | None = None,
           too_long: str = "fail", chunk: int = 0, min_tokens_per_s: float = 0.0) -> dict:
    """Decodes every utterance of the store ``feats``; returns decode.json's content.

    ``backend_opts`` (prompt, task, language, ...) update those the adapter was trained with.
    ``label`` names the condition in reports (default: the store's compression, e.g.
    ``uniform-mean-k3``); it is not part of the fingerprint, so relabelling decodes nothing.
    ``adapter_condition`` records the condition the adapter was trained on when it differs.

    ``max_new_tokens`` None sizes each utterance's cap from its duration (``auto_cap``). Before
    anything is decoded, each utterance is checked against the decoder's positions (Whisper:
    448 target tokens; a decoder-only LLM: ``max_position_embeddings`` for prompt, audio and
    text), counting ~``SPEECH_TOKENS_PER_S`` text tokens per second when the cap is automatic:
    one that cannot fit is refused, naming what would (``too_long="fail"``), or decoded
    ``CHUNK_SECONDS`` at a time (``"chunk"``). ``chunk`` N > 0 decodes every utterance N stored
    rows at a time (1500: one 30 s window of Whisper frames; 1500/k pooled by k) and joins the
    pieces' texts. ``min_tokens_per_s`` R > 0: a length-aware end, no end token before
    R x (a piece's seconds) new tokens (``EndNotBefore``; for decoders that stop early on long
    inputs); 0, the default: off.
    """
    job = plan(feats, model, out, adapter, backend, beam, batch_size, max_new_tokens, manifest,
               set_name, device, backend_opts, label, too_long, chunk, min_tokens_per_s)
    if force or _fingerprint_of(job.info_path, job.hyp_path) != job.fp:
        check(job)  # before OUT is touched (a finished rerun skips it: it imports the backend)
    rank, world = dist_info()
    with output_lock(out):
        finished = _finished(job, force, rank)
        if finished is not None:
            return finished
        run(job, force, rank, world)
        barrier(world)
        return merge(job) if rank == 0 else {}


@dataclass
class Job:
    """One decode: its inputs resolved, settings checked and fingerprinted (``plan``)."""

    feats: str
    model: str
    model_dir: str
    out: str
    adapter: str | None
    backend: str
    opts: dict
    store: Store
    manifest: str | None
    beam: int
    batch_size: int
    max_new_tokens: int | None
    too_long: str
    chunk: int
    min_tokens_per_s: float
    device: str
    set_name: str | None
    method: str
    params: dict
    label: str
    default_label: str
    inputs: dict
    fp: str

    @property
    def info_path(self) -> str:
        return os.path.join(self.out, "decode.json")

    @property
    def hyp_path(self) -> str:
        return os.path.join(self.out, "hyp.jsonl")

    def load(self):
        return load_for_decoding(self.backend, self.model, self.model_dir,
                                 resolve_device(self.device), self.opts, self.adapter)

    def pieces(self, be, u: str) -> list[tuple[int, int, int]]:
        return _pieces(be, self.store, u, self.chunk, self.max_new_tokens, self.too_long,
                       self.model, self.params)


def plan(feats: str, model: str, out: str, adapter: str | None, backend: str, beam: int,
         batch_size: int, max_new_tokens: int | None, manifest: str | None,
         set_name: str | None, device: str, backend_opts: dict | None, label: str | None,
         too_long: str, chunk: int, min_tokens_per_s: float = 0.0) -> Job:
    """The decode's settings checked, its inputs resolved and fingerprinted; nothing loaded."""
    chunk, backend_opts = take_chunk(chunk, backend_opts)
    for name, value in (("beam", beam), ("batch_size", batch_size),
                        ("max_new_tokens", 1 if max_new_tokens is None else max_new_tokens),
                        ("chunk", chunk)):
        least = 0 if name == "chunk" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            option = "--" + name.replace("_", "-")
            raise ValueError(f"{option} must be a whole number >= {least}, not {value!r}")
    if not (isinstance(min_tokens_per_s, (int, float)) and not isinstance(min_tokens_per_s, bool)
            and math.isfinite(min_tokens_per_s) and min_tokens_per_s >= 0):
        raise ValueError(f"--min-tokens-per-s must be a number >= 0, not {min_tokens_per_s!r}")
    if too_long not in ("fail", "chunk"):
        raise ValueError(f"--too-long must be fail or chunk, not {too_long!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)}")
    backend = concrete_backend(backend, model)
    check_out(out, feats)  # hypotheses never go into the store
    store = _feature_store(feats)
    _check_pooler(store, adapter)
    model_dir = model_directory(model)
    opts = {**training_options(adapter, backend), **(backend_opts or {})}
    method, params, default_label = store.meta.condition()
    inputs = {"feats": store.fingerprint, "model": _content_id(model_dir),
              "adapter": _content_id(adapter) if adapter else None,
              "manifest": file_sha256(manifest) if manifest else None, "beam": beam,
              "max_new_tokens": max_new_tokens or "auto", "backend": backend,
              "backend_opts": opts}
    if too_long != "fail":
        inputs["too_long"] = too_long
    if min_tokens_per_s:  # (recorded only when on: earlier decodes match)
        inputs["min_tokens_per_s"] = float(min_tokens_per_s)
    if chunk:  # where earlier releases recorded it (a backend option), so their decodes match
        inputs["backend_opts"] = {**opts, "chunk": chunk}
    return Job(feats, model, model_dir, out, adapter, backend, opts, store, manifest, beam,
               batch_size, max_new_tokens, too_long, chunk, float(min_tokens_per_s), device,
               set_name, method, params, label or default_label, default_label, inputs,
               fingerprint(inputs))


def check(job: Job) -> None:
    """What must hold before anything in OUT is touched: the backend options, the references,
    the tap, and the adapter's base model."""
    check_backend_options(job.backend, job.opts, "from the adapter's lalmtool.json or "
                          "--backend-opt" if job.adapter else "from --backend-opt")
    if job.manifest:
        _check_references(job.store, job.manifest)
    _check_tap(job.store, job.backend, job.opts, job.adapter)
    if job.adapter:
        check_adapter_base(job.adapter, job.model, job.model_dir)


def _finished(job: Job, force: bool, rank: int) -> dict | None:
    """decode.json of a finished decode of the same inputs (its labels brought up to date), or
    None when there is work to do."""
    info = read_json(job.info_path, "use --force to decode again") \
        if os.path.exists(job.hyp_path) else None
    if info is None or info.get("fingerprint") != job.fp or force:
        return None
    log.info("%s: already decoded with these inputs, skipped", job.out)
    labels = {"condition": job.label,  # not in the fingerprint: updated in place
              "adapter_condition": _adapter_condition(job.adapter, job.default_label)}
    if rank == 0 and any(info.get(k) != v for k, v in labels.items()):
        info.update(labels)
        write_atomic(job.info_path, json.dumps(info, indent=1))
    return info


def run(job: Job, force: bool, rank: int, world: int) -> None:
    """Decodes this rank's share of the store into its part file, after what an earlier run
    left (stale hypotheses, of other inputs, are removed first)."""
    out, store = job.out, job.store
    old = _previous(out, job.fp, job.inputs, force)  # every rank checks: none waits
    mine = [u for i, ids in enumerate(store.shards.values()) if i % world == rank
            for u in ids if u in store]
    be = pieces = None
    if _outputs(out) and (force or (old or {}).get("fingerprint") != job.fp):
        # a decode is replaced: the model loads and every utterance fits, or nothing goes
        be = job.load()
        pieces = {u: job.pieces(be, u) for u in mine}
    barrier(world)  # every rank has read the old decode.json before anything is removed
    if rank == 0:
        _clear_stale(out, job.fp, job.inputs, force, old)
    barrier(world)
    part = os.path.join(out, f"hyp.part{rank}.jsonl")
    done = _read_part(part)
    todo = sorted((u for u in mine if u not in done), key=lambda u: -store.dataset(u).shape[0])
    if not todo:
        return
    try:
        be = be or job.load()
    except Exception:
        if not _outputs(out) and rank == 0:  # nothing decoded: leave OUT as it was
            os.remove(os.path.join(out, MARKER))
        raise
    pieces = {u: pieces[u] if pieces else job.pieces(be, u) for u in todo}
    _decode_into(part, be, store, pieces, _references(job.manifest), job.batch_size, job.beam,
                 show=rank == 0, min_tokens_per_s=job.min_tokens_per_s)


def merge(job: Job) -> dict:
    """Rank 0: every rank's hypotheses into hyp.jsonl and decode.json; returns the latter."""
    info = {
        "set": job.set_name or os.path.basename(os.path.normpath(job.out)),
        "method": job.method, "params": job.params, "condition": job.label,
        "feats": os.path.abspath(job.feats), "model": job.model,
        "adapter": os.path.abspath(job.adapter) if job.adapter else None,
        "lora": bool(job.adapter),
        "adapter_condition": _adapter_condition(job.adapter, job.default_label),
        "backend": job.backend, "backend_opts": job.opts, "beam": job.beam,
        "max_new_tokens": job.max_new_tokens or "auto", "too_long": job.too_long,
        "chunk": job.chunk, "min_tokens_per_s": job.min_tokens_per_s}
    return _merge_parts(job.out, job.store, info, job.fp, job.inputs)


def _references(manifest: str | None) -> dict[str, str]:
    """Utterance id → reference (the target when there is one, else the transcript)."""
    if not manifest:
        return {}
    utts, _ = read_manifest(manifest)
    return {u.id: (u.target if u.target is not None else u.text) for u in utts}


def _check_references(store: Store, manifest: str) -> None:
    """Every utterance of the store has its reference in ``manifest``."""
    refs = _references(manifest)
    missing = [u for u in store.ids if u not in refs]
    if missing:
        raise ValueError(f"{len(missing)} utterance(s) of {store.path} are not in --manifest "
                         f"{manifest} (e.g. {', '.join(map(repr, missing[:3]))}): their "
                         "hypotheses would have no reference to be scored against; pass the "
                         "manifest the store was extracted from (or leave --manifest out)")


def _decode_into(part: str, be, store: Store, plan: dict[str, list[tuple[int, int, int]]],
                 refs: dict[str, str], batch_size: int, beam: int, show: bool,
                 min_tokens_per_s: float = 0.0) -> None:
    """Appends one hyp.jsonl record per utterance of ``plan`` (id → its pieces: rows
    [start, end) and a token cap; one piece unless chunked) to ``part``, ``batch_size``
    pieces per generation call; a chunked utterance's texts are joined with a space.
    ``min_tokens_per_s``: each piece's end floor, per second of its audio (``end_floor``)."""
    import torch  # here: a finished decode's rerun imports no torch

    todo = list(plan)
    with open(part, "a", encoding="utf-8") as fh, \
            progress(total=len(todo), desc="decode", unit="utt", disable=not show) as bar:
        for b in range(0, len(todo), batch_size):
            ids = todo[b : b + batch_size]
            feats = {u: torch.from_numpy(store[u].astype(np.float32)) for u in ids}
            pieces = [(u, s, e, cap) for u in ids for s, e, cap in plan[u]]
            floors = [end_floor(min_tokens_per_s, _seconds(store, u) * (e - s) /
                                max(store.dataset(u).shape[0], 1), cap)
                      for u, s, e, cap in pieces] if min_tokens_per_s else None
            t0 = time.perf_counter()
            results = []
            for p in range(0, len(pieces), batch_size):
                group = pieces[p : p + batch_size]
                try:
                    results += be.transcribe([feats[u][s:e] for u, s, e, _ in group], beam,
                                             [cap for *_, cap in group],
                                             floors[p : p + batch_size] if floors else None)
                except (RuntimeError, ValueError) as e:  # name the batch (e.g. out of memory)
                    raise type(e)(f"decoding {', '.join(map(repr, ids))} (the longest "
                                  f"{max(e - s for _, s, e, _ in group)} audio positions; lower "
                                  "--batch-size or compress more if out of memory): "
                                  f"{e}") from e
            per_utt = (time.perf_counter() - t0) / len(ids)
            for u in ids:
                mine = [r for (v, *_), r in zip(pieces, results) if v == u]
                f = feats[u]
                rec = {"id": u, "hyp": " ".join(t for t, _ in mine if t),
                       "tokens": be.num_audio_tokens(f),
                       "duration": float(store.attrs(u).get("duration", 0.0)),
                       "seconds": per_utt}
                positions = be.prompt_positions(f.shape[0])
                if positions is not None:
                    rec["positions"] = positions
                if len(mine) > 1:
                    rec["chunks"] = len(mine)
                if any(cut for _, cut in mine):
                    rec["cut"] = True  # stopped at its token cap: incomplete, or a runaway
                if u in refs:
                    rec["ref"] = refs[u]
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            bar.update(len(ids))


def _merge_parts(out: str, store: Store, info: dict, fp: str, inputs: dict) -> dict:
    """Rank 0: every rank's part → hyp.jsonl and decode.json (``write_decode``); removes the
    parts. Returns decode.json's content."""
    records = {}
    for p in sorted(glob.glob(os.path.join(out, "hyp.part*.jsonl"))):
        records.update(_read_part(p))
    info = write_decode(out, store, [records[u] for u in sorted(records)],
                        {**info, "fingerprint": fp, "inputs": inputs})
    for p in glob.glob(os.path.join(out, "hyp.part*.jsonl")):
        os.remove(p)
    return info


def write_decode(out: str, store: Store, rows: list[dict], info: dict) -> dict:
    """OUT/hyp.jsonl (``rows``: id, hyp, tokens, duration, seconds, [ref, cut, ...]) and
    OUT/decode.json (``info`` with the set's totals and rates), as score and report read them;
    for ``decode`` and for other decoders (``ctc decode``). Returns decode.json's content."""
    audio_s = sum(r["duration"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    secs = sum(r["seconds"] for r in rows)
    src_rate = store.meta.source_frame_rate
    info = {
        **info, "utterances": len(rows), "audio_seconds": audio_s, "audio_tokens": tokens,
        "tokens_per_s": tokens / audio_s if audio_s else None, "source_frame_rate": src_rate,
        "compression_ratio": src_rate * audio_s / tokens if tokens else None,
        "max_audio_tokens": max((r["tokens"] for r in rows), default=0),
        "max_positions": max((r["positions"] for r in rows if "positions" in r), default=None),
        "decode_seconds": secs, "utt_per_s": len(rows) / secs if secs else None,
        "cut": sorted(r["id"] for r in rows if r.get("cut")),
        "peak_rss_mb": _peak_rss_mb(),
    }
    if info["cut"]:
        log.warning("%s: %d hypothesis(es) stopped at their token cap, possibly incomplete or "
                    "repeating (\"cut\": true in hyp.jsonl): %s%s", out, len(info["cut"]),
                    ", ".join(info["cut"][:5]), " ..." if len(info["cut"]) > 5 else "")
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "hyp.jsonl"),
                 "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_atomic(os.path.join(out, "decode.json"), json.dumps(info, indent=1))
    return info


#: Decoding with the cap sized automatically: text tokens per second of audio assumed when
#: checking that a transcript fits the decoder (read English: ~150 words, ~3 tokens per
#: second), and the cap itself: AUTO_BASE + AUTO_TOKENS_PER_S per second (ample for fast
#: speech; it only bounds a runaway).
SPEECH_TOKENS_PER_S = 3.0
AUTO_TOKENS_PER_S, AUTO_BASE = 8.0, 16
#: The chunk length of ``too_long="chunk"``: one encoder window.
CHUNK_SECONDS = 30.0


def end_floor(min_tokens_per_s: float, seconds: float, cap: int) -> int:
    """New tokens before which a piece of ``seconds`` may not end (below its cap)."""
    return min(int(min_tokens_per_s * seconds), cap - 1)


def auto_cap(seconds: float) -> int:
    """The new-token cap of an utterance of ``seconds`` when --max-new-tokens is not given."""
    return AUTO_BASE + math.ceil(AUTO_TOKENS_PER_S * seconds)


def take_chunk(chunk: int, backend_opts: dict | None) -> tuple[int, dict | None]:
    """``chunk``, or the same given the old way (``--backend-opt chunk=N``: said to be
    deprecated), and the backend options without it."""
    if not backend_opts or "chunk" not in backend_opts:
        return chunk, backend_opts
    opts = dict(backend_opts)
    old = opts.pop("chunk")
    try:
        old = int(old)
    except (TypeError, ValueError):
        raise ValueError(f"--chunk must be a whole number >= 0, not {old!r}") from None
    if chunk and old != chunk:
        raise ValueError(f"--chunk {chunk} and --backend-opt chunk={old} disagree: give --chunk")
    log.warning("--backend-opt chunk=%s is now --chunk %s (a decode option); the old spelling "
                "goes in a future release", old, old)
    return old, opts or None


def _pieces(be, store: Store, u: str, chunk: int, max_new_tokens: int | None, too_long: str,
            model: str, params: dict) -> list[tuple[int, int, int]]:
    """How utterance ``u`` of ``store`` is decoded (``plan_pieces``)."""
    rows = int(store.dataset(u).shape[0])
    return plan_pieces(be, rows, _seconds(store, u), chunk, max_new_tokens, too_long,
                       model, f"utterance {u!r} of {store.path}",
                       params.get("k", 1) if "k" in params or store.kind == "feats" else None)


def _seconds(store: Store, u: str) -> float:
    """Seconds of audio of utterance ``u``: its duration, else its rows at the store's rate."""
    return float(store.attrs(u).get("duration", 0.0)) or \
        int(store.dataset(u).shape[0]) / store.meta.frame_rate


def plan_pieces(be, rows: int, seconds: float, chunk: int, max_new_tokens: int | None,
                too_long: str, model: str, what: str,
                uniform_k: int | None = None) -> list[tuple[int, int, int]]:
    """How ``rows`` feature rows covering ``seconds`` of audio are decoded: (start row, end row,
    new-token cap) per piece; one piece unless ``chunk`` (rows per piece) or ``too_long="chunk"``
    cuts them. Refuses (before anything is decoded) what does not fit the decoder, naming
    ``what`` and what would fit (``uniform_k``: the rows are frames pooled by this k, so the
    fitting compression is named as a k). Pieces that do not fit either are named as pieces,
    and cutting is not suggested again."""
    cut = None  # the pieces already used, as a refusal names them
    if chunk:
        cut = f"pieces of {chunk} audio rows (~{chunk * seconds / max(rows, 1):.0f} s"
    elif too_long == "chunk" and _problem(be, rows, seconds, max_new_tokens):
        chunk = max(1, round(CHUNK_SECONDS * rows / seconds))
        cut = f"{CHUNK_SECONDS:g} s pieces (--too-long chunk"
    spans = [(s, min(s + chunk, rows)) for s in range(0, max(rows, 1), chunk)] if chunk \
        else [(0, rows)]
    pieces = []
    for i, (s, e) in enumerate(spans):
        part_s = seconds * (e - s) / max(rows, 1)
        problem = _problem(be, e - s, part_s, max_new_tokens)
        if problem:
            subject = what if len(spans) == 1 else (
                f"{what}, piece {i + 1} of {len(spans)} ({seconds * s / rows:.0f}-"
                f"{seconds * e / rows:.0f} s)")
            if cut:
                cut += f"; at {seconds:.0f} s it is one piece)" if len(spans) == 1 else ")"
            raise ValueError(_too_long_message(be, subject, e - s, part_s, max_new_tokens,
                                               model, uniform_k, problem, cut))
        room = be.new_token_room(e - s)
        cap = max_new_tokens or auto_cap(part_s)
        pieces.append((s, e, cap if room is None else min(cap, room)))
    return pieces


def _peak_rss_mb() -> float:
    """This process's peak resident memory (MiB): the decode's, model loading included."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


def _expected_tokens(seconds: float) -> int:
    """New tokens (the end token included) a transcript of ``seconds`` of speech needs."""
    return math.ceil(SPEECH_TOKENS_PER_S * seconds) + 1


def _problem(be, rows: int, seconds: float, max_new_tokens: int | None) -> int | None:
    """The new tokens that do not fit after the prompt with ``rows`` audio rows, or None."""
    room = be.new_token_room(rows)
    need = max_new_tokens or _expected_tokens(seconds)
    return None if room is None or need <= room else need - room


def _too_long_message(be, subject: str, rows: int, seconds: float, max_new_tokens: int | None,
                      model: str, uniform_k: int | None, over: int,
                      cut: str | None = None) -> str:
    """Why ``subject`` (an utterance, or a piece of one) does not fit the decoder, and what
    would; ``cut``: the pieces it was already cut into (then cutting is not suggested)."""
    what = (f"up to {max_new_tokens}" if max_new_tokens else
            f"~{_expected_tokens(seconds)} (its {seconds:.0f} s at ~{SPEECH_TOKENS_PER_S:g} "
            "tokens per second of speech)")
    chunked = f"decode it {CHUNK_SECONDS:g} s at a time (--too-long chunk)"
    either = f"{cut} do not fit either" if cut else ""
    limit = be.position_limit()
    if limit is None:  # Whisper: the text alone is bounded
        room = be.new_token_room(rows)
        if max_new_tokens:
            return (f"--max-new-tokens {max_new_tokens} is more than the {room} tokens that "
                    f"{model}'s decoder holds after its prompt; lower it, or leave it out (the "
                    "cap is then sized from each utterance's duration)")
        how = f"{either}: give --chunk N with a smaller N" if cut else \
            f"{chunked}, or --chunk N"
        return (f"{subject}: its transcript needs {what} new tokens, "
                f"more than the {room} that {model}'s decoder holds after its prompt "
                "(max_target_positions); compression does not change that: "
                f"{how} (N audio positions per chunk: 1500 per "
                "30 s of frames, 1500/k pooled by k)")
    needed = be.prompt_positions(rows) + (max_new_tokens or _expected_tokens(seconds))
    audio = be.audio_positions(rows)
    room = audio - over  # audio positions that would fit
    if room <= 0:
        hint = "lower --max-new-tokens: the prompt and the new tokens alone exceed it" \
            if max_new_tokens else (f"{either}: the prompt and the new tokens of one piece "
                                    "alone exceed it" if cut else chunked)
    else:
        factor = math.ceil(audio / room)
        how = ""
        if uniform_k is not None:  # frames, or uniformly pooled by k
            how = f" (uniform pooling of the frames by k={factor * int(uniform_k)})"
        hint = f"{either}: {factor}x fewer audio tokens would fit{how}" if cut else \
            f"{factor}x fewer audio tokens would fit{how}, or {chunked}"
    return (f"{subject} needs {needed} positions (prompt + {audio} audio "
            f"tokens + {what} new tokens), more than the {limit} that {model}'s decoder holds "
            f"(max_position_embeddings); {hint}")


def _feature_store(feats: str) -> Store:
    """The store to decode: frame-level or pooled features, not segment boundaries."""
    store = Store(feats)
    if store.kind == "seg":
        source = store.meta.get("source", "<the frame store>")
        raise StoreError(f"{feats} is a boundary store (from `lalmtool segment`): it holds "
                         f"segment starts, not features. Pool it first: lalmtool pool --feats "
                         f"{source} --segments {feats} --out <pooled store>, then decode that")
    return store


def _content_id(path: str):
    """What identifies a checkpoint or adapter directory by content, not by its name."""
    ident = model_identity(path)
    return ident.get("sha256", ident)


def _fingerprint_of(info_path: str, hyp_path: str) -> str | None:
    """The fingerprint of the decode finished in OUT, if any (read without the lock: only a
    shortcut; the decision is taken again under it)."""
    try:
        with open(info_path, encoding="utf-8") as fh:
            return json.load(fh).get("fingerprint") if os.path.exists(hyp_path) else None
    except (OSError, ValueError, AttributeError):
        return None


def _check_tap(store: Store, backend: str, opts: dict, adapter: str | None) -> None:
    """The tap the store was extracted at, the adapter was trained on and the decode uses agree."""
    taps = {"decode": opts.get("tap")}
    if adapter:
        taps["adapter"] = training_options(adapter, backend).get("tap")
    check_tap(store, backend, taps, "decode a store extracted at the adapter's tap, or give "
                                    "the matching --backend-opt tap=...")


def _check_pooler(store: Store, adapter: str | None) -> None:
    """An adapter trained with a learnt pooler reads the stores that pooler wrote, only."""
    from .pooler import has_pooler, weights_identity

    if has_pooler(adapter) and \
            (store.meta.get("pooler") or {}).get("identity") != weights_identity(adapter):
        raise ValueError(
            f"--adapter {adapter} was trained with its own learnt pooler and {store.path} was "
            f"not pooled by it: write this set's store with `lalmtool pool --reduce learnt "
            f"--pooler {adapter} --feats FRAMES --segments BOUNDARIES --out DIR` and decode "
            "that")


def _adapter_condition(adapter: str | None, condition: str) -> str | None:
    """The condition the adapter was trained on when it is not ``condition`` (e.g. a frame-level
    adapter decoding compressed features: not re-aligned), from its record."""
    from .trained import read

    trained_on = ((read(adapter) or {}).get("trained_on") or {}).get("condition")
    return trained_on if trained_on != condition else None


#: What ``score`` writes beside hyp.jsonl: removed with the hypotheses they scored.
SCORES = ("results.json", "result.txt", "per_utt.jsonl", "alignments.txt")


def _outputs(out: str) -> list[str]:
    """The decode's files in ``out`` and the scores made of them."""
    return glob.glob(os.path.join(out, "hyp.part*.jsonl")) + [
        p for p in (os.path.join(out, name) for name in ("hyp.jsonl", "decode.json", *SCORES))
        if os.path.exists(p)]


def _previous(out: str, fp: str, inputs: dict, force: bool) -> dict | None:
    """The inputs recorded in ``MARKER`` by the last decode into ``out``; refuses to replace a
    decode (finished or partial) made with other inputs unless ``force``."""
    marker = os.path.join(out, MARKER)
    old = None
    if os.path.exists(marker):
        text = open(marker, encoding="utf-8").read()
        try:
            old = json.loads(text)
        except json.JSONDecodeError:
            old = {"fingerprint": text.strip()}  # written by an older version: no inputs
    if _outputs(out) and not force and (old or {}).get("fingerprint") != fp:
        raise StoreError(record.refusal(out, "a decode", _differences((old or {}).get("inputs"),
                                                                      inputs)))
    return old


def _clear_stale(out: str, fp: str, inputs: dict, force: bool, old: dict | None) -> None:
    """Removes hypotheses made with other inputs (or all, with ``force``); records the inputs."""
    if force or (old or {}).get("fingerprint") != fp:
        for p in _outputs(out):
            os.remove(p)
    write_atomic(os.path.join(out, MARKER), json.dumps({"fingerprint": fp, "inputs": inputs},
                                                       indent=1))


#: decode's inputs that are recorded by content (hashes), said in words when they differ
_INPUT_WORDS = {"feats": "the store differs", "model": "its weights differ",
                "adapter": "its weights differ", "manifest": "its content differs"}


def _differences(old: dict | None, new: dict) -> list[str]:
    """Which inputs differ, e.g. ``--adapter: its weights differ``, ``--beam: 1 there, 4 now``."""
    if old is None:
        return ["not recorded: made by an older lalmtool"]
    return record.differences({"inputs": old}, {"inputs": new}, labels=_INPUT_WORDS) or [
        "the same inputs, recorded differently"]


def _read_part(path: str) -> dict[str, dict]:
    """Complete lines of a partial hypothesis file (a line cut by a kill is dropped)."""
    out = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.endswith("\n"):
                    rec = json.loads(line)
                    out[rec["id"]] = rec
        with open(path, "w", encoding="utf-8") as fh:  # drop a cut last line before appending
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out.values())
    return out
