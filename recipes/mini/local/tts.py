"""Offline text-to-speech for the mini recipe: espeak-ng and flite voices, 16 kHz mono output.

A voice is a ``Voice`` record (engine, voice name, speed, pitch); ``Voice.tag`` names it in
the manifests, e.g. ``espeak:en-gb-x-rp+m3:s165:p42`` or ``flite:slt:d1.05``. Voices are drawn
per utterance with ``random_voice`` from a seeded generator, so the same seed gives the same
voices, and ``synthesize`` turns (text, voice) into the same samples every time.
"""
from __future__ import annotations

import io
import random
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
PEAK = 0.9  # every utterance is scaled to this peak (kal16 is otherwise ~3x quieter)

# espeak-ng English accents (built-in voices; the mbrola ones need extra packages). Whisper
# tiny.en, greedy, on the same 60 WordNet sentences (5 variants, 160 wpm, pitch 50): en-gb 24 %,
# en-us 33 %, en-gb-x-gbclan 36 %, en-gb-x-rp 38 % WER (per-utterance WER capped at 1);
# left out: en-us-nyc 42 %, en-gb-scotland 55 %, en-gb-x-gbcwmd and en-029 60-80 %.
ESPEAK_ACCENTS = ("en-gb", "en-us", "en-gb-x-gbclan", "en-gb-x-rp")
# espeak-ng voice variants (``-v ACCENT+VARIANT``). Kept: those whose tiny.en WER was at most
# ~36 % on 36 WordNet sentences (m3 21 %, m7/rob/robert 24 %, ... iven 36 %); left out: f4 38 %,
# belinda 38 %, anika 40 % (both with hallucinated run-ons), f1 40 %, david 45 %, and in a
# smaller check Annie, Alicia, Andy, aunty, boris, grandma, klatt, linda, norbert, shelby,
# travis, zac (50-260 %); effect voices (whisper, croak, robosoft*, *Robot, Demonic, Tweaky,
# fast) too.
ESPEAK_VARIANTS = ("f2", "f3", "f5", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "benjamin",
                   "edward", "iven", "john", "max", "michel", "paul", "quincy", "rob", "robert",
                   "steph", "victor")
# Speed and pitch ranges: faster than 170 wpm or pitch above 60 raised tiny.en's WER.
ESPEAK_SPEED = (130, 170)   # words per minute (espeak default 175)
ESPEAK_PITCH = (35, 60)     # 0-99 (default 50)
# flite voices: awb (Scottish male), rms (US male), slt (US female) are clustergen voices;
# kal16 is a US male diphone voice. 'kal' (8 kHz diphone) and 'awb_time' (speaks only
# clock times) are left out.
FLITE_VOICES = ("awb", "rms", "slt", "kal16")
FLITE_STRETCH = (0.9, 1.15)  # duration_stretch: > 1 is slower
FLITE_SHARE = 0.5            # fraction of utterances spoken by flite


class TTSError(RuntimeError):
    pass


@dataclass(frozen=True)
class Voice:
    engine: str       # "espeak" or "flite"
    name: str         # espeak "accent+variant", flite voice name
    speed: float      # espeak words per minute; flite duration stretch
    pitch: int = 0    # espeak pitch (unused by flite)

    @property
    def tag(self) -> str:
        if self.engine == "espeak":
            return f"espeak:{self.name}:s{int(self.speed)}:p{self.pitch}"
        return f"flite:{self.name}:d{self.speed:.2f}"

    @property
    def speaker(self) -> str:
        """The voice without speed and pitch, for summaries."""
        return f"{self.engine}:{self.name}"


def check_tools() -> list[str]:
    """Checks that espeak-ng and flite are installed; returns the flite voices to use."""
    for tool in ("espeak-ng", "flite"):
        if shutil.which(tool) is None:
            raise TTSError(f"{tool} not found: run ./install.sh (Debian packages espeak-ng, flite)")
    out = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout
    have = set(out.split(":", 1)[-1].split())
    voices = [v for v in FLITE_VOICES if v in have]
    if not voices:
        raise TTSError(f"flite lists none of the voices {FLITE_VOICES} (it has: {sorted(have)})")
    return voices


def random_voice(rng: random.Random, flite_voices: list[str] | tuple[str, ...],
                 flite_share: float = FLITE_SHARE) -> Voice:
    """One voice drawn from ``rng``: flite with probability ``flite_share``, else espeak-ng."""
    if rng.random() < flite_share and flite_voices:
        stretch = round(rng.uniform(*FLITE_STRETCH), 2)
        return Voice("flite", rng.choice(sorted(flite_voices)), stretch)
    name = f"{rng.choice(ESPEAK_ACCENTS)}+{rng.choice(ESPEAK_VARIANTS)}"
    return Voice("espeak", name, rng.randint(*ESPEAK_SPEED), rng.randint(*ESPEAK_PITCH))


def _run(cmd: list[str], text: str | None = None) -> bytes:
    proc = subprocess.run(cmd, input=text.encode() if text is not None else None,
                          capture_output=True, timeout=120)
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        err = proc.stderr.decode(errors="replace").strip()
        raise TTSError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {err or 'no audio'}")
    return proc.stdout


def _espeak(text: str, voice: Voice) -> bytes:
    return _run(["espeak-ng", "-v", voice.name, "-s", str(int(voice.speed)),
                 "-p", str(voice.pitch), "--stdin", "--stdout"], text)


def _flite(text: str, voice: Voice) -> bytes:
    return _run(["flite", "-voice", voice.name, "--setf", f"duration_stretch={voice.speed}",
                 "-t", text, "-o", "/dev/stdout"])


def preload() -> None:
    """Imports the resampler's modules (slow: ~2 s) so that forked workers need not."""
    import torchaudio.functional  # noqa: F401


def resample(wav: np.ndarray, sr: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling with torchaudio (imported here: only espeak needs it)."""
    if sr == target:
        return wav
    import torch
    import torchaudio.functional as AF
    torch.set_num_threads(1)
    return AF.resample(torch.from_numpy(wav), sr, target).numpy()


def synthesize(text: str, voice: Voice) -> np.ndarray:
    """``text`` spoken by ``voice``: float32 mono samples at 16 kHz."""
    raw = _espeak(text, voice) if voice.engine == "espeak" else _flite(text, voice)
    wav, sr = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    wav = resample(np.ascontiguousarray(wav.mean(axis=1)), sr)
    if wav.size == 0 or not np.isfinite(wav).all() or np.abs(wav).max() < 1e-3:
        raise TTSError(f"{voice.tag} produced silent or invalid audio for {text!r}")
    return (wav * (PEAK / np.abs(wav).max())).astype(np.float32)
