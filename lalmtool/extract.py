"""Stage 1, ``lalmtool extract``: audio → encoder frames, cached once in a feature store.

The encoder is loaded only where it runs: in this process with ``nj=1``, in each of the
``nj`` worker processes otherwise (on one GPU that is ``nj`` copies of the model), and not at
all when the store is already complete for the same inputs and settings. ``batch_size`` is the
number of ≤30 s windows per encoder forward. Under ``torchrun`` ``device="cuda"`` is the
rank's own GPU (``cuda:LOCAL_RANK``).

Packing (``pack`` seconds, e.g. 30): consecutive utterances of the manifest (within a shard;
with ``pack_group``, only those that share that manifest field: a speaker, a recording) are
joined as audio, their own leading and trailing silence kept and nothing added between them,
into windows of at most ``pack`` seconds; each window is encoded once, and each utterance's
rows are cut out of it by time (rows ``round(start * rate)`` to ``round(end * rate)``; at
least one each). An utterance longer than ``pack`` is encoded on its own. A 30 s encoder window
then holds ten 3 s utterances instead of one, and the features are those of continuous speech
(what a long recording's windows hold). The rows' window and start are recorded per utterance
(``pack``, ``pack_start``); the pack settings are part of the store's fingerprint. Segment,
pool, finetune and decode read a packed store as any other.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time

import numpy as np

from .audio import audio_identity, load_audio
from .lock import output_lock
from .manifest import Utterance, field_values, load_manifest
from .models import (BACKENDS, backend_options, check_backend_options, concrete_backend,
                     load_backend)
from .fileio import model_identity
from .parallel import resolve_device, run_sharded
from .store import SKIPPED_FILE, ShardResult, StoreError, StoreWriter, fingerprint, plan_shards

log = logging.getLogger("lalmtool")
STAGE_VERSION = 1
# Backend constructor arguments that extract sets from its own options, not from --backend-opt.
_OWN_ARGS = {"model_path", "device", "dtype", "trim"}


def extract(manifest: str, model: str, out: str, backend: str = "whisper", nj: int = 1,
            batch_size: int = 8, on_error: str = "fail", shard_size: int = 100,
            force: bool = False, device: str = "cpu", dtype: str = "float32",
            trim: bool = True, backend_opts: dict | None = None, pack: float | None = None,
            pack_group: str | None = None) -> dict:
    """Encodes every utterance of ``manifest`` with ``model`` into the store ``out``
    (``pack``: several utterances per encoder window, see the module's docstring).

    Returns a summary: utterances, audio hours, frames, wall seconds, real-time factor, skipped.
    """
    if nj < 1 or batch_size < 1 or shard_size < 1:
        raise ValueError(f"nj, batch_size and shard_size must be >= 1 (got {nj}, {batch_size}, "
                         f"{shard_size})")
    if pack is not None and not (isinstance(pack, (int, float)) and 0 < pack < float("inf")):
        raise ValueError(f"--pack must be a number of seconds > 0, not {pack!r}")
    if pack_group and pack is None:
        raise ValueError("--pack-group needs --pack (the window length in seconds)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: is a file; give a directory for the feature store")
    check_model_path(model)
    backend = concrete_backend(backend, model)
    backend_opts = dict(backend_opts or {})
    utts, skipped = load_manifest(manifest, on_error=on_error)
    by_id = {u.id: u for u in utts}
    shards = plan_shards(list(by_id), shard_size, "feats")
    fixed = {"stage": "extract", "version": STAGE_VERSION, "dtype": dtype,
             "backend_opts": backend_opts, "stored": "float16", "shard_size": shard_size,
             "inputs": _inputs(utts)}
    packing = None
    if pack is not None:  # absent otherwise: stores extracted before packing stay valid
        groups = field_values(manifest, pack_group, list(by_id), "--pack-group") \
            if pack_group else None
        packing = Packing(float(pack), groups)
        _say_spans_out_of_order(utts, manifest)
        fixed["pack"] = {"seconds": float(pack), "group": pack_group, "gap": 0.0,
                         "groups": groups}
    # What determines the store, known without loading the model: a finished store with the
    # same request is done, and a rerun returns without loading anything.
    request = fingerprint({**fixed, "backend": backend, "trim": trim,
                           "model": model_identity(_resolve(model))})
    start = time.perf_counter()
    if not force and _finished(out, request, shards):
        log.debug("%s: complete for these inputs and settings, nothing to do", out)
        return _summary(out, {}, time.perf_counter() - start, _count_skipped(out))
    # checked here: a finished store was made with valid options, and checking them imports
    # the backend's module (torch, transformers: seconds of every finished rerun)
    check_backend_opts(backend, backend_opts)
    meta = {"stage": "extract", "backend": backend, "model": model,
            "manifest": os.path.abspath(manifest), "trim": trim, "compute_dtype": dtype,
            **({"pack": {"seconds": float(pack), "group": pack_group}} if pack else {}),
            "backend_opts": backend_opts, "request": request,
            # every option of the backend, as it ran (the given ones and the defaults)
            "backend_options": dataclasses.asdict(backend_options(backend)(
                **backend_opts, dtype=dtype, trim=trim))}
    from .models.base import DTYPES  # torch: imported only when there is work to do

    opts = {"device": resolve_device(device), "dtype": DTYPES[dtype], "trim": trim,
            **backend_opts}
    factory = functools.partial(Encoder, backend, model, opts, by_id, batch_size, on_error,
                                packing)
    try:
        with output_lock(out):
            stats, skipped = run_sharded(out, "feats", None, None, shards, factory, nj=nj,
                                         force=force, desc="extract", skipped_before=skipped,
                                         head=functools.partial(_store_head, fixed, meta))
    except Exception:
        log.debug("extract failed", exc_info=True)  # -v shows where (workers' tracebacks too)
        raise
    summary = _summary(out, stats, time.perf_counter() - start, len(skipped))
    log.info("extract: %s", summary)
    return summary


class Encoder:
    """The worker: a backend loaded in the process that uses it, encoding one shard per call."""

    def __init__(self, backend: str, model: str, opts: dict, by_id: dict[str, Utterance],
                 batch_size: int, on_error: str, packing: Packing | None = None):
        self.enc = load_encoder(backend, model, opts)
        self.by_id, self.batch_size, self.on_error = by_id, batch_size, on_error
        self.packing = packing

    def __call__(self, name: str, ids: list[str], tick) -> tuple[ShardResult, dict]:
        import torch

        try:
            return _encode_shard(self.enc, self.by_id, self.batch_size, self.on_error, ids, tick,
                                 self.packing)
        except torch.cuda.OutOfMemoryError as e:  # = torch.OutOfMemoryError
            raise RuntimeError(
                f"{self.enc.device}: out of memory while encoding shard {name}. Lower "
                f"--batch-size (now {self.batch_size} windows per forward) or --nj (every "
                f"worker holds its own copy of the model on the device), or use --dtype "
                f"bfloat16; rerun to resume ({str(e).splitlines()[0]})") from e


def load_encoder(backend: str, model: str, opts: dict):
    """``load_backend`` with a clear message when the checkpoint cannot be read."""
    try:
        return load_backend(backend, model, **opts)
    except OSError as e:
        raise ValueError(f"--model {model}: cannot load it with the {backend} backend "
                         f"({str(e).splitlines()[0]}); give a checkpoint directory, an asset "
                         "name (`lalmtool assets list`) or a hub id in the local cache") from e


def check_model_path(model: str) -> None:
    """Refuses ``--model`` values that can only be a mistaken path (not a directory)."""
    what = ("give a checkpoint directory, an asset name (`lalmtool assets list`) or a hub id "
            "(org/name)")
    if os.path.isdir(model):
        return
    if os.path.exists(model):
        raise ValueError(f"--model {model}: is a file, not a model; {what}")
    if os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1:
        raise ValueError(f"--model {model}: no such directory; {what}")


def check_backend_opts(backend: str, opts: dict) -> dict:
    """``opts`` when every key is an option of ``backend`` that extract does not set itself
    (the backend registry's rule), else a clear error."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)}")
    for key in opts:
        if key in _OWN_ARGS:
            raise ValueError(f"--backend-opt {key}: set it with --{key.replace('_', '-')} "
                             "(or --no-trim) instead")
    if opts:  # without importing the backend's module (seconds of a finished rerun)
        check_backend_options(backend, opts, "from --backend-opt")
    return dict(opts)


def _inputs(utts: list[Utterance]) -> list[tuple]:
    """What the store's fingerprint records of each utterance: id, audio path, its identity,
    and for a span (``offset``) the span; each file is hashed once however many spans it has."""
    identity: dict[str, tuple[int, str]] = {}
    out = []
    for u in utts:
        if u.audio not in identity:
            identity[u.audio] = audio_identity(u.audio)
        item = (u.id, os.path.abspath(u.audio), identity[u.audio])
        out.append(item if u.offset is None else item + ((u.offset, u.duration),))
    return out


def _resolve(model: str) -> str:
    from .assets import resolve_model

    return resolve_model(model)


def _store_head(fixed: dict, meta: dict, worker: Encoder) -> tuple[str, dict]:
    """The store's fingerprint and meta, which need the loaded encoder's identity and rate."""
    enc = worker.enc
    fp = fingerprint({**fixed, "encoder": enc.identity()})
    return fp, {**meta, "frame_rate": enc.frame_rate, "source_frame_rate": enc.frame_rate}


def _finished(out: str, request: str, shards: dict[str, list[str]]) -> bool:
    """Whether ``out`` is a finished, whole store made for the same request (no model needed)."""
    try:
        writer = StoreWriter(out)
    except StoreError:
        return False
    return (writer.meta.get("request") == request and writer.shards == shards
            and os.path.exists(os.path.join(out, SKIPPED_FILE)) and not writer.pending())


def _count_skipped(out: str) -> int:
    with open(os.path.join(out, SKIPPED_FILE), encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def _summary(out: str, stats: dict, wall: float, skipped: int) -> dict:
    audio_s = stats.get("audio_seconds", 0.0)
    return {"store": out, "utterances": stats.get("utterances", 0),
            "audio_hours": audio_s / 3600, "frames": stats.get("frames", 0),
            "seconds": wall, "rtf": wall / audio_s if audio_s else None, "skipped": skipped,
            "windows": stats.get("windows", 0), "reused": not stats}


@dataclasses.dataclass
class Packing:
    """Several utterances per encoder window: at most ``seconds`` of joined audio, consecutive
    utterances only, of one group (``groups``: id → value) where groups are given."""

    seconds: float
    groups: dict | None = None

    def windows(self, ids: list[str], seconds: dict[str, float],
                encoder_window: float | None = None) -> list[list[str]]:
        """``ids`` (in the manifest's order) cut into runs that each fill one window. With
        ``encoder_window`` (seconds the encoder takes at once, when ``seconds`` exceeds it) no
        utterance joins a run where one of the encoder's window boundaries would fall inside
        it (its frames could not be cut exactly): it starts the next run."""
        runs, run, total = [], [], 0.0
        for u in ids:
            same = not run or self.groups is None or self.groups[u] == self.groups[run[-1]]
            if run and (total + seconds[u] > self.seconds or not same
                        or _straddles(total, seconds[u], encoder_window)):
                runs.append(run)
                run, total = [], 0.0
            run.append(u)
            total += seconds[u]
        return runs + ([run] if run else [])


def _say_spans_out_of_order(utts: list[Utterance], manifest: str) -> None:
    """Warns once when spans of one recording (``offset``) are not in time order in the
    manifest: packing joins them in the manifest's order, which is then not the audio's."""
    last: dict[str, float] = {}
    late = []
    for u in utts:
        if u.offset is not None:
            if u.offset < last.get(u.audio, -1.0):
                late.append(u.id)
            last[u.audio] = max(u.offset, last.get(u.audio, -1.0))
    if late:
        log.warning("extract --pack: %d utterance(s) of %s come after a later part of their own "
                    "recording (offsets out of time order, e.g. %s): packed in the manifest's "
                    "order; sort the manifest by recording and offset to pack them as the audio "
                    "runs", len(late), manifest, ", ".join(late[:3]))


def _straddles(start: float, length: float, window: float | None) -> bool:
    """Whether a multiple of ``window`` falls strictly inside [start, start + length)."""
    if not window:
        return False
    boundary = (math.floor(start / window + 1e-9) + 1) * window
    return start + length > boundary + 1e-9


def cut_rows(frames, lengths: list[int], sample_rate: int, rate: float) -> list:
    """One window's rows ``frames`` ``[T, D]`` cut into the utterances that were joined in it
    (``lengths`` in samples, in order): rows ``round(start * rate)`` to ``round(end * rate)``,
    at least one each."""
    n, total = len(lengths), len(frames)
    ends, at = [], 0
    for i, length in enumerate(lengths[:-1]):
        at += length
        end = int(round(at / sample_rate * rate))
        low = (ends[-1] if ends else 0) + 1
        ends.append(min(max(end, low), total - (n - 1 - i)))
    ends.append(total)
    starts = [0] + ends[:-1]
    return [frames[s:e] for s, e in zip(starts, ends)]


def _encode_shard(enc, by_id: dict[str, Utterance], batch_size: int, on_error: str,
                  ids: list[str], tick, packing: Packing | None = None) -> tuple[ShardResult, dict]:
    result, waves = ShardResult(), {}
    for utt in ids:
        try:
            u = by_id[utt]
            waves[utt] = load_audio(u.audio, enc.sample_rate, u.offset, u.duration)
        except Exception as e:
            if on_error == "fail":
                raise RuntimeError(f"utterance {utt!r}: {e}") from e
            result.skipped.append({"id": utt, "error": str(e)})
            tick(1)
    sr = enc.sample_rate
    if packing is None:
        runs = [[u] for u in waves]
    else:
        runs = packing.windows([u for u in ids if u in waves],
                               {u: len(w) / sr for u, w in waves.items()}, enc.window_seconds)
    joined = {tuple(run): np.concatenate([waves[u] for u in run]) for run in runs}
    order = sorted(joined, key=lambda r: len(joined[r]))  # similar lengths batch together
    frames = 0
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]  # ≥ batch_size windows, forwarded batch_size at a time
        encoded = enc.encode([joined[r] for r in batch], batch_size=batch_size)
        for run, h in zip(batch, encoded):
            parts = [h] if len(run) == 1 else cut_rows(h, [len(waves[u]) for u in run], sr,
                                                       enc.frame_rate)
            start = 0
            for utt, part in zip(run, parts):
                arr = part.numpy().astype(np.float16)
                duration = len(waves[utt]) / sr
                attrs = {"duration": duration}
                if len(run) > 1:
                    attrs.update(pack=run[0], pack_start=start / sr)
                start += len(waves[utt])
                if not np.isfinite(arr).all():
                    msg = "encoder output is not finite (NaN/Inf, or beyond float16 range)"
                    if on_error == "fail":
                        raise RuntimeError(f"utterance {utt!r}: {msg}")
                    result.skipped.append({"id": utt, "error": msg})
                    continue
                result.items.append((utt, arr, attrs))
                frames += arr.shape[0]
        tick(sum(len(r) for r in batch))
    stats = {"utterances": len(result.items), "frames": frames,
             "audio_seconds": sum(a["duration"] for _, _, a in result.items),
             "windows": len(runs)}
    return result, stats
