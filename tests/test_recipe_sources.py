"""Stage 0 of recipes/librispeech and recipes/covost2 from a local Hugging Face dataset
(--hf_dataset) or lhotse manifests (--lhotse_cuts) in place of the raw corpus: the manifests
hold the same ids, texts, targets, speakers and durations as those prepared from the raw tree
for the same utterances (only the audio path differs where the dataset's bytes are written
out), so results are comparable."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import COVOST, HANG_GUARD_S, LIBRI, make_covost, make_librispeech, read_jsonl

datasets = pytest.importorskip("datasets")
lhotse = pytest.importorskip("lhotse")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LS_SETS = ["--train_set", "train-clean-100", "--dev_set", "dev-clean", "--test_sets", "dev-clean"]

# What `prepare librispeech` makes of the raw tree (test_corpora.LIBRI), lower case by default:
# (id, duration, text, speaker); lang is "en" throughout
RAW_LS = {
    "dev-clean": [("174-50561-0000", 1.0, "forgotten too the name of gillian", "174"),
                  ("84-121123-0000", 1.25, "go do you hear", "84"),
                  ("84-121123-0001", 1.5, "but in less than five minutes the staircase groaned",
                   "84")],
    "train-clean-100": [("19-198-0000", 1.5, "northanger abbey", "19"),
                        ("19-198-0001", 1.25, "this little work was finished in the year", "19"),
                        ("26-495-0000", 1.0, "let me see", "26"),
                        ("26-495-0001", 1.5, "the house stood on a hill", "26")]}
# What `prepare covost2` makes of test_corpora.COVOST (es→en): (id, duration, text, target,
# speaker); lang "es", target_lang "en"
RAW_COVOST = {
    "train": [("common_voice_es_1", 1.5, 'Dijo "hola" y se fue.', 'He said "hello" and left.',
               "client0"),
              ("common_voice_es_2", 1.0, "La casa es grande.", "The house is big.", "client1"),
              ("common_voice_es_3", 1.25, "Vamos a la playa.", "Let's go to the beach.",
               "client0")],
    "dev": [("common_voice_es_4", 1.0, "Hace frío hoy.", "It is cold today.", "client1")],
    "test": [("common_voice_es_5", 1.5, "El perro duerme.", "The dog sleeps.", "client0"),
             ("common_voice_es_6", 1.0, "Me gusta leer.", "I like reading.", "client1")]}


def run(recipe: str, *args) -> subprocess.CompletedProcess:
    """The recipe run with this interpreter and this checkout's lalmtool."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(["bash", f"recipes/{recipe}/run.sh", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
                               "PYTHONPATH": path})


def stage0(recipe: str, tmp_path, name: str, *args) -> str:
    """Runs only stage 0 of the recipe into tmp_path/data-NAME; returns that folder."""
    data = tmp_path / f"data-{name}"
    r = run(recipe, "--stage", 0, "--stop_stage", 0, "--exp", tmp_path / f"exp-{name}",
            "--data", data, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(data)


def manifest(data: str, set_: str) -> list[dict]:
    return read_jsonl(os.path.join(data, set_, "manifest.jsonl"))


def without_audio(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "audio"} for r in records]


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def ls_rows(root: str, subset: str) -> list[dict]:
    """The subset's utterances as rows of the Hugging Face LibriSpeech (openslr/librispeech_asr
    columns: file, audio, text, speaker_id, chapter_id, id), the audio the tree's FLAC bytes;
    in reverse id order, as a dataset need not be sorted."""
    rows = []
    for utt, (_, text) in sorted(LIBRI[subset].items(), reverse=True):
        spk, chapter, _ = utt.split("-")
        flac = os.path.join(root, subset, spk, chapter, f"{utt}.flac")
        rows.append({"file": f"{utt}.flac", "audio": {"bytes": read_bytes(flac),
                                                      "path": f"{utt}.flac"},
                     "text": text, "speaker_id": int(spk), "chapter_id": int(chapter),
                     "id": utt})
    return rows


def to_dataset(rows: list[dict]):
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    return datasets.Dataset.from_dict(cols).cast_column("audio",
                                                        datasets.Audio(sampling_rate=16000))


@pytest.fixture
def libri(tmp_path) -> tuple[str, str]:
    """(the raw tree, the data folder stage 0 of the recipe prepared from it)."""
    root = make_librispeech(tmp_path / "LibriSpeech")
    return root, stage0("librispeech", tmp_path, "raw", "--librispeech_root", root, *LS_SETS)


def test_raw_tree_manifests_are_the_reference(libri):
    root, raw = libri
    for set_, want in RAW_LS.items():
        assert manifest(raw, set_) == [
            {"id": u, "audio": os.path.join(root, set_, s, u.split("-")[1], f"{u}.flac"),
             "duration": d, "text": t, "lang": "en", "speaker": s} for u, d, t, s in want]


def test_librispeech_hf_dataset_gives_the_raw_tree_manifests(tmp_path, libri):
    """A save_to_disk copy of the HF LibriSpeech (config "all": splits train.clean.100,
    validation.clean) → the same records as the raw tree; the audio is the dataset's FLAC bytes
    written once to data/<set>/audio/<id>.flac."""
    root, raw = libri
    hf = str(tmp_path / "librispeech_asr")
    datasets.DatasetDict({"train.clean.100": to_dataset(ls_rows(root, "train-clean-100")),
                          "validation.clean": to_dataset(ls_rows(root, "dev-clean"))}
                         ).save_to_disk(hf)
    data = stage0("librispeech", tmp_path, "hf", "--hf_dataset", hf, *LS_SETS)
    for set_, want in RAW_LS.items():
        got = manifest(data, set_)
        assert [(r["id"], r["duration"], r["text"], r["lang"], r["speaker"]) for r in got] == [
            (u, d, t, "en", s) for u, d, t, s in want]
        assert without_audio(got) == without_audio(manifest(raw, set_))
        assert [r["audio"] for r in got] == [os.path.join(data, set_, "audio", f"{u}.flac")
                                             for u, _, _, _ in want]
        for mine, theirs in zip(got, manifest(raw, set_)):
            assert read_bytes(mine["audio"]) == read_bytes(theirs["audio"])


def test_librispeech_hf_parquet_of_config_clean_with_hf_splits_and_text_case_keep(tmp_path):
    """The Hub's Parquet layout of config "clean" (clean/train.100/, clean/validation/,
    clean/test/): --hf_splits maps the recipe's sets onto its split names, and each split is
    exactly its own folder (datasets' patterns alone would read train.100 as "train")."""
    root = make_librispeech(tmp_path / "LibriSpeech")
    raw = stage0("librispeech", tmp_path, "raw", "--librispeech_root", root, *LS_SETS,
                 "--text_case", "keep")
    top = tmp_path / "librispeech_asr" / "clean"
    for split, subset in (("train.100", "train-clean-100"), ("validation", "dev-clean"),
                          ("test", "dev-clean")):
        (top / split).mkdir(parents=True)
        to_dataset(ls_rows(root, subset)).to_parquet(str(top / split / "0000.parquet"))
    data = stage0("librispeech", tmp_path, "pq", "--hf_dataset", top, *LS_SETS,
                  "--hf_splits", "train-clean-100=train.100 dev-clean=validation",
                  "--text_case", "keep")
    assert [r["text"] for r in manifest(data, "dev-clean")] == [
        "FORGOTTEN TOO THE NAME OF GILLIAN", "GO DO YOU HEAR",
        "BUT IN LESS THAN FIVE MINUTES THE STAIRCASE GROANED"]
    for set_ in RAW_LS:
        assert without_audio(manifest(data, set_)) == without_audio(manifest(raw, set_))


def test_librispeech_hf_split_missing_from_the_default_map_is_named(tmp_path):
    root = make_librispeech(tmp_path / "LibriSpeech", {"dev-clean": LIBRI["dev-clean"]})
    hf = str(tmp_path / "hf")
    datasets.DatasetDict({"validation.clean": to_dataset(ls_rows(root, "dev-clean"))}
                         ).save_to_disk(hf)
    r = run("librispeech", "--stop_stage", 0, "--hf_dataset", hf, "--train_set", "dev-clean",
            "--dev_set", "dev-clean", "--test_sets", "test-other", "--exp", tmp_path / "exp",
            "--data", tmp_path / "data")
    assert r.returncode == 1
    assert "stage 0: test-other from split test.other of " + hf in r.stdout
    assert f"{hf}: no split 'test.other' (it holds: validation.clean)" in r.stderr


def test_librispeech_lhotse_manifests_give_the_raw_tree_manifests(tmp_path, libri):
    """What `lhotse prepare librispeech` writes (recordings + supervisions, upper case, language
    "English") and icefall's CutSets of them (cut ids <utt>-<n>), as a directory or as a {set}
    pattern: the same records as the raw tree, the audio the tree's own files."""
    from lhotse.recipes import prepare_librispeech

    root, raw = libri
    manifests = tmp_path / "manifests"
    parts = prepare_librispeech(root, dataset_parts=list(RAW_LS), output_dir=str(manifests),
                                num_jobs=1)
    assert sorted(os.listdir(manifests)) == [
        "librispeech_recordings_dev-clean.jsonl.gz",
        "librispeech_recordings_train-clean-100.jsonl.gz",
        "librispeech_supervisions_dev-clean.jsonl.gz",
        "librispeech_supervisions_train-clean-100.jsonl.gz"]
    fbank = tmp_path / "fbank"
    fbank.mkdir()
    for set_ in RAW_LS:
        lhotse.CutSet.from_manifests(**parts[set_]).to_file(
            str(fbank / f"librispeech_cuts_{set_}.jsonl.gz"))
    assert sorted(c.id for c in lhotse.CutSet.from_file(
        str(fbank / "librispeech_cuts_dev-clean.jsonl.gz"))) == [
        "174-50561-0000-2", "84-121123-0000-0", "84-121123-0001-1"]
    for name, source in (("sup", manifests), ("cuts", fbank),
                         ("pattern", f"{fbank}/librispeech_cuts_{{set}}.jsonl.gz")):
        data = stage0("librispeech", tmp_path, name, "--lhotse_cuts", source, *LS_SETS)
        for set_ in RAW_LS:
            assert manifest(data, set_) == manifest(raw, set_), (name, set_)
    data = stage0("librispeech", tmp_path, "cut-ids", "--lhotse_cuts", fbank, *LS_SETS,
                  "--lhotse_ids", "cut")
    assert [r["id"] for r in manifest(data, "dev-clean")] == [
        "174-50561-0000-2", "84-121123-0000-0", "84-121123-0001-1"]


@pytest.fixture
def covost(tmp_path) -> tuple[str, str]:
    """(the Common Voice clips folder, the data folder stage 0 prepared from clips + TSV)."""
    cv, tsv = make_covost(tmp_path)
    return os.path.join(cv, "clips"), stage0("covost2", tmp_path, "raw", "--cv_root", cv,
                                             "--covost_root", tsv)


def covost_rows(clips: str, split: str) -> list[dict]:
    """COVOST's rows of one split (train_covost in train) as rows of facebook/covost2 (client_id,
    file, audio, sentence, translation, id), the audio the clip's MP3 bytes."""
    want = ("train", "train_covost") if split == "train" else (split,)
    return [{"client_id": f"client{i % 2}", "file": clip,
             "audio": {"bytes": read_bytes(os.path.join(clips, clip)), "path": clip},
             "sentence": sent, "translation": trans, "id": clip[:-len(".mp3")]}
            for i, (clip, sent, trans, s, _) in enumerate(COVOST) if s in want]


def test_raw_covost_manifests_are_the_reference(covost):
    clips, raw = covost
    for set_, want in RAW_COVOST.items():
        assert manifest(raw, set_) == [
            {"id": u, "audio": os.path.join(clips, f"{u}.mp3"), "duration": d, "text": t,
             "target": g, "lang": "es", "target_lang": "en", "speaker": s}
            for u, d, t, g, s in want]


def test_covost2_hf_dataset_gives_the_raw_manifests(tmp_path, covost):
    clips, raw = covost
    hf = str(tmp_path / "covost2_es_en")
    datasets.DatasetDict({"train": to_dataset(covost_rows(clips, "train")),
                          "validation": to_dataset(covost_rows(clips, "dev")),
                          "test": to_dataset(covost_rows(clips, "test"))}).save_to_disk(hf)
    data = stage0("covost2", tmp_path, "hf", "--hf_dataset", hf)
    for set_, want in RAW_COVOST.items():
        got = manifest(data, set_)
        assert [(r["id"], r["duration"], r["text"], r["target"], r["speaker"]) for r in got] \
            == want
        assert without_audio(got) == without_audio(manifest(raw, set_))
        assert [r["audio"] for r in got] == [os.path.join(data, set_, "audio", f"{u}.mp3")
                                             for u, *_ in want]
        for r in got:
            assert read_bytes(r["audio"]) == read_bytes(os.path.join(clips, r["id"] + ".mp3"))


def covost_cuts(clips: str, split: str, path: str, target_key: str = "target") -> str:
    """COVOST's rows of a split as a CutSet (lhotse's from_manifests: cut ids <clip>-<n>; the
    translation in the supervision's custom[target_key], the language as a name)."""
    recs, sups = [], []
    for row in covost_rows(clips, split):
        rec = lhotse.Recording.from_file(os.path.join(clips, row["file"]), recording_id=row["id"])
        recs.append(rec)
        sups.append(lhotse.SupervisionSegment(
            id=row["id"], recording_id=row["id"], start=0.0, duration=rec.duration,
            text=row["sentence"], language="Spanish", speaker=row["client_id"],
            custom={target_key: row["translation"]}))
    lhotse.CutSet.from_manifests(recordings=lhotse.RecordingSet.from_recordings(recs),
                                 supervisions=lhotse.SupervisionSet.from_segments(sups)
                                 ).to_file(path)
    return path


def test_covost2_lhotse_cuts_give_the_raw_manifests(tmp_path, covost):
    clips, raw = covost
    words = " ".join(f"{s}={covost_cuts(clips, s, str(tmp_path / f'{s}.jsonl.gz'))}"
                     for s in RAW_COVOST)
    data = stage0("covost2", tmp_path, "lhotse", "--lhotse_cuts", words)
    for set_ in RAW_COVOST:
        assert manifest(data, set_) == manifest(raw, set_), set_
    (tmp_path / "dir").mkdir()
    for s in RAW_COVOST:  # the translation under another key: named, or read with the option
        covost_cuts(clips, s, str(tmp_path / "dir" / f"covost2_cuts_{s}.jsonl.gz"), "translation")
    r = run("covost2", "--stop_stage", 0, "--lhotse_cuts", tmp_path / "dir", "--exp",
            tmp_path / "exp-x", "--data", tmp_path / "data-x")
    assert r.returncode == 1
    cuts = tmp_path / "dir" / "covost2_cuts_train.jsonl.gz"
    assert (f"{cuts}:1: cut common_voice_es_1-0: no translation (the supervision's custom "
            "'target')") in r.stderr
    data = stage0("covost2", tmp_path, "key", "--lhotse_cuts", tmp_path / "dir",
                  "--lhotse_target_key", "translation")
    for set_ in RAW_COVOST:
        assert manifest(data, set_) == manifest(raw, set_), set_


@pytest.mark.parametrize("recipe,args,error", [
    ("librispeech", ["--librispeech_root", "/x", "--hf_dataset", "/y"],
     "stage 0 reads one corpus source, got --librispeech_root and --hf_dataset: give only one "
     "of them"),
    ("covost2", ["--cv_root", "/x", "--covost_root", "/y", "--lhotse_cuts", "/z"],
     "stage 0 reads one corpus source, got --cv_root --covost_root and --lhotse_cuts: give "
     "only one of them"),
    ("librispeech", ["--hf_dataset", "/no/such/dataset"],
     "stage 0: --hf_dataset /no/such/dataset not found (give a local dataset: a save_to_disk "
     "directory or Parquet/Arrow files; nothing is downloaded)"),
    ("covost2", ["--lhotse_cuts", "dev=/no/b.jsonl.gz test=/no/c.jsonl.gz"],
     "stage 0: --lhotse_cuts names no CutSet for set train (give train=FILE among its set=FILE "
     "words)"),
    ("covost2", ["--lhotse_cuts", "/no/cuts_{set}.jsonl.gz"],
     "stage 0: lhotse CutSet of set train not found: /no/cuts_train.jsonl.gz"),
])
def test_source_options_errors_are_one_line(tmp_path, recipe, args, error):
    r = run(recipe, "--stop_stage", 0, *args, "--exp", tmp_path / "exp", "--data",
            tmp_path / "data")
    assert (r.returncode, r.stderr.splitlines()[-1]) == (1, error)
    assert not os.path.exists(tmp_path / "data")


def test_librispeech_lhotse_directory_without_a_sets_manifests_names_them(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "librispeech_cuts_dev-clean.jsonl.gz").write_bytes(b"")
    r = run("librispeech", "--stop_stage", 0, "--lhotse_cuts", tmp_path / "m", *LS_SETS,
            "--exp", tmp_path / "exp", "--data", tmp_path / "data")
    assert (r.returncode, r.stderr.splitlines()[-1]) == (1, (
        f"stage 0: no lhotse manifests of set train-clean-100 in {tmp_path}/m (looked for "
        "librispeech_cuts_train-clean-100.jsonl.gz, or "
        "librispeech_recordings_train-clean-100.jsonl.gz and "
        "librispeech_supervisions_train-clean-100.jsonl.gz)"))
    assert not os.path.exists(tmp_path / "data")


def test_lhotse_ids_supervision_needs_one_supervision_per_cut(tmp_path):
    from lalmtool.corpora import CorpusError
    from lalmtool.corpora.lhotse_io import prepare_lhotse

    root = make_librispeech(tmp_path / "LS", {"dev-clean": LIBRI["dev-clean"]})
    wav = os.path.join(root, "dev-clean", "84", "121123", "84-121123-0001.flac")
    rec = lhotse.Recording.from_file(wav, recording_id="r")
    sups = [lhotse.SupervisionSegment(id=f"s{i}", recording_id="r", start=0.5 * i, duration=0.5,
                                      text=t) for i, t in enumerate(["BUT IN", "LESS"])]
    cuts = str(tmp_path / "c.jsonl")
    lhotse.CutSet.from_cuts([
        lhotse.MonoCut(id="two", start=0.0, duration=1.5, channel=0, recording=rec,
                       supervisions=sups),
        lhotse.MonoCut(id="one", start=0.0, duration=1.5, channel=0, recording=rec,
                       supervisions=sups[1:])]).to_file(cuts)
    with pytest.raises(CorpusError) as e:
        prepare_lhotse(str(tmp_path / "o"), cuts=cuts, ids="supervision")
    assert [str(p) for p in e.value.problems] == [
        f"{cuts}:1: cut two: has 2 supervisions; naming utterances by their supervision needs "
        "one per cut"]
    s = prepare_lhotse(str(tmp_path / "o"), cuts=cuts, ids="supervision", on_error="skip",
                       text_case="lower", lang="en")
    assert (s["utterances"], s["skipped"]) == (1, 1)
    assert read_jsonl(tmp_path / "o" / "manifest.jsonl") == [
        {"id": "s1", "audio": wav, "duration": 1.5, "text": "less", "lang": "en"}]
