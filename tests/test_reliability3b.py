"""Round three of trying to break lalmtool (FAULTS.md, round 3), second part: contradictions
refused before OUT is made (T9, T17, T25, T28), clear messages (T24, T26, T27), what a run's
config, a report row and a manifest's hours stand for (T7, T15, T29)."""
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import soundfile as sf

from conftest import snapshot, tone, write_manifest
from lalmtool.pool import pool_store
from lalmtool.report import report
from lalmtool.score import score
from lalmtool.store import StoreError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(max_steps=1, batch_size=2, warmup_steps=0, lora_r=2)


@pytest.fixture
def learnt(decoded, audio_set, tiny_whisper_lm, tmp_path):
    """Frames, their uniform k=2 boundaries, and an adapter with a learnt pooler of 8 heads
    trained on them."""
    from lalmtool.finetune import TrainConfig, finetune

    feats, _, _ = decoded
    seg = str(tmp_path / "seg")
    adapter = finetune(feats, audio_set, tiny_whisper_lm, str(tmp_path / "learnt"),
                       TrainConfig(**CFG, pooler_heads=8), segments=seg)["adapter"]
    return feats, seg, adapter


def test_a_run_continued_from_a_pooler_records_the_shape_it_trains(  # T7
        learnt, audio_set, tiny_whisper_lm, tmp_path, caplog):
    """The pooler of --init-adapter is continued as it is (tests/test_learnt_pooler.py relies on
    it), so config.yaml and run.json say its shape, not the options' other one, and say so."""
    import yaml

    from lalmtool.finetune import TrainConfig, finetune

    feats, seg, adapter = learnt
    out = tmp_path / "again"
    with caplog.at_level(logging.WARNING, logger="lalmtool"):
        summary = finetune(feats, audio_set, tiny_whisper_lm, str(out),
                           TrainConfig(**CFG, pooler_heads=4), segments=seg, init_adapter=adapter)
    width = json.loads((tmp_path / "learnt" / "adapter" / "lalmtool.json").read_text())[
        "pooler"]["width"]
    assert [r.getMessage() for r in caplog.records if "--init-adapter" in r.getMessage()] == [
        f"finetune: --init-adapter {adapter} holds a learnt pooler of pooler_heads=8, the "
        "training options said pooler_heads=4: a run continued from it trains that pooler as it "
        "is, so config.yaml and run.json record the adapter's (drop --init-adapter for a new "
        "pooler of the options' shape)"]
    assert summary["pooler"]["heads"] == 8
    config = yaml.safe_load((out / "config.yaml").read_text())
    recorded = json.loads((out / "run.json").read_text())["config"]
    for said in (config, recorded):
        assert (said["pooler_heads"], said["pooler_rank"], said["pooler_width"]) == (8, 64, width)
    # the same command again is the same run: finished, nothing to do
    again = finetune(feats, audio_set, tiny_whisper_lm, str(out),
                     TrainConfig(**CFG, pooler_heads=4), segments=seg, init_adapter=adapter)
    assert again["steps"] == summary["steps"]


def test_a_teacher_trained_on_pooled_tokens_is_refused_by_name(  # T9
        decoded, audio_set, tiny_whisper_lm, tmp_path):
    from lalmtool.finetune import TrainConfig, finetune

    feats, pooled, _ = decoded
    adapter = finetune(pooled, audio_set, tiny_whisper_lm, str(tmp_path / "pooled-lora"),
                       TrainConfig(**CFG))["adapter"]
    out = tmp_path / "kd"
    with pytest.raises(ValueError) as err:
        finetune(feats, audio_set, tiny_whisper_lm, str(out), TrainConfig(**CFG, distill=0.5),
                 segments=str(tmp_path / "seg"), teacher=adapter)
    assert str(err.value) == (
        f"--teacher {adapter} was trained on pooled tokens (uniform-mean-k2, "
        f"{os.path.join(adapter, 'lalmtool.json')}), not on frames: the teacher reads the "
        "frames the learnt pooler pools; give the adapter of a finetune run on the frames (the "
        "frames condition's)")
    assert not out.exists()


def test_report_marks_a_row_scored_with_missing_hypotheses(tmp_path):  # T15
    rows = [{"id": f"u{i}", "text": f"word {i}"} for i in range(6)]
    ref = write_manifest(tmp_path / "ref.jsonl", [{**r, "audio": "x.wav"} for r in rows])
    for name, present in (("half", rows[:3]), ("whole", rows)):
        d = tmp_path / "exp" / name / "test"
        d.mkdir(parents=True)
        write_manifest(d / "hyp.jsonl", [{"id": r["id"], "hyp": r["text"]} for r in present])
        score(str(d / "hyp.jsonl"), ref, normalizer="none", on_missing="empty")
    got = report(str(tmp_path / "exp"))
    assert [r["missing_hyps"] for r in got] == [3, 0]
    md = (tmp_path / "exp" / "RESULTS.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| 1 |") or
             line.startswith("| 2 |")][:2]
    assert table[0].endswith("| – | 6 (3 missing) | WER, normalizer `none` |")
    assert table[1].endswith("| – | 6 | WER, normalizer `none` |")
    assert ("**Incomplete decodes**: row 1: 3 of 6 utterances had no hypothesis. They were "
            "scored as empty hypotheses (`lalmtool score --missing empty`), so these scores are "
            "not those of a complete decode; decode the missing utterances and score again."
            ) in md


def test_finetune_refuses_a_boundary_store_as_feats_before_out(  # T17
        decoded, audio_set, tiny_whisper_lm, tmp_path):
    from lalmtool.finetune import TrainConfig, finetune

    feats, _, _ = decoded
    seg = str(tmp_path / "seg")
    out = tmp_path / "lora"
    with pytest.raises(StoreError) as err:
        finetune(seg, audio_set, tiny_whisper_lm, str(out), TrainConfig(**CFG))
    assert str(err.value) == (
        f"--feats {seg} is a boundary store (from `lalmtool segment`): it holds segment starts, "
        "not features; --feats must be a feature store (frames from `lalmtool extract`, or "
        "pooled features from `lalmtool pool`). Pool it first: lalmtool pool --feats "
        f"{os.path.abspath(feats)} --segments {seg} --out <pooled store>")
    assert not out.exists()


def test_chunked_pieces_that_do_not_fit_name_the_compression_not_chunking(tmp_path):  # T24
    from lalmtool.decode import decode, plan_pieces
    from lalmtool.extract import extract
    from lalmtool.models.qwen2_audio import Qwen2AudioBackend
    from lalmtool.testing import write_random_qwen2_audio

    path = write_random_qwen2_audio(str(tmp_path / "q"), max_positions=128)
    sf.write(tmp_path / "0.wav", tone(4.0), 16000)
    m = write_manifest(tmp_path / "m.jsonl", [{"id": "t0", "audio": "0.wav", "text": "the hen"}])
    frames = extract(m, path, str(tmp_path / "frames"), backend="qwen2-audio")["store"]
    with pytest.raises(ValueError) as err:
        decode(frames, path, str(tmp_path / "d"), backend="qwen2-audio", max_new_tokens=8,
               too_long="chunk")
    assert str(err.value) == (
        f"utterance 't0' of {frames} needs 155 positions (prompt + 100 audio tokens + up to 8 "
        f"new tokens), more than the 128 that {path}'s decoder holds (max_position_embeddings); "
        "30 s pieces (--too-long chunk; at 4 s it is one piece) do not fit either: 2x fewer "
        "audio tokens would fit (uniform pooling of the frames by k=2)")
    assert not os.path.exists(tmp_path / "d" / "hyp.jsonl")
    # 70 s of 25 Hz frames, cut into 30 s pieces for a decoder of 512 positions
    be = Qwen2AudioBackend(write_random_qwen2_audio(str(tmp_path / "q512"), max_positions=512))
    with pytest.raises(ValueError) as err:
        plan_pieces(be, 1750, 70.0, 0, None, "chunk", "M", "utterance 'x'", 1)
    assert str(err.value) == (
        "utterance 'x', piece 1 of 3 (0-30 s) needs 888 positions (prompt + 750 audio tokens + "
        "~91 (its 30 s at ~3 tokens per second of speech) new tokens), more than the 512 that "
        "M's decoder holds (max_position_embeddings); 30 s pieces (--too-long chunk) do not fit "
        "either: 3x fewer audio tokens would fit (uniform pooling of the frames by k=3)")


def test_pool_refuses_a_boundary_store_as_feats(decoded, tmp_path):  # T25
    seg = str(tmp_path / "seg")
    with pytest.raises(StoreError) as err:
        pool_store(seg, seg, "mean", str(tmp_path / "p"))
    assert str(err.value).startswith(
        f"--feats {seg} is a boundary store (from `lalmtool segment`): it holds segment starts, "
        "not features; --feats must be a feature store (frames from `lalmtool extract`, or "
        "pooled features from `lalmtool pool`). Pool it first:")
    assert "rerun `lalmtool segment`" not in str(err.value)
    assert not (tmp_path / "p").exists()


def test_score_and_report_under_a_directory_that_is_not_utf8(tmp_path):  # T26
    top = os.fsdecode(os.fsencode(str(tmp_path)) + b"/exp/dir\xff")
    os.makedirs(os.path.join(top, "test"))
    hyp = os.path.join(top, "test", "hyp.jsonl")
    ref = write_manifest(tmp_path / "ref.jsonl", [{"id": "a", "audio": "a.wav", "text": "x y"}])
    write_manifest(hyp, [{"id": "a", "hyp": "x z"}])
    res = score(hyp, ref, normalizer="none")
    assert res["wer"] == 0.5
    with open(os.path.join(top, "test", "results.json"), encoding="utf-8") as fh:
        assert json.load(fh)["hyp"] == hyp  # written escaped, read back as the same path
    with open(os.path.join(top, "test", "result.txt"), encoding="utf-8") as fh:
        assert fh.readline() == f"hyp:        {tmp_path}/exp/dir\\xff/test/hyp.jsonl\n"
    rows = report(os.path.join(str(tmp_path), "exp"))
    assert rows[0]["hyp"] == hyp and rows[0]["wer_pct"] == 50.0
    md = (tmp_path / "exp" / "RESULTS.md").read_text(encoding="utf-8")
    assert "| 1 | dir\\xff/test/hyp.jsonl |" in md


def test_recipe_stage_6_without_decodes_says_to_run_stage_5(tmp_path):  # T27
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "model_path").write_text("/nonexistent\n")
    r = subprocess.run(["bash", "recipes/mini/run.sh", "--stage", "6", "--stop_stage", "6",
                        "--exp", str(exp)], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 1
    assert r.stderr == f"[mini] no decodes under {exp}/decode: run stage 5 first\n"


def test_pool_refuses_an_out_in_the_poolers_adapter_directory(learnt, tmp_path):  # T28
    feats, seg, adapter = learnt
    before = snapshot(adapter)
    for out, where in ((adapter, "is"), (os.path.join(adapter, "pooled"), "lies inside")):
        with pytest.raises(ValueError) as err:
            pool_store(feats, seg, "learnt", out, pooler=adapter)
        assert str(err.value) == (f"--out {out} {where} the --pooler directory {adapter}; give "
                                  "the store a directory of its own")
    parent = os.path.dirname(adapter)
    with pytest.raises(ValueError, match=re.escape(f"--pooler {adapter} lies inside --out "
                                                   f"{parent}; give the store a directory of "
                                                   "its own")):
        pool_store(feats, seg, "learnt", parent, pooler=adapter, force=True)
    assert snapshot(adapter) == before
    pool_store(feats, seg, "learnt", str(tmp_path / "p"), pooler=adapter)  # elsewhere: fine


def test_a_stated_duration_that_is_not_the_files_is_named_and_hours_come_from_files(  # T29
        tmp_path, caplog):
    from lalmtool import manifest
    from lalmtool.manifest import load_manifest

    for name, sec in (("a", 1.0), ("b", 3.0)):
        sf.write(tmp_path / f"{name}.wav", tone(sec), 16000)
    m = write_manifest(tmp_path / "m.jsonl", [
        {"id": "wrong", "audio": "a.wav", "text": "t", "duration": 2.5},
        {"id": "rounded", "audio": "a.wav", "text": "t", "duration": 1.05},
        {"id": "span", "audio": "b.wav", "text": "t", "duration": 1.5, "offset": 0.5},
        {"id": "none", "audio": "b.wav", "text": "t"}])
    with caplog.at_level(logging.WARNING, logger="lalmtool"):
        utts, _ = load_manifest(m)
    assert [r.getMessage() for r in caplog.records] == [
        f"{m}: 1 utterance(s) state a 'duration' that differs from their audio file's by more "
        "than 0.1 s: wrong (line 1: stated 2.5 s, file 1 s); without 'offset' the whole file "
        "is the utterance (read whole, and counted at the file's length): give 'offset' to use "
        "a span of the file, or correct 'duration'"]
    assert [u.duration for u in utts] == [2.5, 1.05, 1.5, 3.0]  # as stated
    assert manifest.audio_hours(utts) == pytest.approx((1.0 + 1.0 + 1.5 + 3.0) / 3600)
    assert "audio_seconds" not in utts[0].to_json()
