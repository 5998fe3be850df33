"""Stage 1, ``lalmtool extract``: audio → encoder frames, cached once in a feature store.

The encoder is loaded only where it runs: in this process with ``nj=1``, in each of the
``nj`` worker processes otherwise (on one GPU that is ``nj`` copies of the model), and not at
all when the store is already complete for the same inputs and settings. ``batch_size`` is the
number of ≤30 s windows per encoder forward. Under ``torchrun`` ``device="cuda"`` is the
rank's own GPU (``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import numpy as np

from .audio import audio_identity, load_audio
from .lock import output_lock
from .manifest import Utterance, load_manifest
from .models import BACKENDS, backend_options, check_backend_options, load_backend
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
            trim: bool = True, backend_opts: dict | None = None) -> dict:
    """Encodes every utterance of ``manifest`` with ``model`` into the store ``out``.

    Returns a summary: utterances, audio hours, frames, wall seconds, real-time factor, skipped.
    """
    if nj < 1 or batch_size < 1 or shard_size < 1:
        raise ValueError(f"nj, batch_size and shard_size must be >= 1 (got {nj}, {batch_size}, "
                         f"{shard_size})")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: is a file; give a directory for the feature store")
    check_model_path(model)
    backend_opts = dict(backend_opts or {})
    utts, skipped = load_manifest(manifest, on_error=on_error)
    by_id = {u.id: u for u in utts}
    shards = plan_shards(list(by_id), shard_size, "feats")
    fixed = {"stage": "extract", "version": STAGE_VERSION, "dtype": dtype,
             "backend_opts": backend_opts, "stored": "float16", "shard_size": shard_size,
             "inputs": _inputs(utts)}
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
            "backend_opts": backend_opts, "request": request,
            # every option of the backend, as it ran (the given ones and the defaults)
            "backend_options": dataclasses.asdict(backend_options(backend)(
                **backend_opts, dtype=dtype, trim=trim))}
    from .models.base import DTYPES  # torch: imported only when there is work to do

    opts = {"device": resolve_device(device), "dtype": DTYPES[dtype], "trim": trim,
            **backend_opts}
    factory = functools.partial(Encoder, backend, model, opts, by_id, batch_size, on_error)
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
                 batch_size: int, on_error: str):
        self.enc = load_encoder(backend, model, opts)
        self.by_id, self.batch_size, self.on_error = by_id, batch_size, on_error

    def __call__(self, name: str, ids: list[str], tick) -> tuple[ShardResult, dict]:
        import torch

        try:
            return _encode_shard(self.enc, self.by_id, self.batch_size, self.on_error, ids, tick)
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
            "reused": not stats}


def _encode_shard(enc, by_id: dict[str, Utterance], batch_size: int, on_error: str,
                  ids: list[str], tick) -> tuple[ShardResult, dict]:
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
    order = sorted(waves, key=lambda u: len(waves[u]))  # similar lengths batch together
    frames = 0
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]  # ≥ batch_size windows, forwarded batch_size at a time
        for utt, h in zip(batch, enc.encode([waves[u] for u in batch], batch_size=batch_size)):
            arr = h.numpy().astype(np.float16)
            if not np.isfinite(arr).all():
                msg = "encoder output is not finite (NaN/Inf, or beyond float16 range)"
                if on_error == "fail":
                    raise RuntimeError(f"utterance {utt!r}: {msg}")
                result.skipped.append({"id": utt, "error": msg})
                continue
            duration = len(waves[utt]) / enc.sample_rate
            result.items.append((utt, arr, {"duration": duration}))
            frames += arr.shape[0]
        tick(len(batch))
    stats = {"utterances": len(result.items), "frames": frames,
             "audio_seconds": sum(a["duration"] for _, _, a in result.items)}
    return result, stats
