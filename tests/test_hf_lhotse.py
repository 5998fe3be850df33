"""Hugging Face datasets and lhotse in and out (`lalmtool prepare hf-dataset|lhotse`, `lalmtool
manifest to-lhotse`) and manifest spans (offset + duration inside a longer file): small datasets
and CutSets built here from test audio, prepared, extracted and pooled, and compared value for
value with the same utterances given as plain WAV files."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from conftest import GOOD, SPANS, cuts_file, make_dataset, prepare, read_jsonl, write_manifest
from lalmtool.audio import AudioError, load_audio
from lalmtool.cli import main
from lalmtool.corpora import CorpusError
from lalmtool.extract import extract
from lalmtool.manifest import ManifestError, load_manifest, read_manifest, write_manifest as \
    write_utts
from lalmtool.pool import pool_store
from lalmtool.segment import segment
from lalmtool.store import Store

datasets = pytest.importorskip("datasets")
lhotse = pytest.importorskip("lhotse")




def store_arrays(path) -> dict[str, np.ndarray]:
    st = Store(path)
    return {u: st[u] for u in st.ids}


def test_hf_dataset_bad_rows_are_named_errors(tmp_path):
    path, _ = make_dataset(tmp_path)
    with pytest.raises(CorpusError) as e:
        prepare(path, tmp_path / "out")
    assert [str(p) for p in e.value.problems] == [
        f"{path} row 1: no audio",
        f"{path} row 4: audio bytes soundfile cannot read (Format not recognised.)",
        f"{path} row 5: empty 'sentence'"]
    assert not os.path.exists(tmp_path / "out" / "manifest.jsonl")
    assert not os.path.exists(tmp_path / "out" / "audio")  # nothing written on failure


def test_hf_dataset_skip_writes_the_audio_verbatim_and_lists_the_skips(tmp_path):
    path, blobs = make_dataset(tmp_path)
    out = tmp_path / "out"
    s = prepare(path, out, on_error="skip", lang="en")
    assert (s["utterances"], s["skipped"]) == (3, 3)
    recs = read_jsonl(out / "manifest.jsonl")
    assert [(r["id"], r["duration"], r["text"], r["lang"]) for r in recs] == [
        ("a1", 1.0, "the first clip", "en"), ("b2", 1.7, "a second clip", "en"),
        ("c3", 0.6, "third", "en")]
    assert [r["audio"] for r in recs] == [str(out / "audio" / n)
                                          for n in ("a1.wav", "b2.flac", "c3.wav")]
    for r in recs:  # byte for byte what the dataset holds: no re-encoding
        with open(r["audio"], "rb") as fh:
            assert fh.read() == blobs[r["id"]]
    assert [(r["id"], r["error"]) for r in read_jsonl(out / "skipped.jsonl")] == [
        ("nothing", "no audio"),
        ("junk", "audio bytes soundfile cannot read (Format not recognised.)"),
        ("silent", "empty 'sentence'")]
    assert prepare(path, out, on_error="skip", lang="en")["reused"] is True


def test_hf_dataset_extract_and_pool_equal_the_plain_wav_manifest(tmp_path, tiny_whisper):
    """prepare hf-dataset → extract → segment → pool gives the same ids and the same values as
    the same clips written as WAV/FLAC files and listed in a plain manifest."""
    path, blobs = make_dataset(tmp_path)
    prepare(path, tmp_path / "hf", on_error="skip")
    rows = []
    for u, _, _, fmt, text in GOOD:
        f = tmp_path / "plain" / f"{u}.{fmt.lower()}"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(blobs[u])
        rows.append({"id": u, "audio": str(f), "text": text})
    plain = write_manifest(tmp_path / "plain" / "manifest.jsonl", rows)
    stores = {}
    for name, m in (("hf", str(tmp_path / "hf" / "manifest.jsonl")), ("plain", plain)):
        feats = extract(m, tiny_whisper, str(tmp_path / f"feats-{name}"))["store"]
        seg = str(tmp_path / f"seg-{name}")
        segment(feats, "peaks", seg)
        pool_store(feats, seg, "mean", str(tmp_path / f"pooled-{name}"))
        stores[name] = (store_arrays(feats), store_arrays(str(tmp_path / f"pooled-{name}")))
    for i in (0, 1):
        hf, wav = stores["hf"][i], stores["plain"][i]
        assert sorted(hf) == sorted(wav) == ["a1", "b2", "c3"]
        for u in hf:
            np.testing.assert_array_equal(hf[u], wav[u])
    assert stores["hf"][0]["b2"].shape == (85, 16)  # 1.7 s at 50 frames/s, resampled to 16 kHz


def test_hf_parquet_files_in_the_hub_layout_give_the_same_manifest(tmp_path):
    path, _ = make_dataset(tmp_path)
    pq = tmp_path / "pq" / "data"
    pq.mkdir(parents=True)
    dd = datasets.load_from_disk(path)
    dd["test"].to_parquet(str(pq / "test-00000-of-00001.parquet"))
    dd["train"].to_parquet(str(pq / "train-00000-of-00001.parquet"))
    prepare(path, tmp_path / "a", on_error="skip")
    prepare(str(tmp_path / "pq"), tmp_path / "b", on_error="skip")
    a = read_jsonl(tmp_path / "a" / "manifest.jsonl")
    b = read_jsonl(tmp_path / "b" / "manifest.jsonl")
    assert [{**r, "audio": os.path.basename(r["audio"])} for r in a] == \
        [{**r, "audio": os.path.basename(r["audio"])} for r in b]
    for ra, rb in zip(a, b):
        with open(ra["audio"], "rb") as fa, open(rb["audio"], "rb") as fb:
            assert fa.read() == fb.read()
    with pytest.raises(ValueError, match=r"no files of split 'dev' \(found splits: test, "
                                         r"train\); give --split one of these"):
        from lalmtool.corpora.hf_dataset import prepare_hf_dataset
        prepare_hf_dataset(str(tmp_path / "pq"), "dev", str(tmp_path / "c"))


def test_hf_unknown_split_and_column_are_named(tmp_path):
    from lalmtool.corpora.hf_dataset import prepare_hf_dataset

    path, _ = make_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"no split 'dev' \(it holds: train, test\)"):
        prepare_hf_dataset(path, "dev", str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"no column\(s\) 'text' in the dataset \(it has: "
                                         r"key, audio, sentence\)"):
        prepare_hf_dataset(path, "test", str(tmp_path / "o"))


def test_cli_prepare_hf_dataset_row_ids_by_default(tmp_path):
    path, _ = make_dataset(tmp_path)
    r = CliRunner().invoke(main, ["prepare", "hf-dataset", "--path", path, "--split", "train",
                                  "--text-column", "sentence", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert [(x["id"], x["text"]) for x in read_jsonl(tmp_path / "o" / "manifest.jsonl")] == [
        ("train-0000000", "the first clip")]


# -- spans and lhotse ----------------------------------------------------------------------
def test_load_audio_reads_only_the_span_as_lhotse_does(tmp_path, long_wav):
    whole = load_audio(long_wav)
    span = load_audio(long_wav, 16000, offset=1.25, duration=1.5)
    np.testing.assert_array_equal(span, whole[20000:44000])
    cut = lhotse.CutSet.from_file(cuts_file(str(tmp_path / "c.jsonl.gz"), long_wav)).to_eager()["s1"]
    np.testing.assert_array_equal(span, cut.load_audio()[0])
    assert load_audio(long_wav, 8000, offset=1.25, duration=1.5).shape == (12000,)
    with pytest.raises(AudioError, match=r"span 4.5 s \+ 1 s ends at 5.5 s, beyond the end of "
                                         r"the audio \(5 s\)"):
        load_audio(long_wav, offset=4.5, duration=1.0)
    end = load_audio(long_wav, offset=4.5, duration=0.52)  # within 25 ms: clipped at the end
    np.testing.assert_array_equal(end, whole[72000:])


def test_manifest_spans_are_checked_and_records_without_them_are_unchanged(tmp_path, long_wav):
    m = write_manifest(tmp_path / "m.jsonl", [
        {"id": "plain", "audio": long_wav, "text": "t", "duration": 5.0},
        {"id": "span", "audio": long_wav, "text": "t", "duration": 1.5, "offset": 1.25},
        {"id": "nodur", "audio": long_wav, "text": "t", "offset": 1.0},
        {"id": "neg", "audio": long_wav, "text": "t", "duration": 1.0, "offset": -1},
        {"id": "past", "audio": long_wav, "text": "t", "duration": 1.0, "offset": 4.5}])
    with pytest.raises(ManifestError) as e:
        load_manifest(m)
    assert e.value.problems == [
        ("nodur", "line 3: 'offset' needs 'duration' (the span's length in seconds)"),
        ("neg", "line 4: 'offset' must be a finite number of seconds >= 0, got -1"),
        ("past", f"line 5: {long_wav}: span 4.5 s + 1 s ends at 5.5 s, beyond the end of the "
                 "audio (5 s)")]
    keep, _ = load_manifest(m, on_error="skip")
    assert [(u.id, u.offset, u.duration) for u in keep] == [("plain", None, 5.0),
                                                            ("span", 1.25, 1.5)]
    out = tmp_path / "again.jsonl"
    write_utts(str(out), keep)
    with open(m) as fh:
        first_two = fh.read().splitlines()[:2]
    assert out.read_text().splitlines() == first_two  # same fields, same order, same bytes


def test_extract_fingerprint_of_whole_files_is_unchanged(tmp_path, long_wav):
    from lalmtool.audio import audio_identity
    from lalmtool.extract import _inputs

    utts, _ = read_manifest(write_manifest(tmp_path / "m.jsonl", [
        {"id": "a", "audio": long_wav, "text": "t"},
        {"id": "b", "audio": long_wav, "text": "t", "duration": 1.5, "offset": 1.25}]))
    assert _inputs(utts) == [("a", long_wav, audio_identity(long_wav)),
                             ("b", long_wav, audio_identity(long_wav), (1.25, 1.5))]


def test_lhotse_cuts_inside_a_long_recording_extract_only_their_span(tmp_path, long_wav,
                                                                     tiny_whisper):
    cuts = cuts_file(str(tmp_path / "cuts.jsonl.gz"), long_wav)
    r = CliRunner().invoke(main, ["prepare", "lhotse", "--cuts", cuts, "--out",
                                  str(tmp_path / "lh")])
    assert r.exit_code == 0, r.output
    recs = read_jsonl(tmp_path / "lh" / "manifest.jsonl")
    assert recs == [{"id": u, "audio": long_wav, "duration": d, "text": t, "offset": s,
                     "lang": "en", "speaker": "spk1"} for u, s, d, t in SPANS]
    # the same spans cut out into files of their own
    whole, rows = sf.read(long_wav, dtype="int16")[0], []
    for u, s, d, t in SPANS:
        f = str(tmp_path / f"{u}.wav")
        sf.write(f, whole[round(s * 16000): round((s + d) * 16000)], 16000, subtype="PCM_16")
        rows.append({"id": u, "audio": f, "text": t})
    plain = write_manifest(tmp_path / "plain.jsonl", rows)
    a = store_arrays(extract(str(tmp_path / "lh" / "manifest.jsonl"), tiny_whisper,
                             str(tmp_path / "fa"))["store"])
    b = store_arrays(extract(plain, tiny_whisper, str(tmp_path / "fb"))["store"])
    assert sorted(a) == sorted(b) == ["s0", "s1", "s2"]
    for u in a:
        np.testing.assert_array_equal(a[u], b[u])
    assert [len(a[u]) for u in ("s0", "s1", "s2")] == [50, 75, 38]
    assert Store(str(tmp_path / "fa")).attrs("s1")["duration"] == 1.5


def test_lhotse_bad_cuts_are_named_by_line(tmp_path, long_wav):
    from lalmtool.corpora.lhotse_io import prepare_lhotse

    rec = lhotse.Recording.from_file(long_wav, recording_id="long")
    sup = lambda u, t: [lhotse.SupervisionSegment(id=u, recording_id="long", start=0.0,  # noqa
                                                  duration=1.0, text=t)]
    cuts = [lhotse.MonoCut(id="ok", start=0.5, duration=1.0, channel=0, recording=rec,
                           supervisions=sup("ok", "fine")),
            lhotse.MonoCut(id="late", start=4.5, duration=1.0, channel=0, recording=rec,
                           supervisions=sup("late", "late")),
            lhotse.MonoCut(id="mute", start=0.0, duration=1.0, channel=0, recording=rec,
                           supervisions=sup("mute", "")),
            lhotse.MonoCut(id="loud", start=0.0, duration=1.0, channel=0,
                           recording=rec.perturb_volume(2.0), supervisions=sup("loud", "x"))]
    path = str(tmp_path / "cuts.jsonl")
    lhotse.CutSet.from_cuts(cuts).to_file(path)
    with pytest.raises(CorpusError) as e:
        prepare_lhotse(str(tmp_path / "o"), cuts=path)
    assert [str(p) for p in e.value.problems] == [
        f"{path}:2: cut late: {long_wav}: span 4.5 s + 1 s ends at 5.5 s, beyond the end of "
        "the audio (5 s)",
        f"{path}:3: cut mute: no supervision with text",
        f"{path}:4: cut loud: recording long_vp2.0 has transforms lalmtool does not apply (Volume); "
        "save the transformed audio to files first"]
    s = prepare_lhotse(str(tmp_path / "o"), cuts=path, on_error="skip")
    assert (s["utterances"], s["skipped"]) == (1, 3)


def test_lhotse_recordings_and_supervisions_give_one_utterance_per_supervision(tmp_path,
                                                                               long_wav):
    from lalmtool.corpora.lhotse_io import prepare_lhotse

    rec = lhotse.Recording.from_file(long_wav, recording_id="long")
    sups = [lhotse.SupervisionSegment(id=u, recording_id="long", start=s, duration=d, text=t)
            for u, s, d, t in SPANS]
    lhotse.RecordingSet.from_recordings([rec]).to_file(str(tmp_path / "rec.jsonl.gz"))
    lhotse.SupervisionSet.from_segments(sups).to_file(str(tmp_path / "sup.jsonl.gz"))
    prepare_lhotse(str(tmp_path / "o"), recordings=str(tmp_path / "rec.jsonl.gz"),
                   supervisions=str(tmp_path / "sup.jsonl.gz"))
    assert [(r["id"], r["offset"], r["duration"], r["text"])
            for r in read_jsonl(tmp_path / "o" / "manifest.jsonl")] == \
        [(u, s, d, t) for u, s, d, t in SPANS]


def test_to_lhotse_round_trips(tmp_path, long_wav, audio_set):
    """manifest → CutSet (lhotse loads it: same durations, texts, audio) → manifest again."""
    rows = read_jsonl(audio_set)
    base = os.path.dirname(audio_set)
    rows = [{**r, "audio": os.path.join(base, r["audio"]), "lang": "en"} for r in rows[:2]]
    rows[1]["target"] = "eine Übersetzung"
    rows += [{"id": u, "audio": long_wav, "text": t, "offset": s, "duration": d, "lang": "en"}
             for u, s, d, t in SPANS[1:]]
    m = write_manifest(tmp_path / "m.jsonl", rows)
    out = str(tmp_path / "cuts.jsonl.gz")
    r = CliRunner().invoke(main, ["manifest", "to-lhotse", m, "--out", out])
    assert (r.exit_code, r.output) == (0, f"wrote 4 cuts to {out}\n")
    cuts = lhotse.CutSet.from_file(out).to_eager()
    assert [(c.id, c.start, c.duration, c.supervisions[0].text, c.supervisions[0].language)
            for c in cuts] == [("utt0", 0.0, 1.0, "sentence 0", "en"),
                               ("utt1", 0.0, 2.5, "sentence 1", "en"),
                               ("s1", 1.25, 1.5, "one", "en"), ("s2", 3.5, 0.75, "two", "en")]
    np.testing.assert_array_equal(cuts["s1"].load_audio()[0],
                                  load_audio(long_wav, offset=1.25, duration=1.5))
    from lalmtool.corpora.lhotse_io import prepare_lhotse

    prepare_lhotse(str(tmp_path / "back"), cuts=out)
    back = {r["id"]: r for r in read_jsonl(tmp_path / "back" / "manifest.jsonl")}
    for r in rows:
        want = {k: v for k, v in r.items()}
        want.setdefault("duration", back[r["id"]]["duration"])
        assert back[r["id"]] == want
    assert back["utt1"]["duration"] == 2.5 and "offset" not in back["utt1"]


@pytest.mark.parametrize("argv,extra", [
    (["prepare", "hf-dataset", "--path", ".", "--split", "test", "--out", "o"], "hf"),
    (["prepare", "lhotse", "--cuts", "c.jsonl", "--out", "o"], "lhotse"),
])
def test_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, argv, extra):
    (tmp_path / "c.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    module = "datasets" if extra == "hf" else "lhotse"
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 1
    assert r.output == (f"Error: {argv[1]} needs the optional package {module}, which is not "
                        f"installed: pip install 'lalmtool[{extra}]'\n").replace(
        f"Error: {argv[1]}", f"Error: prepare {argv[1]}")
