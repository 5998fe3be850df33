"""Round three of trying to break lalmtool (FAULTS.md, round 3): what --force and re-runs replace
is checked first and replaced whole; a result belongs to its hypotheses."""
import json
import os

import pytest

from conftest import snapshot
from lalmtool.decode import decode
from lalmtool.extract import extract
from lalmtool.pool import pool_store
from lalmtool.report import report
from lalmtool.score import score
from lalmtool.segment import segment


def test_a_refused_forced_decode_leaves_out_byte_identical(decoded, tiny_whisper_lm):  # T4
    feats, _, out = decoded
    before = snapshot(out)
    with pytest.raises(ValueError, match="--max-new-tokens 500 is more than the"):
        decode(feats, tiny_whisper_lm, out, max_new_tokens=500, force=True)
    with pytest.raises(ValueError, match="cannot load it as a whisper checkpoint"):
        decode(feats, os.path.dirname(out), out, max_new_tokens=4, force=True)
    assert snapshot(out) == before


def test_decoding_again_removes_the_old_scores_and_report_skips_stale_ones(  # T5
        decoded, tiny_whisper_lm, audio_set, caplog):
    feats, pooled, out = decoded
    assert os.path.exists(os.path.join(out, "results.json"))
    exp = os.path.dirname(out)
    assert [r["condition"] for r in report(exp)] == ["frames"]
    decode(pooled, tiny_whisper_lm, out, max_new_tokens=4, force=True)
    assert not any(os.path.exists(os.path.join(out, f))
                   for f in ("results.json", "result.txt", "per_utt.jsonl", "alignments.txt"))
    # a score of other hypotheses copied back beside them is not credited to them
    score(os.path.join(out, "hyp.jsonl"), audio_set, normalizer="none")
    with open(os.path.join(out, "hyp.jsonl"), "a") as fh:
        fh.write("\n")  # the hypotheses change after the score
    with pytest.raises(ValueError):
        report(exp)
    assert "it scored other hypotheses than" in caplog.text


def test_a_refused_forced_finetune_leaves_the_finished_run_byte_identical(  # T2, T3
        decoded, audio_set, tiny_whisper_lm, tmp_path):
    from lalmtool.finetune import TrainConfig, finetune

    feats, pooled, _ = decoded
    out = str(tmp_path / "lora")
    cfg = dict(max_steps=2, batch_size=2, warmup_steps=0, lora_r=2, save_every=2, log_every=1)
    finetune(pooled, audio_set, tiny_whisper_lm, out, TrainConfig(**cfg))
    before = snapshot(out)
    with pytest.raises(ValueError, match="training option seed must be a whole number from 0 "
                                         "to 4294967295"):
        finetune(pooled, audio_set, tiny_whisper_lm, out, TrainConfig(**cfg, seed=-1),
                 force=True)
    adapter = os.path.join(out, "adapter")
    for flag in ("init_adapter", "teacher"):
        with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} {adapter} lies "
                                             f"inside --out {out}, which --force starts over"):
            finetune(feats if flag == "teacher" else pooled, audio_set, tiny_whisper_lm, out,
                     TrainConfig(**cfg, distill=0.5 if flag == "teacher" else 0.0),
                     force=True, segments=str(tmp_path / "seg") if flag == "teacher" else None,
                     **{flag: adapter})
    with pytest.raises(OSError, match="no file named model.safetensors"):  # a model that does not load
        finetune(pooled, audio_set, str(tmp_path / "exp"), out, TrainConfig(**cfg), force=True)
    assert snapshot(out) == before


def test_a_refused_re_prepare_leaves_the_set_prepared_before_whole(tmp_path):  # T1
    pytest.importorskip("datasets")
    from conftest import make_dataset, prepare

    from lalmtool.corpora import CorpusError

    path, _ = make_dataset(tmp_path)
    out = tmp_path / "set"
    assert prepare(path, out, on_error="skip")["utterances"] == 3
    before = snapshot(out)
    with pytest.raises(CorpusError):  # other settings: prepared again, and its bad rows refused
        prepare(path, out, on_error="fail")
    assert snapshot(out) == before
    for line in open(out / "manifest.jsonl"):
        assert os.path.exists(json.loads(line)["audio"])
    assert prepare(path, out, on_error="skip", text_case="lower")["utterances"] == 3
    assert not os.path.exists(out / ".prepare-tmp")


def test_finetune_refuses_an_example_beyond_the_decoders_positions_before_out(  # T6, T16
        tmp_path, tiny_en):
    import glob
    import shutil

    import soundfile as sf
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from conftest import tone, write_manifest
    from lalmtool.finetune import TrainConfig, finetune
    from lalmtool.testing import write_random_qwen2_audio

    rows = []
    for i, sec in enumerate([4.0, 1.0]):
        sf.write(tmp_path / f"{i}.wav", tone(sec, seed=i), 16000)
        rows.append({"id": f"t{i}", "audio": f"{i}.wav",
                     "text": " ".join(["the hen"] * (15 if i == 0 else 1))})
    m = write_manifest(tmp_path / "m.jsonl", rows)
    cfg = dict(max_steps=1, batch_size=2, warmup_steps=0, lora_r=2)
    # a decoder-only LLM of 128 positions: 147 of prompt and 100 audio tokens, 62 of target
    # (byte-level tokens): 19 audio positions would fit
    q = write_random_qwen2_audio(str(tmp_path / "q"), max_positions=128)
    feats = extract(m, q, str(tmp_path / "qf"), backend="qwen2-audio")["store"]
    with pytest.raises(ValueError, match=r"utterance 't0' of .*: its 62 target tokens \(the end "
                                         r"token included\) and 147 positions of prompt and audio "
                                         r"need more than the 128 .*; 6x fewer audio tokens would "
                                         r"fit"):
        finetune(feats, m, q, str(tmp_path / "qo"), TrainConfig(backend="qwen2-audio", **cfg))
    assert not os.path.exists(tmp_path / "qo" / "run.json")
    # Whisper with 24 decoder positions: the 30-token transcript alone does not fit
    torch.manual_seed(0)
    w = str(tmp_path / "w24")
    real = WhisperConfig.from_pretrained(tiny_en)
    WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=real.vocab_size, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=1500, max_target_positions=24,
        pad_token_id=real.pad_token_id, bos_token_id=real.bos_token_id,
        eos_token_id=real.eos_token_id, decoder_start_token_id=real.decoder_start_token_id,
    )).save_pretrained(w)
    for f in glob.glob(os.path.join(tiny_en, "*.json")):
        if os.path.basename(f) not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, w)
    feats = extract(m, w, str(tmp_path / "wf"))["store"]
    for extra in ({}, {"concat_seconds": [3, 9]}):
        with pytest.raises(ValueError, match=r"utterance 't0' of .*: its 31 target tokens .* are "
                                             r"more than the \d+ that .*'s decoder holds after "
                                             r"its prompt \(max_target_positions\)"):
            finetune(feats, m, w, str(tmp_path / "wo"), TrainConfig(**cfg, **extra))
        assert not os.path.exists(tmp_path / "wo" / "run.json")


def test_an_adapter_of_another_base_model_is_refused_by_name(  # T8
        decoded, audio_set, tiny_whisper_lm, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from lalmtool.finetune import TrainConfig, finetune
    from lalmtool.transcribe import Transcriber

    feats, pooled, _ = decoded
    cfg = TrainConfig(max_steps=1, batch_size=2, warmup_steps=0, lora_r=2)
    adapter = finetune(pooled, audio_set, tiny_whisper_lm, str(tmp_path / "lora"), cfg)["adapter"]
    other = str(tmp_path / "other")  # the same shapes and files, other weights
    shutil.copytree(tiny_whisper_lm, other)
    weights = load_file(os.path.join(other, "model.safetensors"))
    save_file({k: v * 1.01 for k, v in weights.items()}, os.path.join(other, "model.safetensors"),
              metadata={"format": "pt"})
    said = f"{adapter} was trained on another base model than {other}"
    with pytest.raises(ValueError, match=f"--adapter {said}"):
        decode(pooled, other, str(tmp_path / "d"), adapter=adapter, max_new_tokens=2)
    assert not os.path.exists(tmp_path / "d")
    with pytest.raises(ValueError, match=f"--init-adapter {said}"):
        finetune(pooled, audio_set, other, str(tmp_path / "l2"), cfg, init_adapter=adapter)
    with pytest.raises(ValueError, match=f"--adapter {said}"):
        Transcriber(other, adapter=adapter)
    # the same weights under another directory name are the same base model
    same = str(tmp_path / "same")
    shutil.copytree(tiny_whisper_lm, same)
    decode(pooled, same, str(tmp_path / "d3"), adapter=adapter, max_new_tokens=2)


def test_a_pooler_is_refused_on_other_boundaries_or_when_damaged(  # T14, T18, T21
        decoded, audio_set, tiny_whisper_lm, tmp_path):
    import shutil

    from lalmtool.finetune import TrainConfig, finetune

    feats, _, _ = decoded
    for k in (3, 10):
        segment(feats, "uniform", str(tmp_path / f"k{k}"), k=k)
    cfg = TrainConfig(max_steps=1, batch_size=2, warmup_steps=0, lora_r=2, pooler_heads=2)
    adapter = finetune(feats, audio_set, tiny_whisper_lm, str(tmp_path / "lora"), cfg,
                       segments=str(tmp_path / "k3"))["adapter"]
    with pytest.raises(ValueError, match=rf"the pooler of {adapter} was trained on uniform-k=3 "
                                         rf"boundaries, {tmp_path / 'k10'} holds uniform-k=10"):
        pool_store(feats, str(tmp_path / "k10"), "learnt", str(tmp_path / "p10"), pooler=adapter)
    assert not os.path.exists(tmp_path / "p10")
    pool_store(feats, str(tmp_path / "k3"), "learnt", str(tmp_path / "p3"), pooler=adapter)
    broken = str(tmp_path / "broken")
    shutil.copytree(adapter, broken)
    weights = os.path.join(broken, "pooler.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ValueError, match=rf"--pooler {broken}: {weights} does not hold a pooler "
                                         r"of the shape lalmtool.json gives .* or is damaged"):
        pool_store(feats, str(tmp_path / "k3"), "learnt", str(tmp_path / "pb"), pooler=broken)
    record = os.path.join(broken, "lalmtool.json")
    with open(record) as fh:
        held = json.load(fh)
    with open(record, "w") as fh:
        json.dump({**held, "pooler": {"heads": 3}}, fh)
    with pytest.raises(ValueError, match=rf"--pooler {broken}: .*lalmtool.json cannot be read as "
                                         "the pooler's shape"):
        pool_store(feats, str(tmp_path / "k3"), "learnt", str(tmp_path / "pb"), pooler=broken)
    with open(record, "w") as fh:
        fh.write("{heads: 3")
    with pytest.raises(ValueError, match=rf"^{record} is damaged \(.*\); copy the directory "
                                         "again whole, or train it again"):
        pool_store(feats, str(tmp_path / "k3"), "learnt", str(tmp_path / "pb"), pooler=broken)


def test_refused_forced_extract_segment_pool_leave_out_byte_identical(  # the rule, per command
        decoded, audio_set, tiny_whisper_lm, tmp_path):
    feats, pooled, _ = decoded
    seg = str(tmp_path / "seg")
    cases = [
        (feats, lambda: extract(audio_set, tiny_whisper_lm, feats, force=True,
                                backend_opts={"positions": "sideways"}), "positions"),
        (feats, lambda: extract(audio_set, tiny_whisper_lm, feats, force=True, pack=-1),
         "--pack must be"),
        (seg, lambda: segment(feats, "uniform", seg, k=0, force=True), "--k must be"),
        (pooled, lambda: pool_store(feats, seg, "median", pooled, force=True),
         "unknown reducer"),
    ]
    for out, run, said in cases:
        before = snapshot(out)
        with pytest.raises(ValueError, match=said):
            run()
        assert snapshot(out) == before, said


def test_a_forced_finetune_that_fails_puts_the_run_it_replaced_back(
        decoded, audio_set, tiny_whisper_lm, tmp_path, monkeypatch):
    import lalmtool.finetune as F

    _, pooled, _ = decoded
    out = str(tmp_path / "lora")
    cfg = dict(max_steps=2, batch_size=2, warmup_steps=0, lora_r=2, save_every=1, log_every=1)
    F.finetune(pooled, audio_set, tiny_whisper_lm, out, F.TrainConfig(**cfg))
    before = snapshot(out)
    real_step = F._train_step
    calls = []

    def failing(run, train, stream):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated) at step 2")
        return real_step(run, train, stream)
    monkeypatch.setattr(F, "_train_step", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        F.finetune(pooled, audio_set, tiny_whisper_lm, out, F.TrainConfig(**cfg, lr=5e-4),
                   force=True)
    assert snapshot(out) == before and not os.path.exists(os.path.join(out, ".replaced"))
    monkeypatch.setattr(F, "_train_step", real_step)
    s = F.finetune(pooled, audio_set, tiny_whisper_lm, out, F.TrainConfig(**cfg, lr=5e-4),
                   force=True)
    assert s["steps"] == 2 and not os.path.exists(os.path.join(out, ".replaced"))
    assert snapshot(out) != before


def test_a_pooler_of_another_base_model_is_refused(decoded, audio_set, tiny_whisper_lm,
                                                    tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from lalmtool.finetune import TrainConfig, finetune

    feats, _, _ = decoded
    segment(feats, "uniform", str(tmp_path / "k3"), k=3)
    other = str(tmp_path / "other")  # the same shapes, other weights
    shutil.copytree(tiny_whisper_lm, other)
    weights = load_file(os.path.join(other, "model.safetensors"))
    save_file({k: v * 1.01 for k, v in weights.items()}, os.path.join(other, "model.safetensors"),
              metadata={"format": "pt"})
    other_feats = extract(audio_set, other, str(tmp_path / "of"))["store"]
    cfg = TrainConfig(max_steps=1, batch_size=2, warmup_steps=0, lora_r=2, pooler_heads=2)
    segment(other_feats, "uniform", str(tmp_path / "k3o"), k=3)
    adapter = finetune(other_feats, audio_set, other, str(tmp_path / "lora"), cfg,
                       segments=str(tmp_path / "k3o"))["adapter"]
    with pytest.raises(ValueError, match=f"--pooler {adapter} was trained on another base model"):
        pool_store(feats, str(tmp_path / "k3"), "learnt", str(tmp_path / "p"), pooler=adapter)
    assert not os.path.exists(tmp_path / "p")
