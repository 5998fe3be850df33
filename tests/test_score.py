"""Tests of lalmtool.score: WER (jiwer), normalizers, alignments, BLEU/chrF (sacrebleu), bad inputs."""
import json
import os

import jiwer
import pytest
from sacrebleu.metrics import BLEU, CHRF

from lalmtool.score import english_spelling_map, format_alignment, score, wer_counts


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def make(tmp_path, refs, hyps, decode=None):
    """A decode directory with hyp.jsonl (+ decode.json) and a manifest; returns (hyp, manifest)."""
    dec = tmp_path / "dec"
    dec.mkdir(exist_ok=True)
    manifest = write_jsonl(tmp_path / "manifest.jsonl",
                           [{"id": u, "audio": f"{u}.wav", **r} for u, r in refs.items()])
    hyp = write_jsonl(dec / "hyp.jsonl", [{"id": u, "hyp": h} for u, h in hyps.items()])
    if decode is not None:
        (dec / "decode.json").write_text(json.dumps(decode))
    return hyp, manifest


# --------------------------------------------------------------------------- WER numbers

def test_hand_computed_wer(tmp_path):
    hyp, ref = make(tmp_path, {"u1": {"text": "the cat sat on the mat"}},
                    {"u1": "the cat sit on mat"})
    res = score(hyp, ref, normalizer="none")
    assert (res["sub"], res["del"], res["ins"], res["hits"], res["ref_words"]) == (1, 1, 0, 4, 6)
    assert res["wer"] == pytest.approx(2 / 6)
    assert res["wer_pct"] == pytest.approx(100 * 2 / 6)
    assert res["sentences"] == 1 and res["sentence_errors"] == 1 and res["ser"] == 1.0


def test_reproduces_jiwer_corpus_numbers(tmp_path):
    pairs = {
        "a": ("the quick brown fox jumps over the lazy dog", "the quick brown fox jumped over a lazy dog"),
        "b": ("hello world", "hello there big world"),
        "c": ("one two three four five", "one three four five six seven"),
        "d": ("nothing wrong here", "nothing wrong here"),
        "e": ("short", ""),
    }
    hyp, ref = make(tmp_path, {u: {"text": r} for u, (r, _) in pairs.items()},
                    {u: h for u, (_, h) in pairs.items()})
    res = score(hyp, ref, normalizer="none")
    out = jiwer.process_words([r for r, _ in pairs.values()], [h for _, h in pairs.values()])
    assert res["wer"] == pytest.approx(out.wer)
    assert (res["sub"], res["del"], res["ins"], res["hits"]) == (
        out.substitutions, out.deletions, out.insertions, out.hits)
    assert res["wer"] == pytest.approx((res["sub"] + res["del"] + res["ins"]) / res["ref_words"])
    per_utt = [json.loads(line) for line in open(res["per_utt"])]
    errors = out.substitutions + out.deletions + out.insertions
    assert sum(u["sub"] + u["del"] + u["ins"] for u in per_utt) == errors
    assert sum(u["ref_words"] for u in per_utt) == res["ref_words"]
    assert res["sentence_errors"] == 4


def test_whisper_english_normalizer_applied_and_recorded(tmp_path):
    hyp, ref = make(tmp_path, {"u1": {"text": "Mr. Smith's colour", "lang": "en"}},
                    {"u1": "mister smith's color"})
    res = score(hyp, ref)  # auto → whisper_english (English)
    assert res["normalizer"] == "whisper_english"
    assert res["wer"] == 0.0
    on_disk = json.loads((tmp_path / "dec" / "results.json").read_text())
    assert on_disk["normalizer"] == "whisper_english"
    assert "normalizer: whisper_english" in (tmp_path / "dec" / "result.txt").read_text()
    raw = score(hyp, ref, normalizer="none")
    assert raw["normalizer"] == "none" and raw["wer"] > 0


def test_auto_uses_basic_normalizer_for_other_languages(tmp_path):
    hyp, ref = make(tmp_path, {"u1": {"text": "Ça va, très bien!", "lang": "fr"},
                               "u2": {"text": "hello", "lang": "en"}},
                    {"u1": "ça va très bien", "u2": "Hello."})
    res = score(hyp, ref)
    assert res["normalizer"] == "basic"
    assert res["wer"] == 0.0


def test_english_spelling_map_is_vendored():
    spelling = english_spelling_map()
    assert len(spelling) == 1739
    assert spelling["colour"] == "color"


def test_unknown_normalizer_and_metric(tmp_path):
    hyp, ref = make(tmp_path, {"u1": {"text": "a"}}, {"u1": "a"})
    with pytest.raises(ValueError, match="unknown normalizer"):
        score(hyp, ref, normalizer="lowercase")
    with pytest.raises(ValueError, match="unknown metric"):
        score(hyp, ref, metric="cer")


# --------------------------------------------------------------------------- bad and edge inputs

def test_hyp_ids_not_in_manifest_are_an_error(tmp_path):
    hyp, ref = make(tmp_path, {"u1": {"text": "a b"}}, {"u1": "a b", "stray-7": "c"})
    with pytest.raises(ValueError, match="stray-7") as e:
        score(hyp, ref)
    assert "not in the reference manifest" in str(e.value)


def test_missing_hypotheses_fail_or_count_as_empty(tmp_path):
    hyp, ref = make(tmp_path, {"u1": {"text": "a b"}, "u2": {"text": "c d e"}}, {"u1": "a b"})
    with pytest.raises(ValueError, match="u2") as e:
        score(hyp, ref)
    assert "no hypothesis" in str(e.value) and "--missing empty" in str(e.value)
    res = score(hyp, ref, on_missing="empty", normalizer="none")
    assert (res["sub"], res["del"], res["ins"], res["ref_words"]) == (0, 3, 0, 5)
    assert res["missing_hyps"] == 1
    per_utt = {u["id"]: u for u in map(json.loads, open(res["per_utt"]))}
    assert per_utt["u2"]["missing_hyp"] is True and per_utt["u2"]["del"] == 3
    with pytest.raises(ValueError, match="on_missing"):
        score(hyp, ref, on_missing="skip")


def test_empty_hypothesis_is_all_deletions(tmp_path):
    hyp, ref = make(tmp_path, {"u1": {"text": "one two three"}, "u2": {"text": "four"}},
                    {"u1": "", "u2": "four"})
    res = score(hyp, ref, normalizer="none")
    assert (res["sub"], res["del"], res["ins"], res["hits"]) == (0, 3, 0, 1)
    assert res["wer"] == pytest.approx(3 / 4)


def test_null_absent_or_non_string_hypothesis_is_a_missing_one(tmp_path):
    """R9: ``"hyp": null`` was scored as an empty hypothesis although missing ones fail."""
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": u, "audio": "x", "text": "a b"}
                                                  for u in ("u1", "u2", "u3", "u4")])
    hyp = write_jsonl(tmp_path / "hyp.jsonl", [{"id": "u1", "hyp": None}, {"id": "u2"},
                                               {"id": "u3", "hyp": 7}, {"id": "u4", "hyp": "a b"}])
    with pytest.raises(ValueError) as e:
        score(hyp, manifest, normalizer="none")
    assert str(e.value) == (
        f"{hyp}: 3 record(s) carry no hypothesis: u1 (line 1: hyp null), u2 (line 2: no 'hyp'), "
        "u3 (line 3: hyp 7, not a string); decode these utterances again, or pass "
        "on_missing='empty' (`lalmtool score --missing empty`) to count them as empty "
        "hypotheses (all deletions)")
    res = score(hyp, manifest, normalizer="none", on_missing="empty")
    assert (res["del"], res["hits"], res["missing_hyps"]) == (6, 2, 3)
    per_utt = [json.loads(line) for line in open(res["per_utt"])]
    assert [(u["id"], u["hyp"], u.get("missing_hyp")) for u in per_utt] == [
        ("u1", "", True), ("u2", "", True), ("u3", "", True), ("u4", "a b", None)]


def test_reference_empty_after_normalization_counts_insertions(tmp_path):
    # Whisper's English normalizer removes fillers: "uh" normalizes to nothing
    hyp, ref = make(tmp_path, {"u1": {"text": "Uh."}, "u2": {"text": "the cat sat"}},
                    {"u1": "hello world", "u2": "the cat sat"})
    res = score(hyp, ref, normalizer="whisper_english")
    assert (res["sub"], res["del"], res["ins"], res["hits"], res["ref_words"]) == (0, 0, 2, 3, 3)
    assert res["wer"] == pytest.approx(2 / 3)
    per_utt = {u["id"]: u for u in map(json.loads, open(res["per_utt"]))}
    assert per_utt["u1"]["ins"] == 2 and per_utt["u1"]["ref_words"] == 0
    assert per_utt["u1"]["wer"] is None
    text = (tmp_path / "dec" / "alignments.txt").read_text()
    assert "REF:  ***   ***" in text and "HYP:  HELLO WORLD" in text


def test_all_references_empty_is_an_error(tmp_path):
    hyp, ref = make(tmp_path, {"u1": {"text": ""}}, {"u1": "words"})
    with pytest.raises(ValueError, match="WER is undefined"):
        score(hyp, ref)


def test_wer_counts_empty_reference_directly():
    total, per_utt = wer_counts(["a b", ""], ["a c", "x y z"])
    assert (total["sub"], total["del"], total["ins"], total["ref_words"]) == (1, 0, 3, 2)
    assert total["wer"] == pytest.approx(2.0)


def test_duplicate_hyp_ids_are_an_error(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "u1", "audio": "x", "text": "a"}])
    hyp = write_jsonl(tmp_path / "hyp.jsonl", [{"id": "u1", "hyp": "a"}, {"id": "u1", "hyp": "b"}])
    with pytest.raises(ValueError, match="duplicate utterance id.*u1 \\(line 2\\)"):
        score(hyp, manifest)


def test_bad_json_line_names_file_and_line(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "u1", "audio": "x", "text": "a"}])
    hyp = tmp_path / "hyp.jsonl"
    hyp.write_text('{"id": "u1", "hyp": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON") as e:
        score(str(hyp), manifest)
    assert str(hyp) in str(e.value)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="hypothesis file not found"):
        score(str(tmp_path / "nope.jsonl"), str(tmp_path / "m.jsonl"))


# --------------------------------------------------------------------------- output files

def test_alignment_file_for_known_case(tmp_path):
    hyp, ref = make(tmp_path, {"u1": {"text": "the cat sat on the mat"}},
                    {"u1": "the cat sit on mat"})
    score(hyp, ref, normalizer="none")
    text = (tmp_path / "dec" / "alignments.txt").read_text()
    block = ("id: (u1)\n"
             "Scores: (#C #S #D #I) 4 1 1 0   ref words 6, WER 33.3%\n"
             "REF:  the cat SAT on THE mat\n"
             "HYP:  the cat SIT on *** mat\n"
             "Eval:         S      D\n")
    assert block in text
    assert "normalizer: none" in text.splitlines()[0]


def test_alignment_with_insertion_and_wide_words():
    _, per_utt = wer_counts(["a b c"], ["a longword b see"])
    assert format_alignment("x", per_utt[0]).splitlines()[2:5] == [
        "REF:  a ***      b C",
        "HYP:  a LONGWORD b SEE",
        "Eval:   I          S",
    ]


def test_results_json_carries_decode_facts(tmp_path):
    decode = {"set": "test-clean", "method": "uniform", "params": {"k": 3, "reduce": "mean"},
              "condition": "uniform-mean-k3", "feats": "exp/pooled/x", "model": "tiny.en",
              "adapter": None, "lora": False, "tokens_per_s": 16.7, "source_frame_rate": 50.0,
              "compression_ratio": 3.0, "utt_per_s": 2.5}
    hyp, ref = make(tmp_path, {"u1": {"text": "a b"}}, {"u1": "a b"}, decode=decode)
    res = score(hyp, ref)
    for k, v in decode.items():
        assert res[k] == v
    assert res["hyp"] == os.path.abspath(hyp) and res["ref"] == os.path.abspath(ref)
    assert res["metric"] == "wer"
    txt = (tmp_path / "dec" / "result.txt").read_text()
    assert "tokens/s fed to the decoder: 16.70" in txt
    assert "compression ratio: 3.00x" in txt and "2.500 utt/s" in txt
    assert sorted(os.listdir(tmp_path / "dec")) == [
        "alignments.txt", "decode.json", "hyp.jsonl", "per_utt.jsonl", "result.txt", "results.json"]


def test_decode_facts_from_hyp_records_when_decode_json_lacks_them(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "u1", "audio": "x", "text": "a"},
                                                  {"id": "u2", "audio": "y", "text": "b"}])
    (tmp_path / "decode.json").write_text(json.dumps({"source_frame_rate": 50.0}))
    hyp = write_jsonl(tmp_path / "hyp.jsonl", [
        {"id": "u1", "hyp": "a", "tokens": 30, "duration": 2.0, "seconds": 1.0},
        {"id": "u2", "hyp": "b", "tokens": 20, "duration": 3.0, "seconds": 3.0}])
    res = score(hyp, manifest)
    assert res["tokens_per_s"] == pytest.approx(10.0)
    assert res["compression_ratio"] == pytest.approx(5.0)
    assert res["utt_per_s"] == pytest.approx(0.5)


def test_out_dir(tmp_path):
    hyp, ref = make(tmp_path, {"u1": {"text": "a"}}, {"u1": "a"})
    score(hyp, ref, out_dir=str(tmp_path / "scores"))
    assert sorted(os.listdir(tmp_path / "scores")) == [
        "alignments.txt", "per_utt.jsonl", "result.txt", "results.json"]
    assert not (tmp_path / "dec" / "results.json").exists()


# --------------------------------------------------------------------------- BLEU / chrF

BLEU_REFS = {"u1": "Die Katze sitzt auf der Matte.", "u2": "Guten Morgen, wie geht es dir?",
             "u3": "Das ist ein Test."}
BLEU_HYPS = {"u1": "Die Katze sitzt auf einer Matte.", "u2": "Guten Morgen, wie geht's?", "u3": ""}


def test_bleu_and_chrf_equal_sacrebleu(tmp_path):
    hyp, ref = make(tmp_path, {u: {"text": "source", "target": t} for u, t in BLEU_REFS.items()},
                    BLEU_HYPS)
    res = score(hyp, ref, metric="bleu")
    sys_out, refs = list(BLEU_HYPS.values()), [list(BLEU_REFS.values())]
    bleu, chrf = BLEU(), CHRF()
    assert res["bleu"] == pytest.approx(bleu.corpus_score(sys_out, refs).score)
    assert res["chrf"] == pytest.approx(chrf.corpus_score(sys_out, refs).score)
    assert res["bleu_signature"] == str(bleu.get_signature())
    assert res["chrf_signature"] == str(chrf.get_signature())
    assert "tok:13a" in res["bleu_signature"] and res["metric"] == "bleu"
    txt = (tmp_path / "dec" / "result.txt").read_text()
    assert res["bleu_signature"] in txt and res["chrf_signature"] in txt
    assert len(open(res["per_utt"]).readlines()) == 3


def test_bleu_tokenize_option(tmp_path):
    hyp, ref = make(tmp_path, {u: {"text": "s", "target": t} for u, t in BLEU_REFS.items()},
                    BLEU_HYPS)
    res = score(hyp, ref, metric="bleu", tokenize="char")
    bleu = BLEU(tokenize="char")
    assert res["bleu"] == pytest.approx(
        bleu.corpus_score(list(BLEU_HYPS.values()), [list(BLEU_REFS.values())]).score)
    assert "tok:char" in res["bleu_signature"]
    with pytest.raises(ValueError, match="tokenize"):
        score(hyp, ref, metric="wer", tokenize="char")


def test_missing_target_is_an_error_naming_the_utterance(tmp_path):
    hyp, ref = make(tmp_path, {"u1": {"text": "a", "target": "A"}, "u2": {"text": "b"}},
                    {"u1": "A", "u2": "B"})
    with pytest.raises(ValueError, match="lack a 'target'.*u2") as e:
        score(hyp, ref, metric="bleu")
    assert "u1" not in str(e.value).split(":")[-1]
