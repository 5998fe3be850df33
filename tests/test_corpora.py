"""Corpus preparation (lalmtool.corpora, `lalmtool prepare`): tiny fake LibriSpeech and
Common Voice + CoVoST 2 trees in the real layouts, and every kind of bad corpus input."""
from __future__ import annotations

import os

import pytest
import soundfile as sf
from click.testing import CliRunner

from conftest import COVOST, LIBRI, make_covost, make_librispeech, read_jsonl, tone
from lalmtool.cli import main
from lalmtool.corpora import CorpusError
from lalmtool.corpora.covost2 import prepare_covost2
from lalmtool.corpora.librispeech import prepare_librispeech

# ------------------------------------------------------------------------------ LibriSpeech

def test_librispeech_manifest_ids_texts_durations(tmp_path):
    root = make_librispeech(tmp_path / "LibriSpeech")
    out = tmp_path / "data"
    summaries = prepare_librispeech(root, ["dev-clean", "train-clean-100"], str(out))
    assert [(s["set"], s["utterances"], s["skipped"]) for s in summaries] == [
        ("dev-clean", 3, 0), ("train-clean-100", 4, 0)]
    recs = read_jsonl(out / "dev-clean" / "manifest.jsonl")
    assert [r["id"] for r in recs] == ["174-50561-0000", "84-121123-0000", "84-121123-0001"]
    assert recs[1] == {"id": "84-121123-0000", "duration": 1.25, "text": "go do you hear",
                       "lang": "en", "speaker": "84",
                       "audio": os.path.join(root, "dev-clean", "84", "121123",
                                             "84-121123-0000.flac")}
    assert [r["duration"] for r in recs] == [1.0, 1.25, 1.5]


def test_librispeech_text_case_keep(tmp_path):
    root = make_librispeech(tmp_path / "LS", {"dev-clean": LIBRI["dev-clean"]})
    prepare_librispeech(root, ["dev-clean"], str(tmp_path / "d"), text_case="keep")
    texts = [r["text"] for r in read_jsonl(tmp_path / "d" / "dev-clean" / "manifest.jsonl")]
    assert texts == ["FORGOTTEN TOO THE NAME OF GILLIAN", "GO DO YOU HEAR",
                     "BUT IN LESS THAN FIVE MINUTES THE STAIRCASE GROANED"]


def test_librispeech_rerun_reuses_and_option_change_rebuilds(tmp_path, caplog):
    root = make_librispeech(tmp_path / "LS", {"dev-clean": LIBRI["dev-clean"]})
    out = str(tmp_path / "d")
    prepare_librispeech(root, ["dev-clean"], out)
    manifest = os.path.join(out, "dev-clean", "manifest.jsonl")
    before = os.stat(manifest).st_mtime_ns
    again = prepare_librispeech(root, ["dev-clean"], out)
    assert again[0]["reused"] is True and again[0]["utterances"] == 3
    assert os.stat(manifest).st_mtime_ns == before
    with caplog.at_level("INFO", logger="lalmtool"):
        rebuilt = prepare_librispeech(root, ["dev-clean"], out, text_case="keep")
    assert rebuilt[0]["reused"] is False
    assert f"{os.path.join(out, 'dev-clean')} was prepared with other settings (text_case: " \
           "'lower' there, 'keep' now); preparing it again" in caplog.text
    assert read_jsonl(manifest)[1]["text"] == "GO DO YOU HEAR"


def _bad_libri(tmp_path):
    root = make_librispeech(tmp_path / "LS", {"dev-clean": LIBRI["dev-clean"]})
    chapter = os.path.join(root, "dev-clean", "84", "121123")
    os.remove(os.path.join(chapter, "84-121123-0001.flac"))          # transcript line, no audio
    sf.write(os.path.join(chapter, "84-121123-0002.flac"), tone(1.0), 16000)  # audio, no line
    with open(os.path.join(root, "dev-clean", "174", "50561", "174-50561-0000.flac"), "wb") as fh:
        fh.write(b"not a flac file at all")                           # unreadable clip
    return root, chapter


def test_librispeech_bad_input_is_a_named_error(tmp_path):
    root, chapter = _bad_libri(tmp_path)
    with pytest.raises(CorpusError) as e:
        prepare_librispeech(root, ["dev-clean"], str(tmp_path / "d"))
    msg = str(e.value)
    trans = os.path.join(chapter, "84-121123.trans.txt")
    assert f"{trans}:2: transcript of 84-121123-0001 but no audio 84-121123-0001.flac" in msg
    assert (f"{os.path.join(chapter, '84-121123-0002.flac')}: audio without a transcript line "
            f"in {trans}") in msg
    assert "174-50561-0000.flac: unreadable audio" in msg
    assert "3 problem(s)" in msg and "--on-error skip" in msg
    assert not os.path.exists(tmp_path / "d" / "dev-clean" / "manifest.jsonl")


def test_librispeech_bad_input_skipped_and_listed(tmp_path):
    root, chapter = _bad_libri(tmp_path)
    s = prepare_librispeech(root, ["dev-clean"], str(tmp_path / "d"), on_error="skip")
    assert (s[0]["utterances"], s[0]["skipped"]) == (1, 3)
    assert [r["id"] for r in read_jsonl(tmp_path / "d" / "dev-clean" / "manifest.jsonl")] == [
        "84-121123-0000"]
    skipped = read_jsonl(tmp_path / "d" / "dev-clean" / "skipped.jsonl")
    assert [(r["id"], r.get("line")) for r in skipped] == [
        ("174-50561-0000", None), ("84-121123-0001", 2), ("84-121123-0002", None)]


def test_librispeech_empty_transcript_and_foreign_id(tmp_path):
    root = make_librispeech(tmp_path / "LS", {"dev-clean": LIBRI["dev-clean"]})
    trans = os.path.join(root, "dev-clean", "84", "121123", "84-121123.trans.txt")
    with open(trans, "w") as fh:
        fh.write("84-121123-0000\n84-121123-0001 BUT IN LESS\n99-1-0000 STRAY LINE\n")
    with pytest.raises(CorpusError) as e:
        prepare_librispeech(root, ["dev-clean"], str(tmp_path / "d"))
    assert f"{trans}:1: empty transcript for 84-121123-0000" in str(e.value)
    assert f"{trans}:3: utterance '99-1-0000' does not belong to chapter 84-121123" in str(e.value)


def test_librispeech_missing_subsets_named_before_anything_is_written(tmp_path):
    root = make_librispeech(tmp_path / "LS", {"dev-clean": LIBRI["dev-clean"]})
    with pytest.raises(FileNotFoundError) as e:
        prepare_librispeech(root, ["dev-clean", "test-other", "dev-other"], str(tmp_path / "d"))
    assert str(e.value) == (
        f"LibriSpeech subset(s) test-other, dev-other not found in {root} (it holds: "
        "dev-clean); give --subsets only subsets that are there")
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------ CoVoST 2

def test_covost2_manifests_from_mp3_and_quoted_tsv(tmp_path):
    cv, covost = make_covost(tmp_path)
    s = prepare_covost2(cv, covost, "es", "en", str(tmp_path / "d"))
    assert [(x["set"], x["utterances"]) for x in s] == [("train", 3), ("dev", 1), ("test", 2)]
    train = read_jsonl(tmp_path / "d" / "train" / "manifest.jsonl")
    assert [r["id"] for r in train] == ["common_voice_es_1", "common_voice_es_2",
                                        "common_voice_es_3"]
    first = train[0]
    assert first["text"] == 'Dijo "hola" y se fue.'
    assert first["target"] == 'He said "hello" and left.'
    assert (first["lang"], first["target_lang"], first["speaker"]) == ("es", "en", "client0")
    assert first["audio"] == os.path.join(cv, "clips", "common_voice_es_1.mp3")
    # from the MP3 header; the encoder may pad the last frame by a few ms
    assert [round(r["duration"], 1) for r in train] == [1.5, 1.0, 1.2]
    assert abs(train[2]["duration"] - 1.25) < 0.06


def test_mp3_clips_load_like_any_audio(tmp_path):
    from lalmtool.audio import load_audio

    cv, _ = make_covost(tmp_path)
    wav = load_audio(os.path.join(cv, "clips", "common_voice_es_2.mp3"))
    assert abs(len(wav) - 16000) < 1200


def _bad_covost(tmp_path):
    rows = list(COVOST)
    rows[1] = ("common_voice_es_2.mp3", "La casa es grande.", "The house is big.", "train", 0)
    rows[2] = ("common_voice_es_3.mp3", "Vamos a la playa.", "", "train", 1.0)
    rows.append(("common_voice_es_7.mp3", "Buenos días.", "Good morning.", "train", 1.0))
    cv, covost = make_covost(tmp_path, rows)
    with open(os.path.join(cv, "clips", "common_voice_es_1.mp3"), "wb") as fh:
        fh.write(b"\x00" * 64)
    return cv, covost


def test_covost2_bad_input_is_a_named_error(tmp_path):
    cv, covost = _bad_covost(tmp_path)
    tsv = os.path.join(covost, "covost_v2.es_en.tsv")
    with pytest.raises(CorpusError) as e:
        prepare_covost2(cv, covost, "es", "en", str(tmp_path / "d"), splits=["train"])
    msg = str(e.value)
    assert f"{tsv}:2: unreadable audio {os.path.join(cv, 'clips', 'common_voice_es_1.mp3')}" in msg
    assert (f"{tsv}:3: audio file not found: {os.path.join(cv, 'clips', 'common_voice_es_2.mp3')}"
            " (row for clip common_voice_es_2.mp3)") in msg
    assert f"{tsv}:4: empty translation for common_voice_es_3.mp3" in msg
    assert "split train: 3 problem(s)" in msg


def test_covost2_bad_input_skipped_and_listed(tmp_path):
    cv, covost = _bad_covost(tmp_path)
    s = prepare_covost2(cv, covost, "es", "en", str(tmp_path / "d"), on_error="skip")
    assert [(x["set"], x["utterances"], x["skipped"]) for x in s] == [
        ("train", 1, 3), ("dev", 1, 0), ("test", 2, 0)]
    assert [r["id"] for r in read_jsonl(tmp_path / "d" / "train" / "manifest.jsonl")] == [
        "common_voice_es_7"]
    skipped = read_jsonl(tmp_path / "d" / "train" / "skipped.jsonl")
    assert [(r["id"], r["line"]) for r in skipped] == [
        ("common_voice_es_1", 2), ("common_voice_es_2", 3), ("common_voice_es_3", 4)]


def test_covost2_missing_tsv_names_the_file(tmp_path):
    cv, covost = make_covost(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"covost_v2\.fr_en\.tsv"):
        prepare_covost2(cv, covost, "fr", "en", str(tmp_path / "d"))


# ------------------------------------------------------------------------------ CLI

def test_cli_prepare_error_is_one_message_without_traceback(tmp_path):
    root, _ = _bad_libri(tmp_path)
    r = CliRunner().invoke(main, ["prepare", "librispeech", "--root", root, "--subsets",
                                  "dev-clean", "--out", str(tmp_path / "d")])
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    assert r.output.startswith("Error: LibriSpeech ")
    assert "transcript of 84-121123-0001 but no audio" in r.output


def test_cli_prepare_covost2_skip_reports_the_list(tmp_path):
    cv, covost = _bad_covost(tmp_path)
    out = tmp_path / "d"
    r = CliRunner().invoke(main, ["prepare", "covost2", "--cv_root", cv, "--covost_root", covost,
                                  "--src_lang", "es", "--tgt_lang", "en", "--splits", "train",
                                  "--out", str(out), "--on-error", "skip"])
    assert r.exit_code == 0, r.output
    assert (f"train: skipped 3 utterance(s), listed in {out / 'train' / 'skipped.jsonl'}"
            in r.output)
