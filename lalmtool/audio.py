"""Audio input: soundfile for reading, mono down-mix, torchaudio for resampling.

A file that holds fewer samples than its header declares (a truncated copy or upload) is bad
input, like an unreadable one: ``AudioError``. ``audio_identity`` is what the extract stage's
fingerprint records of each file: its size and a content hash, so an edit that keeps the size
still invalidates the features made from it.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import soundfile as sf

from .fileio import file_sha256

MP3_SLACK = 0.01  # MP3 headers may estimate the length: a shortfall up to 1 % is not truncation
# A span may end this much past its file's end (clipped there): lhotse's default tolerance for
# durations that differ from the audio by rounding.
SPAN_TOLERANCE = 0.025


class AudioError(RuntimeError):
    pass


def audio_identity(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 of the content) of an audio file: changes with any edit.

    About 0.9 ms per 10 s 16 kHz WAV file here (page-cached), a fifth of decoding it and far
    below encoding it (benchmarks/bench_store_verify.py); size + mtime would miss edits that
    keep the mtime (``touch -r``, ``rsync -t`` from an edited copy, restored backups).
    """
    return os.path.getsize(path), file_sha256(path)


def header_problem(path: str) -> str | None:
    """Why a RIFF/WAVE file's sample data is shorter than its header declares, or None.

    libsndfile silently reads what is there; this compares the ``data`` chunk's declared size
    with the bytes the file holds. Other formats are checked when read (``load_audio``).
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            size = os.fstat(fh.fileno()).st_size
            while True:
                chunk = fh.read(8)
                if len(chunk) < 8:
                    return None
                cid, n = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"data":
                    have = size - fh.tell()
                    if n not in (0, 0xFFFFFFFF) and have < n:  # 0 / -1: a streamed header
                        return (f"truncated audio {path}: its header declares {n} bytes of "
                                f"samples, the file holds {have}")
                    return None
                fh.seek(n + (n & 1), os.SEEK_CUR)
    except OSError as e:
        return f"unreadable audio {path}: {e.strerror}"


def span_samples(frames: int, sr: int, offset: float, duration: float) -> tuple[int, int]:
    """(first sample, number of samples) of the span ``offset`` + ``duration`` seconds in a file
    of ``frames`` samples at ``sr`` Hz; a span ending up to ``SPAN_TOLERANCE`` past the end is
    clipped there. ValueError for a span that starts at or after the end or ends beyond it."""
    start, n = int(round(offset * sr)), int(round(duration * sr))
    if n <= 0:
        raise ValueError(f"span of {duration:g} s holds no sample at {sr} Hz")
    if start >= frames:
        raise ValueError(f"span starts at {offset:g} s, at or after the end of the audio "
                         f"({frames / sr:g} s)")
    if start + n > frames + round(SPAN_TOLERANCE * sr):
        raise ValueError(f"span {offset:g} s + {duration:g} s ends at {offset + duration:g} s, "
                         f"beyond the end of the audio ({frames / sr:g} s)")
    return start, min(n, frames - start)


def span_problem(path: str, frames: int, sr: int, offset: float, duration: float) -> str | None:
    """Why the span ``offset`` + ``duration`` of ``path`` cannot be read from it, or None."""
    try:
        span_samples(frames, sr, offset, duration)
    except ValueError as e:
        return f"{path}: {e}"
    return None


def load_audio(path: str, sample_rate: int = 16000, offset: float | None = None,
               duration: float | None = None) -> np.ndarray:
    """Reads ``path`` as float32 mono at ``sample_rate`` Hz (channels averaged).

    With ``offset`` (seconds), only the span of ``duration`` seconds from there is read (its
    samples at the file's own rate: ``round(offset * rate)`` on, ``round(duration * rate)`` of
    them), then resampled; without it, the whole file.
    """
    why = header_problem(path)
    if why:
        raise AudioError(why)
    try:
        with sf.SoundFile(path) as f:
            declared, fmt, sr = f.frames, f.format, f.samplerate
            if offset is None:
                wav = f.read(dtype="float32", always_2d=True)
            else:
                start, declared = _span(path, f.frames, sr, offset, duration)
                f.seek(start)
                wav = f.read(declared, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as e:
        raise AudioError(f"cannot read audio {path}: {e}") from e
    if wav.shape[0] == 0:
        raise AudioError(f"zero-length audio: {path}")
    slack = int(declared * MP3_SLACK) if fmt == "MP3" else 0
    if wav.shape[0] < declared - slack:
        raise AudioError(f"truncated audio {path}: its header declares {declared} samples, "
                         f"{wav.shape[0]} could be read")
    wav = wav.mean(axis=1)
    if not np.isfinite(wav).all():
        raise AudioError(f"audio contains NaN or Inf samples: {path}")
    if sr != sample_rate:
        import torch  # here: reading manifests and stores needs neither
        import torchaudio.functional as AF

        wav = AF.resample(torch.from_numpy(wav), sr, sample_rate).numpy()
    return np.ascontiguousarray(wav, dtype=np.float32)


def _span(path: str, frames: int, sr: int, offset: float, duration: float | None):
    if duration is None:
        raise AudioError(f"{path}: a span at offset {offset:g} s needs a duration")
    try:
        return span_samples(frames, sr, offset, duration)
    except ValueError as e:
        raise AudioError(f"{path}: {e}") from e
