"""Long audio with real Whisper tiny.en: more than 1,500 encoder positions decode (whole memory
or chunk by chunk), in a batch with short utterances; ≤ 1,500 positions decode exactly as
transformers' own ``WhisperForConditionalGeneration.generate``."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import librivox_rows
from lalmtool.decode import decode
from lalmtool.extract import extract
from lalmtool.pool import pool_store
from lalmtool.score import get_normalizer, wer_counts
from lalmtool.segment import segment

REPEAT = 3  # the five clips (24.7 s) three times: 74.2 s, 3,710 frames, 1,855 at k=2


def _clips() -> list[tuple[str, str, str]]:
    """(id, wav path, transcript) of the five LibriVox clips, in file order."""
    return [(r["id"], r["audio"], r["text"]) for r in librivox_rows()]


@pytest.fixture(scope="module")
def long_set(tmp_path_factory):
    """A manifest: one 74 s utterance (the clips joined three times) and the five clips."""
    d = tmp_path_factory.mktemp("longform")
    clips = _clips()
    wave = np.concatenate([sf.read(w, dtype="float32")[0] for _, w, _ in clips] * REPEAT)
    sf.write(d / "long.wav", wave, 16000)
    rows = [{"id": "long", "audio": str(d / "long.wav"),
             "text": " ".join(t for _, _, t in clips * REPEAT)}]
    rows += [{"id": uid, "audio": w, "text": t} for uid, w, t in clips]
    with open(d / "m.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return str(d / "m.jsonl"), len(wave) / 16000


@pytest.fixture(scope="module")
def long_stores(tiny_en, long_set, tmp_path_factory):
    d = tmp_path_factory.mktemp("longstores")
    manifest, _ = long_set
    frames = extract(manifest, tiny_en, str(d / "frames"))["store"]
    native = extract(manifest, tiny_en, str(d / "native"), trim=False)["store"]
    segment(frames, "uniform", str(d / "seg"), k=2)
    k2 = pool_store(frames, str(d / "seg"), "mean", str(d / "k2"))["store"]
    return {"frames": frames, "native": native, "k2": k2}


def _wer(ref: str, hyp: str) -> float:
    norm = get_normalizer("whisper_english")
    counts, _ = wer_counts([norm(ref)], [norm(hyp)])
    return counts["wer"]


def _decoded(out) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, open(os.path.join(out, "hyp.jsonl")))}


@pytest.mark.slow
def test_generate_equals_transformers_generate_up_to_1500_positions(tiny_en):
    """The generation path used for any length gives transformers' own tokens on short input."""
    from lalmtool.models.whisper import WhisperBackend, cross_attention_mask

    be = WhisperBackend(tiny_en)
    waves = [sf.read(w, dtype="float32")[0] for _, w, _ in _clips()]
    for trim in (True, False):
        be.trim = trim
        feats = be.encode(waves)
        memory, mask = be._memory(feats)
        for beam in (1, 3):
            with torch.inference_mode(), cross_attention_mask(be.model, mask):
                theirs = be.model.generate(encoder_outputs=memory, num_beams=beam,
                                           do_sample=False, max_new_tokens=30)
            ours = be.generate_ids(feats, beam=beam, max_new_tokens=30)
            eot = be.tokenizer.eos_token_id
            strip = lambda row: [t for t in row.tolist() if t not in (eot, *be.tokenizer.prefix_tokens)]
            assert [strip(r) for r in ours] == [strip(r) for r in theirs]
    assert be.generate([feats[4]])[0] == "He might even have been made amiable himself."


@pytest.mark.slow
def test_long_utterance_decodes_in_a_batch_with_short_ones(long_stores, long_set, tiny_en,
                                                           tmp_path):
    """1,855 positions (k=2 of 74 s) used to abort the whole batch naming no utterance; now
    every utterance of the batch gets its hypothesis. Over its whole memory tiny.en begins
    with the first window's words (and stops after about 30 s: see the chunked test)."""
    manifest, seconds = long_set
    info = decode(long_stores["k2"], tiny_en, str(tmp_path / "d"), batch_size=6,
                  max_new_tokens=40, manifest=manifest)
    recs = _decoded(tmp_path / "d")
    assert info["utterances"] == len(recs) == 6
    assert recs["long"]["tokens"] == 1855 and recs["long"]["duration"] == pytest.approx(seconds)
    norm = get_normalizer("whisper_english")
    first = norm(_clips()[0][2])  # "and mister john dashwood had then leisure to consider ..."
    assert norm(recs["long"]["hyp"]).startswith(first)
    clip = recs["sense_and_sensibility_01_austen_64kb-0870"]
    assert norm(clip["hyp"]) == first


@pytest.mark.slow
@pytest.mark.parametrize("kind,chunk", [("frames", 1500), ("native", 1500), ("k2", 750)])
def test_long_utterance_chunked_decode_transcribes_it_all(kind, chunk, long_stores, long_set,
                                                          tiny_en, tmp_path):
    """``chunk`` = one 30 s window of positions: the whole 74 s transcript comes out."""
    manifest, _ = long_set
    info = decode(long_stores[kind], tiny_en, str(tmp_path / "d"), batch_size=6,
                  max_new_tokens=200, manifest=manifest, chunk=chunk)
    rec = _decoded(tmp_path / "d")["long"]
    assert info["utterances"] == 6 and info["chunk"] == chunk
    assert _wer(rec["ref"], rec["hyp"]) < 0.1
