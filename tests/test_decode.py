"""decode: batching equals unbatched greedy output on real weights; resume; rank merge."""
import json
import os

import pytest

from lalmtool.decode import decode
from lalmtool.extract import extract
from lalmtool.pool import pool_store
from lalmtool.segment import segment
from lalmtool.store import Store, condition_of

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"


@pytest.fixture(scope="module")
def librivox(tmp_path_factory):
    d = tmp_path_factory.mktemp("librivox")
    rows = []
    for line in open(os.path.join(LIBRIVOX, "transcription")):
        text, uid = line.split("</s>")[0].replace("<s>", "").strip(), line.split("(")[-1].strip(" )\n")
        rows.append({"id": uid, "audio": os.path.join(LIBRIVOX, uid + ".wav"), "text": text})
    with open(d / "m.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return str(d / "m.jsonl")


@pytest.fixture(scope="module")
def stores(tiny_en, librivox, tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    feats = extract(librivox, tiny_en, str(d / "frames"))["store"]
    native = extract(librivox, tiny_en, str(d / "native"), trim=False)["store"]
    segment(feats, "peaks", str(d / "seg"))
    pooled = pool_store(feats, str(d / "seg"), "mean", str(d / "pooled"))["store"]
    return {"frames": feats, "native": native, "pooled": pooled}


def hyps(out):
    return {json.loads(l)["id"]: json.loads(l)["hyp"] for l in open(os.path.join(out, "hyp.jsonl"))}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["native", "pooled"])
def test_batched_equals_unbatched_greedy(kind, stores, tiny_en, librivox, tmp_path):
    one = decode(stores[kind], tiny_en, str(tmp_path / "b1"), batch_size=1, max_new_tokens=60)
    five = decode(stores[kind], tiny_en, str(tmp_path / "b5"), batch_size=5, max_new_tokens=60,
                  manifest=librivox)
    assert hyps(tmp_path / "b1") == hyps(tmp_path / "b5")
    assert one["audio_tokens"] == five["audio_tokens"] == sum(
        Store(stores[kind]).dataset(u).shape[0] for u in Store(stores[kind]).ids)
    rec = json.loads(open(tmp_path / "b5" / "hyp.jsonl").readline())
    assert set(rec) == {"id", "hyp", "ref", "tokens", "duration", "seconds"}


@pytest.mark.slow
def test_native_whisper_transcribes_librivox(stores, tiny_en, tmp_path):
    info = decode(stores["native"], tiny_en, str(tmp_path / "d"), batch_size=5)
    h = hyps(tmp_path / "d")
    assert h["sense_and_sensibility_01_austen_64kb-0930"].lower().rstrip(".") == \
        "he might even have been made amiable himself"
    assert info["condition"] == "native" and info["compression_ratio"] < 1
    assert info["tokens_per_s"] == pytest.approx(5 * 1500 / info["audio_seconds"])


@pytest.mark.slow
def test_beam_batched_equals_unbatched(stores, tiny_en, tmp_path):
    decode(stores["pooled"], tiny_en, str(tmp_path / "b1"), batch_size=1, beam=3, max_new_tokens=25)
    decode(stores["pooled"], tiny_en, str(tmp_path / "b5"), batch_size=5, beam=3, max_new_tokens=25)
    assert hyps(tmp_path / "b1") == hyps(tmp_path / "b5")


@pytest.mark.slow
def test_resume_from_partial_hypotheses(stores, tiny_en, tmp_path):
    out = tmp_path / "d"
    full = decode(stores["pooled"], tiny_en, str(out), batch_size=2, max_new_tokens=30)
    lines = open(out / "hyp.jsonl").read().splitlines(keepends=True)
    strip = lambda ls: [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in ls]
    os.remove(out / "hyp.jsonl")
    os.remove(out / "decode.json")
    # two finished lines and one cut in the middle, as a kill leaves them
    (out / "hyp.part0.jsonl").write_text("".join(lines[:2]) + lines[2][:10])
    again = decode(stores["pooled"], tiny_en, str(out), batch_size=2, max_new_tokens=30)
    after = open(out / "hyp.jsonl").read().splitlines(keepends=True)
    assert after[:2] == lines[:2] and strip(after) == strip(lines)
    assert again["utterances"] == full["utterances"] == 5
    assert not list(out.glob("hyp.part*"))
    # a finished decode with the same inputs is skipped; other settings redo it
    assert decode(stores["pooled"], tiny_en, str(out), max_new_tokens=30)["fingerprint"] == full["fingerprint"]
    # a label names the condition in reports; relabelling a finished decode decodes nothing
    before = os.path.getmtime(out / "hyp.jsonl")
    relabelled = decode(stores["pooled"], tiny_en, str(out), max_new_tokens=30, label="peaks-other")
    assert relabelled["condition"] == json.load(open(out / "decode.json"))["condition"] == "peaks-other"
    assert os.path.getmtime(out / "hyp.jsonl") == before and full["condition"] == "peaks-mean"
    assert decode(stores["pooled"], tiny_en, str(out), max_new_tokens=31)["fingerprint"] != full["fingerprint"]


@pytest.mark.slow
def test_condition_labels(stores, tmp_path):
    assert condition_of(Store(stores["frames"]))[2] == "frames"
    assert condition_of(Store(stores["pooled"]))[:2] == ("peaks", {"reduce": "mean"})
    segment(stores["frames"], "uniform", str(tmp_path / "u"), k=3)
    p = pool_store(stores["frames"], str(tmp_path / "u"), "pick", str(tmp_path / "p"))["store"]
    assert condition_of(Store(p))[2] == "uniform-pick-k3"
