"""Compression of encoder frames as a Python API, in torch: the same boundaries and tokens as
``lalmtool segment`` + ``lalmtool pool`` store (they call these functions), usable inside
one's own model or training code without stores.

Input: frames ``x`` of one utterance ``[T, D]``, or a padded batch ``[B, T, D]`` with
``lengths`` (frames per utterance; frames past them are ignored). Every compressor is segment
boundaries (the int64 start frames of the segments, first 0, strictly increasing, < length)
plus a reducer: ``mean`` (average of each segment's frames: differentiable with respect to
``x``) or ``pick`` (each segment's first frame). Methods:

* ``peaks``: a boundary after frame t wherever ``d_t = 1 - cos(x_t, x_{t+1})`` is a strict
  local maximum (the paper's detector, ~1 token per 3 frames);
* ``scpc`` / ``prominence``: peaks whose SCPC peakiness exceeds, or whose ``find_peaks``
  prominence reaches, ``threshold``; the prominence search runs in scipy on the CPU (``d`` is
  T numbers), tokens stay on ``x``'s device;
* ``uniform``: every ``k`` frames (``mean``: average pooling, the last segment shorter;
  ``pick``: ``x[::k]``);
* ``target_rate`` (tokens per second, with ``frame_rate``): ``k = round(frame_rate / rate)``
  for uniform, and for scpc/prominence the threshold whose token count over the given batch is
  closest to the rate (as ``segment --target-rate`` does over a whole set; pass ``seconds``,
  the audio durations, to match a store exactly: the store counts audio seconds, not frames).

On CPU the boundaries equal the stores' bit for bit; on CUDA float rounding may move a boundary
where two neighbouring ``d_t`` differ by ~1e-7.

    >>> import torch; from lalmtool.compress import compress
    >>> out = compress(torch.randn(2, 100, 384), "peaks", lengths=torch.tensor([100, 60]))
    >>> out.tokens.shape[0], out.lengths.tolist() == [len(b) for b in out.boundaries]
    (2, True)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .methods import METHODS, REDUCERS, THRESHOLD_METHODS

log = logging.getLogger("lalmtool")


@dataclass
class Compressed:
    """``tokens`` ``[S, D]`` (or ``[B, S_max, D]``, zero-padded), ``lengths`` (tokens per
    utterance, int64 ``[B]``; ``[1]`` for one utterance), ``boundaries`` (segment starts per
    utterance) and ``params`` (``k`` or ``threshold`` as used)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    boundaries: list[torch.Tensor]
    params: dict


def dissimilarity(x: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x_t, x_{t+1})`` for t = 0 .. T-2 over the last two dimensions (``[..., T, D]``
    → ``[..., T-1]``, float32); all-zero frames count as orthogonal. Not differentiated."""
    x = x.detach().float()
    sq = (x * x).sum(-1)
    if not torch.isfinite(sq).all():
        if not torch.isfinite(x).all():
            raise ValueError("features contain NaN or Inf values")
        x = x.double()  # finite but too large for float32 squares
        sq = (x * x).sum(-1)
    dots = (x[..., :-1, :] * x[..., 1:, :]).sum(-1)
    d = 1.0 - dots / torch.sqrt(torch.clamp(sq[..., :-1] * sq[..., 1:], min=1e-24))
    return d.float()


def _starts(peak_index: torch.Tensor) -> torch.Tensor:
    """Segment starts from the indices t of peaks of d (a boundary between t and t + 1)."""
    zero = torch.zeros(1, dtype=torch.int64, device=peak_index.device)
    return torch.cat([zero, peak_index.to(torch.int64) + 1])


def peak_starts(d: torch.Tensor) -> torch.Tensor:
    """Starts where ``d`` (one utterance) has a strict local maximum."""
    inner = (d[1:-1] > d[:-2]) & (d[1:-1] > d[2:])
    return _starts(torch.nonzero(inner).flatten() + 1)


def scpc_peakiness(d: torch.Tensor) -> torch.Tensor:
    """SCPC's peakiness of each d_t: max of the first- and second-order peak heights
    (``p1_t = min(max(d_t - d_{t-1}, 0), max(d_t - d_{t+1}, 0))``, ``p2_t`` the same with
    t±2; both 0 where a neighbour falls outside the curve)."""
    p = torch.zeros_like(d)
    if len(d) >= 3:
        p[1:-1] = torch.minimum((d[1:-1] - d[:-2]).clamp(min=0), (d[1:-1] - d[2:]).clamp(min=0))
    if len(d) >= 5:
        p2 = torch.minimum((d[2:-2] - d[:-4]).clamp(min=0), (d[2:-2] - d[4:]).clamp(min=0))
        p[2:-2] = torch.maximum(p[2:-2], p2)
    return p


def prominences(d: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(peak indices, their prominences) of ``d`` by ``scipy.signal.find_peaks``."""
    from scipy.signal import find_peaks

    idx, props = find_peaks(d.cpu().numpy(), prominence=0.0)
    return idx, props["prominences"]


def _prominent(d: torch.Tensor, threshold: float) -> torch.Tensor:
    idx, prom = prominences(d)
    keep = idx[prom >= threshold]  # find_peaks(d, prominence=threshold)
    return _starts(torch.from_numpy(keep).to(d.device))


def _uniform(n_frames: int, k: int | None, device) -> torch.Tensor:
    if not k or k < 1:
        raise ValueError(f"uniform needs k >= 1, got {k}")
    return torch.arange(0, n_frames, int(k), dtype=torch.int64, device=device)


#: each method of ``lalmtool.methods.METHODS``: (d, n_frames, k, threshold) → segment starts
DETECTORS = {
    "peaks": lambda d, n, k, t: peak_starts(d),
    "scpc": lambda d, n, k, t: _starts(torch.nonzero(scpc_peakiness(d) > (t or 0.0)).flatten()),
    "prominence": lambda d, n, k, t: _prominent(d, t or 0.0),
    "uniform": lambda d, n, k, t: _uniform(n, k, d.device),
}
assert DETECTORS.keys() == METHODS.keys()


def utterance_starts(d: torch.Tensor, n_frames: int, method: str, k: int | None = None,
                     threshold: float | None = None) -> torch.Tensor:
    """Segment starts of one utterance of ``n_frames`` frames whose dissimilarity is ``d``."""
    if method not in DETECTORS:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(METHODS)}")
    return DETECTORS[method](d, n_frames, k, threshold)


def _lengths(x: torch.Tensor, lengths) -> list[int]:
    if x.dim() == 2:
        return [x.shape[0]]
    if x.dim() != 3:
        raise ValueError(f"frames must be [T, D] or [B, T, D], got shape {tuple(x.shape)}")
    if lengths is None:
        return [x.shape[1]] * x.shape[0]
    out = [int(n) for n in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
    if len(out) != x.shape[0] or any(n < 1 or n > x.shape[1] for n in out):
        raise ValueError(f"lengths must be {x.shape[0]} values in 1..{x.shape[1]}, got {out}")
    return out


def _utterances(x: torch.Tensor, lengths) -> list[torch.Tensor]:
    return [x] if x.dim() == 2 else [x[b, :n] for b, n in enumerate(_lengths(x, lengths))]


def boundaries(x: torch.Tensor, method: str, k: int | None = None,
               threshold: float | None = None, lengths=None) -> list[torch.Tensor]:
    """Segment starts of each utterance of ``x`` (a list of int64 tensors)."""
    return [utterance_starts(dissimilarity(z), len(z), method, k, threshold)
            for z in _utterances(x, lengths)]


def pool_utterance(z: torch.Tensor, starts: torch.Tensor, reduce: str = "mean",
                   pooler=None) -> torch.Tensor:
    """One float32 vector per segment ``[S, D]`` of one utterance's frames ``z`` ``[T, D]``
    (``mean`` and ``learnt`` differentiable with respect to ``z``; ``learnt``: ``pooler``, a
    trained ``lalmtool.pooler.LearntPooler``, e.g. ``lalmtool.pooler.load(ADAPTER)``)."""
    starts = starts.to(device=z.device, dtype=torch.int64)
    if reduce == "learnt":
        if pooler is None:
            raise ValueError("reduce='learnt' needs its trained pooler: "
                             "pooler=lalmtool.pooler.load(ADAPTER) (the adapter directory of a "
                             "`lalmtool finetune --segments` run)")
        return pooler(z, starts)
    if reduce == "pick":
        return z[starts].float()
    if reduce != "mean":
        raise ValueError(f"unknown reducer {reduce!r}; choose one of {REDUCERS}")
    ends = torch.cat([starts[1:], torch.tensor([len(z)], device=z.device)])
    seg_len = ends - starts
    segment_of_frame = torch.repeat_interleave(torch.arange(len(starts), device=z.device),
                                               seg_len)
    sums = torch.zeros(len(starts), z.shape[1], device=z.device).index_add(
        0, segment_of_frame, z.float())
    return sums / seg_len[:, None]


def pool(x: torch.Tensor, starts: list[torch.Tensor], reduce: str = "mean",
         lengths=None, pooler=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens ``[S, D]`` or zero-padded ``[B, S_max, D]`` in ``x``'s dtype, tokens per
    utterance) from frames and each utterance's segment starts (``learnt``: by ``pooler``)."""
    utts = _utterances(x, lengths)
    if len(starts) != len(utts):
        raise ValueError(f"{len(starts)} boundary lists for {len(utts)} utterances")
    out = [pool_utterance(z, s, reduce, pooler).to(x.dtype) for z, s in zip(utts, starts)]
    counts = torch.tensor([len(t) for t in out], dtype=torch.int64)
    if x.dim() == 2:
        return out[0], counts
    return torch.nn.utils.rnn.pad_sequence(out, batch_first=True), counts


def threshold_for_rate(scores: list[np.ndarray], seconds: float, target_rate: float,
                       method: str = "") -> float:
    """The threshold whose token count over utterances with these peak ``scores`` (SCPC
    peakiness > 0, or prominences) and ``seconds`` of audio is closest to ``target_rate``.

    A detector keeps the peaks whose score passes the threshold, so the token count is 1 per
    utterance plus the scores above it: sorting all scores once gives the exact threshold.
    """
    s = np.sort(np.concatenate(scores))[::-1] if scores else np.zeros(0)
    want = int(round(target_rate * seconds)) - len(scores)  # peaks to keep
    if seconds and (want <= 0 or want > len(s)):
        kept = min(max(want, 0), len(s))
        log.warning("--target-rate %g cannot be reached with %s on this set: the closest is "
                    "%.3g tokens/s (%s)", target_rate, method, (len(scores) + kept) / seconds,
                    "one token per utterance" if kept == 0 else "every peak kept")
    if want <= 0:
        return float(s[0]) + 1.0 if len(s) else 0.0  # keep no peak at all
    if want >= len(s):
        return 0.0
    # midway between the last score kept and the first dropped (scpc keeps scores above the
    # threshold, find_peaks prominences at or above it: both keep exactly the `want` highest)
    return float(s[want - 1] + s[want]) / 2


def peak_scores(d: torch.Tensor, method: str) -> np.ndarray:
    """The scores a threshold of ``method`` is compared with, one per candidate peak."""
    if method == "scpc":
        s = scpc_peakiness(d).cpu().numpy()
        return s[s > 0]
    return prominences(d)[1]


def compress(x: torch.Tensor, method: str = "peaks", reduce: str = "mean",
             k: int | None = None, threshold: float | None = None,
             target_rate: float | None = None, frame_rate: float | None = None,
             lengths=None, seconds=None, pooler=None) -> Compressed:
    """Compresses ``x`` (``[T, D]``, or ``[B, T, D]`` with ``lengths``) with ``method`` and
    ``reduce`` (``learnt``: with ``pooler``, ``lalmtool.pooler.load(ADAPTER)``);
    ``target_rate`` (tokens/s, needs ``frame_rate``) sets ``k`` or the threshold."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(METHODS)}")
    utts = _utterances(x, lengths)
    ds = [dissimilarity(z) for z in utts]
    if target_rate is not None:
        if not frame_rate:
            raise ValueError("target_rate needs frame_rate (frames per second of x)")
        if method == "uniform":
            k = max(1, int(round(frame_rate / target_rate)))
        elif method in THRESHOLD_METHODS:
            secs = (sum(float(s) for s in seconds) if seconds is not None
                    else sum(len(z) for z in utts) / frame_rate)
            threshold = threshold_for_rate([peak_scores(d, method) for d in ds], secs,
                                           target_rate, method)
        else:
            raise ValueError("target_rate needs a method with a threshold "
                             f"({', '.join(THRESHOLD_METHODS)}) or uniform; peaks has none")
    starts = [utterance_starts(d, len(z), method, k, threshold) for d, z in zip(ds, utts)]
    tokens, counts = pool(x, starts, reduce, lengths, pooler)
    params = {"k": k} if method == "uniform" else (
        {"threshold": threshold or 0.0} if method in THRESHOLD_METHODS else {})
    return Compressed(tokens, counts, starts, params)
