"""Bad inputs to the corpus importers (`lalmtool prepare hf-dataset|lhotse`, `lalmtool manifest
to-lhotse`): each is a named problem of its row or cut, or one error naming the file and what
it is, never a traceback or a silently wrong manifest."""
from __future__ import annotations

import gzip
import json
import os

import pytest
from click.testing import CliRunner

from conftest import (SPANS, audio_bytes, cuts_file, make_dataset, prepare, read_jsonl,
                      write_manifest)
from lalmtool.cli import main
from lalmtool.corpora import CorpusError

datasets = pytest.importorskip("datasets")
lhotse = pytest.importorskip("lhotse")


def run(argv):
    return CliRunner().invoke(main, argv)


# -- hf-dataset ----------------------------------------------------------------------------
def null_id_dataset(root) -> str:
    """A save_to_disk DatasetDict whose split "test" has a good row, a row with a null id and
    another good row."""
    rows = [("a1", "first"), (None, "no id here"), ("c3", "third")]
    cols = {"key": [k for k, _ in rows],
            "audio": [{"bytes": audio_bytes(0.5, 16000, "WAV", i), "path": None}
                      for i in range(len(rows))],
            "sentence": [t for _, t in rows]}
    test = datasets.Dataset.from_dict(cols).cast_column("audio", datasets.Audio())
    path = str(root / "nullid")
    datasets.DatasetDict({"test": test}).save_to_disk(path)
    return path


def test_hf_null_id_is_a_named_problem_of_its_row(tmp_path):  # T10
    path = null_id_dataset(tmp_path)
    with pytest.raises(CorpusError) as e:
        prepare(path, tmp_path / "out")
    assert [str(p) for p in e.value.problems] == [f"{path} row 1: no id (null in 'key')"]
    assert not os.path.exists(tmp_path / "out" / "manifest.jsonl")
    s = prepare(path, tmp_path / "out", on_error="skip")
    assert (s["utterances"], s["skipped"]) == (2, 1)
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "manifest.jsonl")] == ["a1", "c3"]
    assert read_jsonl(tmp_path / "out" / "skipped.jsonl") == [
        {"file": f"{path} row 1", "error": "no id (null in 'key')"}]
    assert sorted(os.listdir(tmp_path / "out" / "audio")) == ["a1.wav", "c3.wav"]


def single_split(root, split) -> str:
    """A save_to_disk directory of one Dataset (no dataset_dict.json), of split ``split``."""
    path, _ = make_dataset(root)
    ds = datasets.load_from_disk(path)["test"]
    one = datasets.Dataset(ds.data, info=ds.info.copy(), split=datasets.NamedSplit(split))
    out = str(root / f"single-{split}")
    one.save_to_disk(out)
    return out


def test_hf_single_split_directory_refuses_another_split(tmp_path):  # T11
    path = single_split(tmp_path, "test")
    argv = ["prepare", "hf-dataset", "--path", path, "--text-column", "sentence",
            "--id-column", "key", "--on-error", "skip"]
    r = run(argv + ["--split", "train", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert r.output == (f"Error: {path}: a single split saved with save_to_disk, and that split "
                        "is 'test', not 'train'; give --split test\n")
    assert not os.path.exists(tmp_path / "o" / "manifest.jsonl")
    r = run(argv + ["--split", "test", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert [x["id"] for x in read_jsonl(tmp_path / "o" / "manifest.jsonl")] == ["a1", "b2", "c3"]


def test_hf_single_split_without_a_recorded_split_is_taken_whole(tmp_path):
    path, _ = make_dataset(tmp_path)
    ds = datasets.load_from_disk(path)["train"]
    one = datasets.Dataset(ds.data, info=ds.info.copy())
    assert one.split is None
    one.save_to_disk(str(tmp_path / "nosplit"))
    r = run(["prepare", "hf-dataset", "--path", str(tmp_path / "nosplit"), "--split", "dev",
             "--text-column", "sentence", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert [x["id"] for x in read_jsonl(tmp_path / "o" / "manifest.jsonl")] == ["dev-0000000"]


# -- manifest to-lhotse → prepare lhotse ------------------------------------------------------
def test_to_lhotse_then_prepare_lhotse_keeps_speaker_and_every_field(tmp_path, long_wav):  # T12
    rows = [{"id": u, "audio": long_wav, "duration": d, "text": t, "offset": s, "lang": "en",
             "speaker": f"spk{i}"} for i, (u, s, d, t) in enumerate(SPANS)]
    rows[1].update(target="eins", target_lang="de")
    rows[2]["speaker"] = 7  # not a string: written as one
    m = write_manifest(tmp_path / "m.jsonl", rows)
    out = str(tmp_path / "cuts.jsonl.gz")
    r = run(["manifest", "to-lhotse", m, "--out", out])
    assert r.exit_code == 0, r.output
    sups = [c.supervisions[0] for c in lhotse.CutSet.from_file(out)]
    assert [(s.speaker, s.language, s.custom) for s in sups] == [
        ("spk0", "en", None), ("spk1", "en", {"target": "eins", "target_lang": "de"}),
        ("7", "en", None)]
    r = run(["prepare", "lhotse", "--cuts", out, "--out", str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    rows[2]["speaker"] = "7"
    assert read_jsonl(tmp_path / "back" / "manifest.jsonl") == rows


# -- files that are not CutSets --------------------------------------------------------------
def lhotse_error(tmp_path, path, flag="--cuts") -> str:
    r = run(["prepare", "lhotse", flag, str(path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and "Traceback" not in r.output, r.output
    assert not os.path.exists(tmp_path / "o" / "manifest.jsonl")
    return r.output


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.jsonl.gz"])
def test_empty_cutset_file_is_named(tmp_path, name):  # T19
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wb"):
            pass
    else:
        path.write_text("\n")
    assert lhotse_error(tmp_path, path) == (
        f"Error: {path}: an empty file, not a lhotse CutSet (JSON Lines, .jsonl or .jsonl.gz)\n")


def test_lalmtool_manifest_as_cuts_is_named(tmp_path, long_wav):  # T19
    m = write_manifest(tmp_path / "m.jsonl", [{"id": "a", "audio": long_wav, "text": "t"}])
    assert lhotse_error(tmp_path, m) == (
        f"Error: {m}: a lalmtool manifest, not a lhotse CutSet: use it directly as --manifest\n")


def test_gzip_of_non_json_as_cuts_is_named(tmp_path):  # T22
    path = tmp_path / "cuts.jsonl.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b"hello, not json\n")
    out = lhotse_error(tmp_path, path)
    assert out.startswith(f"Error: {path}: not a lhotse CutSet (JSON Lines, .jsonl or .jsonl.gz): "
                          "line 1 is not JSON ("), out


def test_a_bad_entry_later_in_a_cutset_is_named(tmp_path, long_wav):
    path = cuts_file(str(tmp_path / "cuts.jsonl"), long_wav)
    with open(path, "a") as fh:
        fh.write("{not json\n")
    out = lhotse_error(tmp_path, path)
    assert out.startswith(f"Error: {path}: not a lhotse CutSet: entry 4 cannot be read ("), out


def test_recordings_given_as_cuts_are_named(tmp_path, long_wav):
    path = str(tmp_path / "rec.jsonl.gz")
    lhotse.RecordingSet.from_recordings([lhotse.Recording.from_file(long_wav)]).to_file(path)
    assert lhotse_error(tmp_path, path) == (
        f"Error: {path}: a lhotse RecordingSet, not a CutSet: give it as --recordings\n")
    empty = tmp_path / "sup.jsonl"
    empty.write_text("")
    r = run(["prepare", "lhotse", "--recordings", path, "--supervisions", str(empty),
             "--out", str(tmp_path / "o")])
    assert r.output == (f"Error: {empty}: an empty file, not a lhotse SupervisionSet (JSON "
                        "Lines, .jsonl or .jsonl.gz)\n")


# -- a cut before the start of its recording -----------------------------------------------
def test_cut_with_a_negative_start_is_a_named_problem(tmp_path, long_wav):  # T23
    from lalmtool.corpora.lhotse_io import prepare_lhotse

    path = cuts_file(str(tmp_path / "cuts.jsonl"), long_wav,
                     spans=[SPANS[0], ("neg", -1.0, 1.0, "before"), SPANS[2]])
    with pytest.raises(CorpusError) as e:
        prepare_lhotse(str(tmp_path / "o"), cuts=path)
    assert [str(p) for p in e.value.problems] == [
        f"{path}:2: cut neg: starts at -1 s, before the start of recording long (a span's "
        "start must be >= 0 s)"]
    s = prepare_lhotse(str(tmp_path / "o"), cuts=path, on_error="skip")
    assert (s["utterances"], s["skipped"]) == (2, 1)
    recs = read_jsonl(tmp_path / "o" / "manifest.jsonl")
    assert [r["id"] for r in recs] == ["s0", "s2"]
    assert all(r.get("offset", 0) >= 0 for r in recs)
    assert json.loads((tmp_path / "o" / "skipped.jsonl").read_text())["id"] == "neg"
