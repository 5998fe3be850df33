"""Stage 1, ``lalmtool extract``: audio → encoder frames, cached once in a feature store."""
from __future__ import annotations

import functools
import logging
import os
import time

import numpy as np

from .audio import load_audio
from .manifest import Utterance, load_manifest
from .models import load_backend
from .models.base import DTYPES
from .parallel import run_sharded
from .store import ShardResult, fingerprint, plan_shards

log = logging.getLogger("lalmtool")
STAGE_VERSION = 1


def extract(manifest: str, model: str, out: str, backend: str = "whisper", nj: int = 1,
            batch_size: int = 8, on_error: str = "fail", shard_size: int = 100,
            force: bool = False, device: str = "cpu", dtype: str = "float32",
            trim: bool = True, backend_opts: dict | None = None) -> dict:
    """Encodes every utterance of ``manifest`` with ``model`` into the store ``out``.

    Returns a summary: utterances, audio hours, frames, wall seconds, real-time factor, skipped.
    """
    utts, skipped = load_manifest(manifest, on_error=on_error)
    opts = {"device": device, "dtype": DTYPES[dtype], "trim": trim, **(backend_opts or {})}
    enc = load_backend(backend, model, **opts)
    fp = fingerprint({
        "stage": "extract", "version": STAGE_VERSION, "encoder": enc.identity(), "dtype": dtype,
        "backend_opts": backend_opts or {},
        "stored": "float16", "shard_size": shard_size,
        "inputs": [(u.id, os.path.abspath(u.audio), os.path.getsize(u.audio)) for u in utts],
    })
    meta = {"stage": "extract", "frame_rate": enc.frame_rate, "backend": backend,
            "model": model, "manifest": os.path.abspath(manifest), "trim": trim,
            "compute_dtype": dtype, "source_frame_rate": enc.frame_rate,
            "backend_opts": backend_opts or {}}
    by_id = {u.id: u for u in utts}
    if nj <= 1:
        factory = functools.partial(_bound_worker, enc, by_id, batch_size, on_error)
    else:
        factory = functools.partial(_new_worker, backend, model, opts, by_id, batch_size, on_error)
    start = time.perf_counter()
    stats, skipped = run_sharded(out, "feats", fp, meta, plan_shards(list(by_id), shard_size, "feats"),
                                 factory, nj=nj, force=force, desc="extract",
                                 skipped_before=skipped)
    wall = time.perf_counter() - start
    audio_s = stats.get("audio_seconds", 0.0)
    summary = {"store": out, "utterances": stats.get("utterances", 0),
               "audio_hours": audio_s / 3600, "frames": stats.get("frames", 0),
               "seconds": wall, "rtf": wall / audio_s if audio_s else None,
               "skipped": len(skipped)}
    log.info("extract: %s", summary)
    return summary


def _new_worker(backend, model, opts, by_id, batch_size, on_error):
    return _bound_worker(load_backend(backend, model, **opts), by_id, batch_size, on_error)


def _bound_worker(enc, by_id: dict[str, Utterance], batch_size: int, on_error: str):
    return functools.partial(_encode_shard, enc, by_id, batch_size, on_error)


def _encode_shard(enc, by_id: dict[str, Utterance], batch_size: int, on_error: str,
                  name: str, ids: list[str], tick) -> tuple[ShardResult, dict]:
    result, waves = ShardResult(), {}
    for utt in ids:
        try:
            waves[utt] = load_audio(by_id[utt].audio, enc.sample_rate)
        except Exception as e:
            if on_error == "fail":
                raise RuntimeError(f"utterance {utt!r}: {e}") from e
            result.skipped.append({"id": utt, "error": str(e)})
            tick(1)
    order = sorted(waves, key=lambda u: len(waves[u]))  # similar lengths batch together
    frames = 0
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        for utt, h in zip(batch, enc.encode([waves[u] for u in batch])):
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
