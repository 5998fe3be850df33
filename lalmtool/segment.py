"""Stage 2, ``lalmtool segment``: encoder frames → segment boundaries (one function per method).

Every compressor is a set of segment boundaries plus a reducer (``pool.py``). Boundaries are
the int32 start frames of the segments: the first is 0, they increase strictly, all are < T.
A boundary after frame t (a new segment starting at t + 1) comes from a peak of the
dissimilarity curve ``d_t = 1 - cos(z_t, z_{t+1})``, t = 0 .. T-2.
"""
from __future__ import annotations

import functools
import logging
import math
import os

import numpy as np

from .methods import METHODS, THRESHOLD_METHODS
from .parallel import check_out, each_utterance, for_utterance, write_stage
from .store import Store, StoreError, fingerprint

log = logging.getLogger("lalmtool")
STAGE_VERSION = 1


def dissimilarity(z: np.ndarray) -> np.ndarray:
    """``1 - cos(z_t, z_{t+1})`` for t = 0 .. T-2 (all-zero frames count as orthogonal)."""
    if z.ndim != 2:
        raise ValueError(f"features must be [T, D], got shape {z.shape}")
    import torch  # here, not at the top: a rerun of a finished stage imports neither

    from . import compress

    return compress.dissimilarity(torch.from_numpy(np.ascontiguousarray(z))).numpy()


def _detect(z: np.ndarray, method: str, k=None, threshold=None) -> np.ndarray:
    """int32 segment starts of ``z`` by ``lalmtool.compress`` (the one implementation)."""
    import torch

    from . import compress

    d = torch.from_numpy(dissimilarity(z))
    return compress.utterance_starts(d, len(z), method, k, threshold).numpy().astype(np.int32)


def peaks(z: np.ndarray) -> np.ndarray:
    """The paper's detector: a boundary wherever d_t is a strict local maximum."""
    return _detect(z, "peaks")


def scpc_peakiness(d: np.ndarray) -> np.ndarray:
    """SCPC's peakiness of each d_t (``lalmtool.compress.scpc_peakiness``)."""
    import torch

    from . import compress

    return compress.scpc_peakiness(torch.from_numpy(np.ascontiguousarray(d))).numpy()


def scpc(z: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Segmental CPC's detector: a boundary wherever the peakiness of d_t exceeds ``threshold``."""
    return _detect(z, "scpc", threshold=threshold)


def prominence(z: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """``scipy.signal.find_peaks(d, prominence=threshold)``: peaks at least that prominent."""
    return _detect(z, "prominence", threshold=threshold)


def uniform(z: np.ndarray, k: int) -> np.ndarray:
    """A boundary every ``k`` frames; the last segment holds the T mod k remaining frames."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return np.arange(0, len(z), k, dtype=np.int32)


def boundaries(z: np.ndarray, method: str, k: int | None = None,
               threshold: float | None = None) -> np.ndarray:
    """The detector ``method`` (``lalmtool.methods.METHODS``) with its parameter."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(METHODS)}")
    if method == "uniform":
        return uniform(z, int(k) if k else 0)
    return _detect(z, method, threshold=threshold or 0.0)


def threshold_for_rate(store: Store, method: str, target_rate: float) -> float:
    """The threshold of ``method`` whose token rate over the whole set is closest to the target
    (``lalmtool.compress.threshold_for_rate`` over every utterance's peak scores)."""
    import torch

    from . import compress

    scores, seconds = [], 0.0
    for utt, z, attrs in store.items():
        d = for_utterance(utt, dissimilarity, z)
        scores.append(compress.peak_scores(torch.from_numpy(d), method))
        seconds += duration(store, attrs, z)
    return compress.threshold_for_rate(scores, seconds, target_rate, method)


def segment(feats: str, method: str, out: str, k: int | None = None,
            threshold: float | None = None, target_rate: float | None = None, nj: int = 1,
            force: bool = False, on_error: str = "fail") -> dict:
    """Writes the boundaries of every utterance in the feature store ``feats`` to ``out``.

    Options are checked before anything is written, so a corrected command is accepted.
    """
    check_options(method, k, threshold, target_rate, nj)
    check_out(out, feats)
    src = Store(feats)
    if src.kind == "seg":
        raise StoreError(f"{feats} is a boundary store; give --feats a feature store "
                         "(from `lalmtool extract` or `pool`)")
    rate = src.meta.frame_rate
    if target_rate is not None:
        if method == "uniform":
            if target_rate > rate:
                raise ValueError(f"--target-rate {target_rate:g} cannot be reached: {feats} "
                                 f"has {rate:g} frames/s, the most uniform can keep (--k 1)")
            k = max(1, int(round(rate / target_rate)))
        else:
            threshold = threshold_for_rate(src, method, target_rate)
    params = {"k": k} if method == "uniform" else (
        {"threshold": threshold or 0.0} if method in THRESHOLD_METHODS else {})
    if target_rate is not None:
        params["target_rate"] = target_rate
    fp = fingerprint({"stage": "segment", "version": STAGE_VERSION, "source": src.fingerprint,
                      "method": method, "params": params})
    meta = {"stage": "segment", "method": method, "params": params, "frame_rate": rate,
            "source": os.path.abspath(feats), "source_fingerprint": src.fingerprint,
            "source_meta": src.meta}
    shards = {name.replace("feats.", "seg.", 1): [u for u in ids if u in src]
              for name, ids in src.shards.items()}
    factory = functools.partial(_worker, feats, method, k, threshold, on_error)
    return write_stage(out, "seg", fp, meta, shards, factory, rate, nj, force,
                       f"segment {method}")


def check_options(method: str, k, threshold, target_rate, nj: int = 1) -> None:
    """ValueError for options out of range, missing, or ignored by ``method``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(METHODS)}")
    if nj < 1:
        raise ValueError(f"--nj must be >= 1, got {nj}")
    if k is not None and method != "uniform":
        raise ValueError(f"--k is the segment length of uniform; {method} does not use it")
    if threshold is not None and method not in THRESHOLD_METHODS:
        raise ValueError(f"--threshold is for {' and '.join(THRESHOLD_METHODS)}; "
                         f"{method} does not use it")
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"--threshold must be a finite number >= 0, got {threshold}")
    if target_rate is not None:
        if not (math.isfinite(target_rate) and target_rate > 0):
            raise ValueError(f"--target-rate must be a finite number of tokens/s > 0, "
                             f"got {target_rate}")
        if method == "peaks":
            raise ValueError(f"--target-rate needs a method with a threshold "
                             f"({', '.join(THRESHOLD_METHODS)}) or uniform; peaks has none")
        if k is not None or threshold is not None:
            raise ValueError("give --target-rate or --k/--threshold, not both "
                             "(the target rate sets them)")
    if method == "uniform" and target_rate is None:
        if k is None:
            raise ValueError("method uniform needs --k (or --target-rate)")
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"--k must be a whole number of frames >= 1, got {k}")


def duration(store: Store, attrs: dict, z: np.ndarray) -> float:
    """Seconds of an utterance: its recorded duration, else its frames at the store's rate."""
    return float(attrs.get("duration", len(z) / store.meta.frame_rate))


def _worker(feats: str, method: str, k, threshold, on_error: str):
    src = Store(feats)

    def outputs(batch: list[str]):
        for utt in batch:
            z = src[utt]
            try:
                b = for_utterance(utt, boundaries, z, method, k, threshold)
            except ValueError as e:
                if on_error == "fail":
                    raise
                yield utt, None, str(e)
                continue
            attrs = src.attrs(utt)
            yield utt, b, len(z), duration(src, attrs, z), attrs

    return each_utterance(outputs)
