"""Stage 3, ``lalmtool pool``: frames + boundaries → one vector per segment.

``reduce="mean"`` averages the frames of each segment (uniform boundaries every k frames give
uniform average pooling; the last, shorter segment is the mean of the frames it has, which is
``avg_pool1d(..., ceil_mode=True)``); ``reduce="pick"`` keeps the first frame of each segment
(uniform boundaries give uniform downsampling, ``z[::k]``); ``reduce="learnt"`` applies the
pooler that ``lalmtool finetune --segments`` trained with its adapter (``--pooler ADAPTER``,
``lalmtool.pooler``).
"""
from __future__ import annotations

import functools
import os

import numpy as np

from .methods import REDUCERS
from .parallel import check_out, each_utterance, for_utterance, write_stage
from .store import Store, StoreError, fingerprint

STAGE_VERSION = 1


def check_boundaries(starts: np.ndarray, n_frames: int) -> None:
    """Raises ValueError unless ``starts`` begins at 0, increases strictly and stays < T."""
    if starts.ndim != 1 or len(starts) == 0:
        raise ValueError("boundaries must be a non-empty 1-D array")
    if starts[0] != 0 or (np.diff(starts) <= 0).any() or starts[-1] >= n_frames:
        raise ValueError(f"boundaries must start at 0, increase strictly and stay below "
                         f"T={n_frames}; got {starts[:8].tolist()}...")


def pool(z: np.ndarray, starts: np.ndarray, reduce: str = "mean",
         pooler=None) -> np.ndarray:
    """One vector per segment ``[S, D]`` (float32) from frames ``[T, D]`` and segment starts
    (``lalmtool.compress.pool_utterance``, the one implementation; ``learnt``: ``pooler``, a
    ``lalmtool.pooler.LearntPooler``)."""
    import torch  # here, not at the top: a rerun of a finished stage does not import it

    from .compress import pool_utterance

    check_boundaries(starts, len(z))
    if reduce not in REDUCERS:
        raise ValueError(f"unknown reducer {reduce!r}; choose one of {REDUCERS}")
    x = torch.from_numpy(np.ascontiguousarray(z))
    with torch.inference_mode():
        return pool_utterance(x, torch.from_numpy(starts.astype(np.int64)), reduce,
                              pooler).numpy()


def feature_store(path: str, flag: str = "--feats") -> Store:
    """The store ``path`` given as ``flag``, checked to hold features (frames from ``extract``
    or a pooled store from ``pool``), not the segment boundaries ``segment`` writes."""
    store = Store(path)
    if store.kind == "seg":
        source = store.meta.get("source", "<the frame store>")
        raise StoreError(f"{flag} {path} is a boundary store (from `lalmtool segment`): it holds "
                         f"segment starts, not features; {flag} must be a feature store (frames "
                         f"from `lalmtool extract`, or pooled features from `lalmtool pool`). "
                         f"Pool it first: lalmtool pool --feats {source} --segments {path} "
                         "--out <pooled store>")
    return store


def boundaries_of(src: Store, segments: str) -> Store:
    """The boundary store ``segments``, checked to hold boundaries of ``src``'s very features."""
    seg = Store(segments)
    if seg.kind != "seg":
        raise StoreError(f"{segments} is a {seg.kind} store, not boundaries: give --segments "
                         "a store from `lalmtool segment`")
    if seg.meta.get("source_fingerprint") != src.fingerprint:
        raise StoreError(f"{segments} was segmented from {seg.meta.get('source')}, whose "
                         f"content differs from {src.path}; rerun `lalmtool segment` on "
                         f"{src.path}.")
    return seg


def pool_store(feats: str, segments: str, reduce: str, out: str, nj: int = 1,
               force: bool = False, pooler: str | None = None) -> dict:
    """Writes the pooled features of every utterance of ``segments`` to the store ``out``
    (``reduce="learnt"``: with the pooler saved in the adapter directory ``pooler``)."""
    from . import pooler as learnt

    if reduce not in REDUCERS:
        raise ValueError(f"unknown reducer {reduce!r}; choose one of {REDUCERS}")
    if (reduce == "learnt") != bool(pooler):
        raise ValueError("--reduce learnt and --pooler ADAPTER go together: the learnt pooler "
                         "is the one `lalmtool finetune --segments` saved with its adapter")
    if nj < 1:
        raise ValueError(f"--nj must be >= 1, got {nj}")
    # not into (or around) the adapter directory of the pooler (one that holds none is
    # refused as such below)
    check_out(out, feats, segments,
              inside={"--pooler": pooler} if learnt.has_pooler(pooler) else None)
    src = feature_store(feats)
    seg = boundaries_of(src, segments)
    used = None  # the learnt pooler, by path and identity
    if pooler:  # a clear error before anything is written
        dim = learnt.load(pooler).config["dim"]
        learnt.check_boundaries(pooler, seg.meta, segments)
        _check_pooler_base(pooler, src)
        have = int(src.dataset(src.ids[0]).shape[1]) if src.ids else dim
        if have != dim:
            raise ValueError(f"--pooler {pooler} pools {dim}-dimensional frames, {feats} holds "
                             f"{have}-dimensional ones: give the features the pooler was "
                             "trained on (the same model and tap)")
        used = {"path": os.path.abspath(pooler), "identity": learnt.weights_identity(pooler)}
    rate = src.meta.frame_rate
    fp = fingerprint({"stage": "pool", "version": STAGE_VERSION, "source": src.fingerprint,
                      "segments": seg.fingerprint, "reduce": reduce,
                      **({"pooler": used["identity"]} if used else {})})
    tokens = sum(len(seg.dataset(u)) for u in seg.ids)
    seconds = sum(float(seg.attrs(u)["duration"]) for u in seg.ids)
    meta = {"stage": "pool", "method": seg.meta["method"], "params": seg.meta["params"],
            "reduce": reduce, "frame_rate": tokens / seconds if seconds else 0.0,
            "source_frame_rate": float(src.meta.get("source_frame_rate", rate)),
            "source": os.path.abspath(feats), "segments": os.path.abspath(segments),
            "source_meta": src.meta, **({"pooler": used} if used else {})}
    shards = {name.replace("seg.", "pooled.", 1): ids for name, ids in seg.shards.items()}
    shards = {name: [u for u in ids if u in seg] for name, ids in shards.items()}
    factory = functools.partial(_worker, feats, segments, reduce, pooler)
    return write_stage(out, "pooled", fp, meta, shards, factory, rate, nj, force,
                       f"pool {reduce}")


def _worker(feats: str, segments: str, reduce: str, pooler: str | None):
    from . import pooler as learnt

    src, seg = Store(feats), Store(segments)
    module = learnt.load(pooler) if pooler else None

    def outputs(batch: list[str]):
        for utt in batch:
            z, starts, attrs = src[utt], seg[utt], seg.attrs(utt)
            pooled = for_utterance(utt, pool, z, starts, reduce, module).astype(np.float16)
            yield utt, pooled, len(z), float(attrs["duration"]), attrs

    return each_utterance(outputs)


def _check_pooler_base(pooler: str, src: Store) -> None:
    """Refuses a pooler trained on another base model than the one that extracted ``src``
    (where that model is still found)."""
    from .assets import resolve_model
    from .models import check_adapter_base

    model = src.meta.extracted.get("model")
    if not model:
        return
    try:
        model_dir = resolve_model(model)
    except Exception:  # noqa: BLE001 - an asset or path that is not here any more
        return
    if os.path.isdir(model_dir):
        check_adapter_base(pooler, model, model_dir, "--pooler")
