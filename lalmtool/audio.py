"""Audio input: soundfile for reading, mono down-mix, torchaudio for resampling."""
from __future__ import annotations

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF


class AudioError(RuntimeError):
    pass


def load_audio(path: str, sample_rate: int = 16000) -> np.ndarray:
    """Reads ``path`` as float32 mono at ``sample_rate`` Hz (channels averaged)."""
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"cannot read audio {path}: {e}") from e
    if wav.shape[0] == 0:
        raise AudioError(f"zero-length audio: {path}")
    wav = wav.mean(axis=1)
    if not np.isfinite(wav).all():
        raise AudioError(f"audio contains NaN or Inf samples: {path}")
    if sr != sample_rate:
        wav = AF.resample(torch.from_numpy(wav), sr, sample_rate).numpy()
    return np.ascontiguousarray(wav, dtype=np.float32)
