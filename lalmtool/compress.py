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

Arguments are checked before any work, each wrong one a one-line ValueError naming it: frames
must be floating point (integer or bool frames are refused, not converted: their means would be
truncated; convert with ``x.float()``); a numpy array is accepted as frames (``torch.from_numpy``,
so the results are torch tensors on the CPU); ``lengths`` one whole number in 1..T per
utterance (``30.0`` is 30, ``12.5`` is refused; none for one utterance ``[T, D]``); ``k`` a whole
number >= 1 (``3.0`` is 3; ``True`` is refused), and only for uniform; ``threshold`` a finite
number >= 0, only for scpc/prominence; ``target_rate`` and ``frame_rate`` finite numbers > 0,
``target_rate`` instead of ``k``/``threshold``, never with them; ``pooler`` only for ``learnt``,
of the frames' dimension.

    >>> import torch; from lalmtool.compress import compress
    >>> out = compress(torch.randn(2, 100, 384), "peaks", lengths=torch.tensor([100, 60]))
    >>> out.tokens.shape[0], out.lengths.tolist() == [len(b) for b in out.boundaries]
    (2, True)
"""
from __future__ import annotations

import logging
import math
import numbers
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
    if k is None:
        raise ValueError("uniform needs k (frames per segment, a whole number >= 1)")
    return torch.arange(0, n_frames, _number("k", k, whole=True, least=1), dtype=torch.int64,
                        device=device)


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


def _number(name: str, v, whole: bool = False, least: float = 0, above: bool = False):
    """``v`` as an int (``whole``) or float, ValueError unless it is a finite real number
    >= ``least`` (> it: ``above``); a 0-d tensor or array counts as its number."""
    if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0:
        v = v.item()
    ok = (isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
          and math.isfinite(v) and (v > least if above else v >= least)
          and (not whole or float(v).is_integer()))
    if not ok:
        what = "a whole number" if whole else "a finite number"
        raise ValueError(f"{name} must be {what} {'>' if above else '>='} {least:g}, got {v!r}")
    return int(v) if whole else float(v)


def _frames(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f" or x.dtype.itemsize > 8:
            raise ValueError(f"frames must be floating point (float16/32/64), got dtype {x.dtype}"
                             ": convert them with x.astype(np.float32)")
        a = np.ascontiguousarray(x)
        if not a.flags.writeable or not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))  # a copy torch can own
        x = torch.from_numpy(a)
    if not torch.is_tensor(x):
        raise ValueError(f"frames must be a torch tensor (or numpy array) [T, D] or [B, T, D], "
                         f"got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"frames must be [T, D] or [B, T, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"frames must be floating point, got {x.dtype}: convert them with "
                         "x.float() (integer means would be truncated)")
    if 0 in x.shape:
        raise ValueError(f"frames must hold at least one frame of at least one dimension, got "
                         f"shape {tuple(x.shape)}")
    return x


def _lengths(x: torch.Tensor, lengths) -> list[int]:
    if x.dim() == 2:
        if lengths is not None:
            raise ValueError("lengths is for a padded batch [B, T, D]; frames of one utterance "
                             "[T, D] take none")
        return [x.shape[0]]
    n, t = x.shape[0], x.shape[1]
    if lengths is None:
        return [t] * n
    try:
        if torch.is_tensor(lengths):
            a = lengths.detach().cpu()
            a = (a.double() if a.is_floating_point() else a).numpy()
        else:
            a = np.asarray(lengths)
    except (TypeError, ValueError):
        raise ValueError(f"lengths must be one number per utterance ({n} values), got "
                         f"{lengths!r}") from None
    if a.ndim != 1:
        raise ValueError(f"lengths must be one number per utterance, a 1-D sequence of {n}, "
                         f"got shape {a.shape}")
    if a.dtype.kind not in "iuf" or (a.dtype.kind == "f" and not (np.mod(a, 1) == 0).all()):
        raise ValueError(f"lengths must be whole numbers of frames, got {a.tolist()}")
    out = [int(v) for v in a.tolist()]
    if len(out) != n or any(v < 1 or v > t for v in out):
        raise ValueError(f"lengths must be {n} values in 1..{t}, got {out}")
    return out


@dataclass
class _Inputs:
    x: torch.Tensor
    lengths: list[int]
    k: int | None
    threshold: float | None
    target_rate: float | None
    frame_rate: float | None
    seconds: float | None  # their sum
    starts: list[torch.Tensor] | None


def _checked(x, lengths=None, method: str | None = None, k=None, threshold=None,
             target_rate=None, frame_rate=None, seconds=None, reduce: str | None = None,
             pooler=None, starts=None) -> _Inputs:
    """The arguments of ``compress``, ``boundaries`` and ``pool`` checked (ValueError naming the
    first wrong one) and normalised, before any work; ``method``/``reduce`` None: not given."""
    x = _frames(x)
    lens = _lengths(x, lengths)
    if method is not None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {tuple(METHODS)}")
        if k is not None:
            if method != "uniform":
                raise ValueError(f"k is the segment length of uniform; {method} takes no k")
            k = _number("k", k, whole=True, least=1)
        if threshold is not None:
            if method not in THRESHOLD_METHODS:
                raise ValueError(f"threshold is for {' and '.join(THRESHOLD_METHODS)}; "
                                 f"{method} takes no threshold")
            threshold = _number("threshold", threshold)
        if target_rate is not None:
            target_rate = _number("target_rate", target_rate, above=True)
            if method not in THRESHOLD_METHODS + ("uniform",):
                raise ValueError("target_rate needs a method with a threshold "
                                 f"({', '.join(THRESHOLD_METHODS)}) or uniform; "
                                 f"{method} has none")
            if k is not None or threshold is not None:
                raise ValueError("give target_rate or k/threshold, not both (the target rate "
                                 "sets them)")
            if frame_rate is None:
                raise ValueError("target_rate needs frame_rate (frames per second of x)")
        elif method == "uniform" and k is None:
            raise ValueError("uniform needs k (frames per segment, a whole number >= 1)")
    if frame_rate is not None:
        frame_rate = _number("frame_rate", frame_rate, above=True)
    if seconds is not None:
        try:
            secs = np.atleast_1d(np.asarray(seconds, dtype=np.float64))
        except (TypeError, ValueError):
            secs = np.zeros((0, 0))
        if (secs.ndim != 1 or len(secs) != len(lens) or not np.isfinite(secs).all()
                or not (secs > 0).all()):
            raise ValueError(f"seconds must be the audio duration of each utterance: "
                             f"{len(lens)} finite numbers > 0, got {seconds!r}")
        seconds = sum(float(v) for v in secs)
    if reduce is not None:
        if reduce not in REDUCERS:
            raise ValueError(f"unknown reducer {reduce!r}; choose one of {REDUCERS}")
        if reduce == "learnt" and pooler is None:
            raise ValueError("reduce='learnt' needs its trained pooler: "
                             "pooler=lalmtool.pooler.load(ADAPTER) (the adapter directory of a "
                             "`lalmtool finetune --segments` run)")
        if reduce != "learnt" and pooler is not None:
            raise ValueError(f"pooler is for reduce='learnt'; {reduce!r} takes none")
        config = getattr(pooler, "config", None)
        dim = config.get("dim") if isinstance(config, dict) else None
        if dim is not None and dim != x.shape[-1]:
            raise ValueError(f"pooler pools {dim}-dimensional frames, but the frames are "
                             f"{x.shape[-1]}-dimensional: give it the frames it was trained on")
    if starts is not None:
        if len(starts) != len(lens):
            raise ValueError(f"{len(starts)} boundary lists for {len(lens)} utterances")
        starts = [s if torch.is_tensor(s) else torch.as_tensor(s) for s in starts]
        for b, (s, n) in enumerate(zip(starts, lens)):
            if (s.dim() != 1 or not len(s) or s.is_floating_point() or s.is_complex()
                    or s.dtype == torch.bool or s[0] != 0 or (s[1:] <= s[:-1]).any()
                    or s[-1] >= n):
                raise ValueError(f"starts[{b}] must be integer segment starts from 0, strictly "
                                 f"increasing, below the utterance's {n} frames; got "
                                 f"{s.flatten()[:8].tolist()}")
    return _Inputs(x, lens, k, threshold, target_rate, frame_rate, seconds, starts)


def _utterances(x: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return [x] if x.dim() == 2 else [x[b, :n] for b, n in enumerate(lengths)]


def boundaries(x: torch.Tensor, method: str, k: int | None = None,
               threshold: float | None = None, lengths=None) -> list[torch.Tensor]:
    """Segment starts of each utterance of ``x`` (a list of int64 tensors)."""
    a = _checked(x, lengths, method, k, threshold)
    return [utterance_starts(dissimilarity(z), len(z), method, a.k, a.threshold)
            for z in _utterances(a.x, a.lengths)]


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
    a = _checked(x, lengths, reduce=reduce, pooler=pooler, starts=starts)
    return _pool(a.x, a.starts, reduce, a.lengths, pooler)


def _pool(x: torch.Tensor, starts: list[torch.Tensor], reduce: str, lengths: list[int],
          pooler) -> tuple[torch.Tensor, torch.Tensor]:
    utts = _utterances(x, lengths)
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
    a = _checked(x, lengths, method, k, threshold, target_rate, frame_rate, seconds, reduce,
                 pooler)
    x, k, threshold = a.x, a.k, a.threshold
    target_rate, frame_rate = a.target_rate, a.frame_rate
    utts = _utterances(x, a.lengths)
    ds = [dissimilarity(z) for z in utts]
    if target_rate is not None:
        if method == "uniform":
            k = max(1, int(round(frame_rate / target_rate)))
        else:
            secs = a.seconds if a.seconds is not None else sum(a.lengths) / frame_rate
            threshold = threshold_for_rate([peak_scores(d, method) for d in ds], secs,
                                           target_rate, method)
    starts = [utterance_starts(d, len(z), method, k, threshold) for d, z in zip(ds, utts)]
    tokens, counts = _pool(x, starts, reduce, a.lengths, pooler)
    params = {"k": k} if method == "uniform" else (
        {"threshold": threshold or 0.0} if method in THRESHOLD_METHODS else {})
    return Compressed(tokens, counts, starts, params)
