"""recipes/mini/local/prepare_data.py: synthetic sets and the LibriVox manifest.

Needs the Debian packages espeak-ng, flite, wordnet-base and pocketsphinx-testdata
(./install.sh installs them).
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(ROOT, "recipes", "mini", "local")
SCRIPT = os.path.join(LOCAL, "prepare_data.py")
SIZES = ["--n-train", "20", "--n-dev", "5", "--n-test", "5"]
SETS = ("train", "dev", "test")

sys.path.insert(0, LOCAL)
import corpus  # noqa: E402


def prepare(out, *extra):
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out), *SIZES, *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini") / "data"
    log = prepare(out, "--nj", "2")
    return out, log


def test_manifests_and_audio(data):
    out, log = data
    for name, n in zip(SETS, (20, 5, 5)):
        set_dir = out / name
        recs = read_jsonl(set_dir / "manifest.jsonl")
        assert len(recs) == n
        assert len({r["id"] for r in recs}) == n
        for r in recs:
            assert {"id", "audio", "text", "duration", "lang"} <= set(r)
            assert r["lang"] == "en" and r["text"].strip()
            assert not os.path.isabs(r["audio"])
            info = sf.info(set_dir / r["audio"])
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert abs(info.frames / 16000 - r["duration"]) < 1e-3
            assert 0.5 < r["duration"] < 15
            wav, _ = sf.read(set_dir / r["audio"], dtype="float32")
            assert np.sqrt(np.mean(wav ** 2)) > 0.01, f"{r['id']} ({r['voice']}) is silent"
        assert f"{name}: {n} utterances" in log
        assert (set_dir / ".params.json").exists()
        assert not [f for f in os.listdir(set_dir) if ".tmp" in f]
    engines = {r["voice"].split(":")[0] for s in SETS for r in read_jsonl(out / s / "manifest.jsonl")}
    assert engines == {"espeak", "flite"}


def test_held_out_sentences_not_in_train(data):
    out, _ = data
    keys = {s: {corpus.sentence_key(r["text"]) for r in read_jsonl(out / s / "manifest.jsonl")}
            for s in SETS}
    assert not keys["train"] & keys["dev"]
    assert not keys["train"] & keys["test"]
    assert not keys["dev"] & keys["test"]


def test_librivox_manifest(data):
    out, _ = data
    recs = read_jsonl(out / "librivox" / "manifest.jsonl")
    assert len(recs) == 5
    texts = {r["id"]: r["text"] for r in recs}
    assert texts["sense_and_sensibility_01_austen_64kb-0880"] == \
        "he was not an ill disposed young man"
    assert texts["sense_and_sensibility_01_austen_64kb-0930"] == \
        "he might even have been made amiable himself"
    for r in recs:
        assert os.path.isabs(r["audio"]) and sf.info(r["audio"]).samplerate == 16000
        assert abs(sf.info(r["audio"]).duration - r["duration"]) < 1e-2


def test_same_seed_same_data_and_rerun_skips(data, tmp_path):
    out, _ = data
    other = tmp_path / "again"
    prepare(other, "--nj", "1")  # another process count must not change anything
    for name in SETS:
        a, b = read_jsonl(out / name / "manifest.jsonl"), read_jsonl(other / name / "manifest.jsonl")
        assert a == b
        for r in a:
            assert digest(out / name / r["audio"]) == digest(other / name / r["audio"])
    before = {s: os.stat(other / s / "manifest.jsonl").st_mtime_ns for s in SETS}
    log = prepare(other)
    assert log.count("up to date") == 3
    assert before == {s: os.stat(other / s / "manifest.jsonl").st_mtime_ns for s in SETS}


def test_clean_sentence():
    assert corpus.clean_sentence("she struck a goldmine") == "She struck a goldmine."
    assert corpus.clean_sentence("The sky clouded over") == "The sky clouded over."
    assert corpus.clean_sentence("Can you express this distance in kilometers?") == \
        "Can you express this distance in kilometers?"
    for bad in ("chop a hole in the ground",          # a phrase, not a sentence
                "He paid $50 for it",                   # digits and symbols
                "The sun uprising sees the dusk night fled...",
                "when he shouted `fire' there was a stampede",
                "He ran",                               # too short
                "He went to see Dr. Smith today"):      # abbreviation
        assert corpus.clean_sentence(bad) is None, bad
    assert corpus.sentence_key("He left, didn't he?") == corpus.sentence_key("he left didnt he")


def test_sentence_pool_is_large_and_split_disjoint():
    sents = corpus.load_sentences()
    assert len(sents) > 5000
    assert len({corpus.sentence_key(s) for s in sents}) == len(sents)
    split = corpus.split_sentences(sents, {"test": 50, "dev": 50, "train": 500}, seed=3)
    assert sum(map(len, split.values())) == len(set(sum(split.values(), [])))
    assert corpus.split_sentences(sents, {"test": 50, "train": 10}, seed=3)["test"] == split["test"]
    assert corpus.split_sentences(sents, {"test": 50}, seed=4)["test"] != split["test"]
    with pytest.raises(corpus.CorpusError):
        corpus.split_sentences(sents, {"train": len(sents) + 1}, seed=0)
