"""Long inputs: training examples joined from cached utterances (``concat_seconds``), the
decoder's length limits in training and decoding, and decode caps sized from the duration."""
import json
import math
import os

import pytest
import soundfile as sf
import torch
from conftest import tone, write_manifest

from lalmtool import examples as E
from lalmtool import finetune as F
from lalmtool.decode import auto_cap, decode
from lalmtool.extract import extract

WORDS = "the quick brown fox jumps over a lazy dog and then sleeps all day long".split()


@pytest.fixture(scope="module")
def clips(tiny_whisper_lm, tmp_path_factory):
    """Twelve utterances of 0.5, 0.6, ... 1.6 s, two speakers taking turns; their frames."""
    d = tmp_path_factory.mktemp("clips")
    rows = []
    for i in range(12):
        sf.write(d / f"{i}.wav", tone(0.5 + 0.1 * i, freq=150 + 30 * i, seed=i), 16000)
        rows.append({"id": f"u{i:02d}", "audio": f"{i}.wav", "text": " ".join(WORDS[i : i + 3]),
                     "speaker": "ab"[i % 2]})
    m = write_manifest(d / "m.jsonl", rows)
    return extract(m, tiny_whisper_lm, str(d / "feats"))["store"], m


def test_consecutive_utterances_are_joined_up_to_the_length(clips):
    ex = E.Examples(*clips)
    items = E.joined_examples(ex, F.TrainConfig(concat_seconds=2.05), 0)
    assert items == [("u00", "u01", "u02"), ("u03", "u04"), "u05", "u06", "u07", "u08", "u09",
                     "u10", "u11"]
    feats, texts = ex.batch(items[:2])
    assert texts == ["the quick brown quick brown fox brown fox jumps",
                     "fox jumps over jumps over a"]
    assert [f.shape[0] for f in feats] == [sum(ex.store[u].shape[0] for u in items[0]),
                                           sum(ex.store[u].shape[0] for u in items[1])]
    torch.testing.assert_close(feats[1], torch.cat([torch.from_numpy(ex.store[u]).float()
                                                    for u in ("u03", "u04")]))
    assert E.joined_examples(ex, F.TrainConfig(), 0) == ex.ids  # no concat: one per example


def test_joined_utterances_share_their_group(clips):
    ex = E.Examples(*clips, group_field="speaker")
    items = E.joined_examples(ex, F.TrainConfig(concat_seconds=2.05, concat_group="speaker"), 0)
    assert items == [("u00", "u02"), ("u04", "u06"), "u08", "u10", ("u01", "u03"), "u05", "u07",
                     "u09", "u11"]
    with pytest.raises(ValueError, match=r"concat_group 'chapter': 12 utterance\(s\) of .* have "
                                         r"no 'chapter' field \(e.g. \['u00', 'u01', 'u02'\]\)"):
        E.Examples(*clips, group_field="chapter")
    with pytest.raises(ValueError, match="concat_group must be null unless concat_seconds"):
        F.TrainConfig(concat_group="speaker")


def test_lengths_are_drawn_per_run_and_epoch_from_the_seed(clips):
    ex = E.Examples(*clips)
    cfg = F.TrainConfig(concat_seconds=[0.5, 3.0], seed=3)
    first = E.joined_examples(ex, cfg, 0)
    assert E.joined_examples(ex, cfg, 0) == first  # the same seed and epoch: the same cut
    assert [u for item in first for u in E.parts(item)] == ex.order  # nothing lost or repeated
    others = [E.joined_examples(ex, cfg, 1), E.joined_examples(ex, F.TrainConfig(
        concat_seconds=[0.5, 3.0], seed=4), 0)]
    assert all(o != first for o in others)
    assert max(ex.seconds(i) for i in first) <= 3.0 or len(E.parts(max(
        first, key=ex.seconds))) == 1


def test_the_decoders_limits_end_a_run(clips, tiny_whisper_lm):
    from lalmtool.models.whisper import WhisperBackend

    ex = E.Examples(*clips)
    pairs = E.joined_examples(ex, F.TrainConfig(concat_seconds=100.0), 0,
                              fits=lambda ids: len(ids) <= 2)
    assert pairs == [(f"u{i:02d}", f"u{i + 1:02d}") for i in range(0, 12, 2)]
    be = WhisperBackend(tiny_whisper_lm)
    assert be.text_room(10**6) == 448 - 2 - 1  # prompt <|startoftranscript|><|notimestamps|>
    ex.text = {u: "word " * 300 for u in ex.ids}  # 300 tokens each: two exceed 445
    fits = F.length_check(be, ex)
    assert be.text_tokens("word " * 300) == 300 and fits(["u00"]) and not fits(["u00", "u01"])


def test_bad_concat_values_get_one_message():
    for value in ([3.0, 1.0], [1.0], [-1.0, 2.0], 0):
        with pytest.raises(ValueError, match="concat_seconds must be a number of seconds > 0 or "
                                             r"a pair \[MIN, MAX\]"):
            F.TrainConfig(concat_seconds=value)
    assert F.TrainConfig(concat_seconds=[10, 120]).concat_seconds == [10.0, 120.0]


def test_training_takes_joined_batches_and_records_the_length(clips, tiny_whisper_lm, tmp_path,
                                                              monkeypatch):
    from lalmtool.models.whisper import WhisperBackend

    seen, loss = [], WhisperBackend.loss
    monkeypatch.setattr(WhisperBackend, "loss",
                        lambda self, feats, texts: seen.append(texts) or loss(self, feats, texts))
    cfg = F.TrainConfig(concat_seconds=4.7, max_steps=1, batch_size=2, warmup_steps=0)
    s = F.finetune(*clips, tiny_whisper_lm, str(tmp_path / "lora"), cfg)
    ex = E.Examples(*clips)
    first = E.epoch_batches(ex, cfg, 0, F.length_check(WhisperBackend(tiny_whisper_lm), ex))[0]
    assert E.joined_examples(ex, cfg, 0) == [tuple(ex.ids[:6]), tuple(ex.ids[6:9]),
                                             tuple(ex.ids[9:])]
    assert seen == [ex.batch(first)[1]] and len(first) == 2
    assert s["steps"] == 1 and math.isfinite(s["last"]["loss"])
    readme = open(tmp_path / "lora" / "adapter" / "README.md").read()
    assert "long inputs: consecutive utterances joined into examples of 4.7 s" in readme
    with pytest.raises(ValueError, match=r"concat_seconds: 4.7 there, 3.0 now"):
        F.finetune(*clips, tiny_whisper_lm, str(tmp_path / "lora"),
                   F.TrainConfig(concat_seconds=3.0, max_steps=1, batch_size=2, warmup_steps=0))


# -- decoding ------------------------------------------------------------------------------
def test_the_cap_is_sized_from_the_duration():
    assert [auto_cap(s) for s in (0.0, 5.0, 30.0)] == [16, 56, 256]


def test_a_batch_decodes_as_each_utterance_alone_with_its_own_cap(clips, tiny_whisper_lm):
    from lalmtool.models.whisper import WhisperBackend
    from lalmtool.store import Store

    be = WhisperBackend(tiny_whisper_lm)
    store = Store(clips[0])
    feats = [torch.from_numpy(store[u]).float() for u in ("u03", "u07")]
    together = be.transcribe(feats, 1, [3, 9])
    assert together == [be.transcribe([feats[0]], 1, [3])[0], be.transcribe([feats[1]], 1, [9])[0]]
    ids = be.new_token_ids([feats[1]], 1, 9)[0].tolist()
    assert together[1][1] == (be.tokenizer.eos_token_id not in ids)  # cut: no end token


@pytest.fixture(scope="module")
def long_recording(tiny_whisper_lm, tmp_path_factory):
    """One 150 s recording: its transcript (~3 tokens per second) needs more than Whisper's
    decoder holds (446 new tokens after the prompt)."""
    d = tmp_path_factory.mktemp("long")
    sf.write(d / "long.wav", tone(150.0, seed=1), 16000)
    sf.write(d / "short.wav", tone(2.0, seed=2), 16000)
    m = write_manifest(d / "m.jsonl", [{"id": "long", "audio": "long.wav", "text": "a"},
                                        {"id": "short", "audio": "short.wav", "text": "b"}])
    return extract(m, tiny_whisper_lm, str(d / "feats"))["store"], m


def test_a_transcript_beyond_whispers_positions_is_refused_or_chunked(long_recording,
                                                                       tiny_whisper_lm, tmp_path):
    feats, m = long_recording
    with pytest.raises(ValueError) as err:
        decode(feats, tiny_whisper_lm, str(tmp_path / "d"), manifest=m)
    assert str(err.value) == (
        f"utterance 'long' of {feats}: its transcript needs ~451 (its 150 s at ~3 tokens per "
        f"second of speech) new tokens, more than the 446 that {tiny_whisper_lm}'s decoder holds "
        "after its prompt (max_target_positions); compression does not change that: decode it "
        "30 s at a time (--too-long chunk), or --chunk N (N audio positions per "
        "chunk: 1500 per 30 s of frames, 1500/k pooled by k)")
    assert not os.path.exists(tmp_path / "d" / "hyp.jsonl")
    info = decode(feats, tiny_whisper_lm, str(tmp_path / "c"), manifest=m, too_long="chunk")
    hyps = {json.loads(line)["id"]: json.loads(line) for line in open(tmp_path / "c" / "hyp.jsonl")}
    assert hyps["long"]["chunks"] == 5 and "chunks" not in hyps["short"]
    assert info["max_new_tokens"] == "auto" and info["too_long"] == "chunk"
    same = decode(feats, tiny_whisper_lm, str(tmp_path / "b"), manifest=m,
                  chunk=1500)  # chunks of one 30 s window: the same pieces
    hyps_b = {json.loads(line)["id"]: json.loads(line) for line in open(tmp_path / "b" / "hyp.jsonl")}
    assert hyps_b["long"]["hyp"] == hyps["long"]["hyp"] and same["utterances"] == 2
    with pytest.raises(ValueError, match=r"--max-new-tokens 500 is more than the 446 tokens"):
        decode(feats, tiny_whisper_lm, str(tmp_path / "e"), manifest=m, max_new_tokens=500)


def test_ten_minutes_fit_a_decoder_only_llm_at_k3_not_at_frame_level(tmp_path):
    """Qwen2-Audio's LLM holds 8,192 positions: 10 min of 25 Hz frames (15,000) cannot be
    trained on or decoded; pooled by 3 (5,000) they can."""
    from lalmtool.models.qwen2_audio import Qwen2AudioBackend
    from lalmtool.pool import pool_store
    from lalmtool.segment import segment
    from lalmtool.testing import write_random_qwen2_audio

    path = write_random_qwen2_audio(str(tmp_path / "ckpt"), max_positions=8192)
    sf.write(tmp_path / "ten.wav", tone(600.0, seed=3), 16000)
    m = write_manifest(tmp_path / "m.jsonl", [{"id": "ten", "audio": "ten.wav",
                                               "text": "the hen " * 600}])
    frames = extract(m, path, str(tmp_path / "frames"), backend="qwen2-audio")["store"]
    segment(frames, "uniform", str(tmp_path / "seg"), k=3)
    k3 = pool_store(frames, str(tmp_path / "seg"), "mean", str(tmp_path / "k3"))["store"]
    be = Qwen2AudioBackend(path)
    for store, fits in ((frames, False), (k3, True)):
        ex = E.Examples(store, m)
        assert F.length_check(be, ex)(["ten"]) is fits
    with pytest.raises(ValueError) as err:
        decode(frames, path, str(tmp_path / "d1"), backend="qwen2-audio")
    assert str(err.value) == (
        f"utterance 'ten' of {frames} needs 16848 positions (prompt + 15000 audio tokens + ~1801 "
        f"(its 600 s at ~3 tokens per second of speech) new tokens), more than the 8192 that "
        f"{path}'s decoder holds (max_position_embeddings); 3x fewer audio tokens would fit "
        "(uniform pooling of the frames by k=3), or decode it 30 s at a time (--too-long chunk)")
    info = decode(k3, path, str(tmp_path / "d3"), backend="qwen2-audio", max_new_tokens=2)
    assert info["max_positions"] == be.prompt_positions(5000) == 5047
    s = F.finetune(k3, m, path, str(tmp_path / "lora"), F.TrainConfig(
        backend="qwen2-audio", max_steps=1, batch_size=1, warmup_steps=0))
    assert s["steps"] == 1 and math.isfinite(s["last"]["loss"])


def test_global_positions_add_whispers_sinusoids_over_the_whole_memory(clips, tiny_whisper_lm):
    """The encoder's positions restart in every window and joined utterance; positions=global
    adds row 0, 1, 2, ... of Whisper's own sinusoids to the (padded) memory."""
    from transformers.models.whisper.modeling_whisper import sinusoids

    from lalmtool.models.whisper import WhisperBackend
    from lalmtool.store import Store

    store = Store(clips[0])
    feats = [torch.from_numpy(store[u]).float() for u in ("u00", "u05")]
    plain, mask = WhisperBackend(tiny_whisper_lm)._memory(feats)
    ordered, _ = WhisperBackend(tiny_whisper_lm, positions="global")._memory(feats)
    width = plain.last_hidden_state.shape[1]
    torch.testing.assert_close(ordered.last_hidden_state - plain.last_hidden_state,
                               sinusoids(width, 32).expand(2, -1, -1))
    assert width == feats[1].shape[0] and mask[0].sum() == feats[0].shape[0]
    with pytest.raises(ValueError, match="^whisper backend option positions must be one of "
                                         "window, global, not 'absolute'$"):
        WhisperBackend(tiny_whisper_lm, positions="absolute")
