"""qwen2-audio backend on a tiny random Qwen2-Audio: the splice path equals the model's own path.

The checkpoint (1-layer audio tower, 2-layer Qwen2 decoder, a byte-level BPE tokenizer with
Qwen2-Audio's special tokens, a Whisper feature extractor with 80 mel bins) is built offline.
"""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import tone, write_manifest
from lalmtool.models import load_backend
from lalmtool.models.qwen2_audio import Qwen2AudioBackend
from lalmtool.testing import write_random_qwen2_audio
from lalmtool.pool import pool
from lalmtool.segment import uniform

@pytest.fixture(scope="module")
def tiny_qwen2_audio(tmp_path_factory) -> str:
    """A random tiny Qwen2-Audio checkpoint with its processor, saved to disk."""
    return write_random_qwen2_audio(str(tmp_path_factory.mktemp("tiny-qwen2-audio")))


@pytest.fixture(scope="module")
def reference(tiny_qwen2_audio):
    """The model's own path: transformers' processor and model on raw audio."""
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    return (AutoProcessor.from_pretrained(tiny_qwen2_audio),
            Qwen2AudioForConditionalGeneration.from_pretrained(tiny_qwen2_audio).eval())


WAVES = [tone(1.0, seed=1), tone(2.3, freq=330, seed=2), tone(0.6, freq=150, seed=3)]
TEXTS = ["the hen", "in the end it is", "then"]


def end_token(be):
    return "<|im_end|>" if be.prompt_style == "chat" else "<|endoftext|>"


@pytest.mark.parametrize("opts", [{}, {"prompt_style": "chat"},
                                  {"task": "translate", "target_language": "de"}],
                         ids=["base-asr", "chat", "translate"])
def test_identity_logits_equal_the_models_forward(opts, tiny_qwen2_audio, reference):
    proc, model = reference
    be = Qwen2AudioBackend(tiny_qwen2_audio, **opts)
    feats = be.encode(WAVES)
    batch = be.build_inputs(feats, TEXTS)
    with torch.no_grad():
        ours = be.model(**batch.model_inputs()).logits
    worst = 0.0
    for i, (w, t) in enumerate(zip(WAVES, TEXTS)):
        ref = proc(text=[be.prompt + t + end_token(be)], audio=[w], return_tensors="pt")
        n = ref.input_ids.shape[1]
        assert batch.attention_mask[i].sum() == n  # right-padded: item i fills [0, n)
        assert torch.equal(batch.ids[i, :n], ref.input_ids[0])  # same prompt, same placeholders
        with torch.no_grad():
            theirs = model(**ref).logits[0]
        worst = max(worst, float((ours[i, :n] - theirs).abs().max()))
    assert worst <= 1e-4
    print(f"max abs logit difference ({be.prompt_style}, {be.task}): {worst:.2e}")


def test_encoder_frames_cover_the_audio_like_the_processor(tiny_qwen2_audio, reference):
    proc, _ = reference
    be = load_backend("qwen2-audio", tiny_qwen2_audio)
    assert be.frame_rate == 25
    feats = be.encode(WAVES)
    for w, f in zip(WAVES, feats):
        ref = proc(text=[be.prompt], audio=[w], return_tensors="pt")
        assert f.shape == ((ref.input_ids == be.model.config.audio_token_id).sum(), 16)
    one_by_one = [be.encode([w])[0] for w in WAVES]
    for a, b in zip(feats, one_by_one):  # the padded windows are masked: batching changes nothing
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_greedy_generation_equals_the_models_generate(tiny_qwen2_audio, reference):
    proc, model = reference
    be = Qwen2AudioBackend(tiny_qwen2_audio)
    feats = be.encode(WAVES)
    batched = be.generate_ids(feats, max_new_tokens=12)  # left-padded batch
    outputs = set()
    for i, (w, f) in enumerate(zip(WAVES, feats)):
        ref = proc(text=[be.prompt], audio=[w], return_tensors="pt")
        theirs = model.generate(**ref, do_sample=False, max_new_tokens=12)[0, ref.input_ids.shape[1]:]
        ours = be.generate_ids([f], max_new_tokens=12)[0]
        assert ours.tolist() == theirs.tolist()
        assert batched[i, : len(ours)].tolist() == ours.tolist()
        outputs.add(tuple(ours.tolist()))
    assert len(outputs) > 1, "the audio should change what a random decoder says"
    texts = be.generate(feats, max_new_tokens=12)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_compressed_features_fill_exactly_their_placeholders(tiny_qwen2_audio):
    be = Qwen2AudioBackend(tiny_qwen2_audio)
    frames = [f.numpy() for f in be.encode(WAVES)]
    pooled = [torch.from_numpy(pool(z, uniform(z, 2))) for z in frames]
    audio_id = be.model.config.audio_token_id
    for side in ("left", "right"):
        batch = be.build_inputs(pooled, TEXTS, padding_side=side)
        assert (batch.ids == audio_id).sum(1).tolist() == [len(p) for p in pooled]
        assert [len(p) for p in pooled] == [-(-len(z) // 2) for z in frames]
        spliced = batch.inputs_embeds[batch.ids == audio_id]
        torch.testing.assert_close(spliced, be.project(pooled))
    loss, n = be.loss(pooled, TEXTS)
    with torch.no_grad():  # the model's own logits at every position give the same loss
        logits = be.model(**batch.model_inputs()).logits[:, :-1]
    targets = batch.labels[:, 1:]
    full = torch.nn.functional.cross_entropy(logits[targets != -100], targets[targets != -100])
    assert float(loss.detach()) == pytest.approx(float(full), rel=1e-5)
    tok = be.tokenizer
    assert n == sum(len(tok.encode(t, add_special_tokens=False)) + 1 for t in TEXTS)
    singles = [be.loss([p], [t]) for p, t in zip(pooled, TEXTS)]  # padding changes nothing
    expected = sum(float(l.detach()) * k for l, k in singles) / sum(k for _, k in singles)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert [len(g) for g in be.generate([pooled[0]], max_new_tokens=3)]


def test_prepool_tap_pooled_by_the_compressor_reproduces_the_model(tiny_qwen2_audio):
    pooled_be = Qwen2AudioBackend(tiny_qwen2_audio)
    pre_be = Qwen2AudioBackend(tiny_qwen2_audio, tap="prepool")
    assert pre_be.frame_rate == 50 and pre_be.identity()["tap"] == "prepool"
    w = WAVES[0]  # 1 s: 50 frames at 50 Hz, an even number
    z = pre_be.encode([w])[0]
    assert z.shape == (50, 16)
    halved = torch.from_numpy(pool(z.numpy(), uniform(z.numpy(), 2)))
    with torch.no_grad():
        a = pre_be.model(**pre_be.build_inputs([halved], ["the"]).model_inputs()).logits
        b = pooled_be.model(**pooled_be.build_inputs(pooled_be.encode([w]), ["the"]).model_inputs()).logits
    assert float((a - b).abs().max()) <= 1e-4


def test_long_audio_is_encoded_window_by_window(tiny_qwen2_audio):
    long = tone(65.0)
    assert Qwen2AudioBackend(tiny_qwen2_audio).encode([long])[0].shape[0] == 750 + 750 + 125
    assert Qwen2AudioBackend(tiny_qwen2_audio, trim=False).encode([long])[0].shape[0] == 3 * 750
    assert Qwen2AudioBackend(tiny_qwen2_audio, tap="prepool").encode([long])[0].shape[0] == 3250


def test_lora_targets_the_language_model_and_projector_on_request(tiny_qwen2_audio):
    from peft import LoraConfig, get_peft_model

    be = Qwen2AudioBackend(tiny_qwen2_audio, train_projector=True)
    assert be.modules_to_save == ["multi_modal_projector"]
    be.model.requires_grad_(False)
    be.model = get_peft_model(be.model, LoraConfig(
        r=4, target_modules=be.default_lora_targets, modules_to_save=be.modules_to_save))
    lora = {n.rsplit(".lora_A", 1)[0] for n, _ in be.model.named_modules() if n.endswith("lora_A")}
    assert len(lora) == 2 * 7 and all(".language_model.layers." in n for n in lora)
    assert {n.rsplit(".", 1)[1] for n in lora} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj"}
    trainable = [n for n, p in be.model.named_parameters() if p.requires_grad]
    assert any("multi_modal_projector" in n for n in trainable)
    assert not any("audio_tower" in n or "embed_tokens" in n for n in trainable)
    feats = be.encode(WAVES[:2])
    loss, _ = be.loss(feats, TEXTS[:2])  # the splice runs through the peft wrapper
    loss.backward()
    assert all(p.grad is not None for n, p in be.model.named_parameters() if p.requires_grad)
    assert Qwen2AudioBackend(tiny_qwen2_audio).modules_to_save == []


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_qwen2_audio):
    plain, ckpt = (Qwen2AudioBackend(tiny_qwen2_audio, gradient_checkpointing=g) for g in (False, True))
    feats = plain.encode(WAVES[:2])
    grads = []
    for be in (plain, ckpt):
        be.model.train()
        loss, _ = be.loss(feats, TEXTS[:2])
        loss.backward()
        grads.append((float(loss), be.model.model.language_model.layers[0].self_attn.q_proj.weight.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_clear_errors(tiny_qwen2_audio):
    with pytest.raises(ValueError, match="tap"):
        Qwen2AudioBackend(tiny_qwen2_audio, tap="middle")
    with pytest.raises(ValueError, match="target_language"):
        Qwen2AudioBackend(tiny_qwen2_audio, task="translate")
    be = Qwen2AudioBackend(tiny_qwen2_audio, instruction="and again: <|AUDIO|>")
    with pytest.raises(ValueError, match="exactly one"):
        be.build_inputs([torch.zeros(3, 16)])
    be = Qwen2AudioBackend(tiny_qwen2_audio)
    with pytest.raises(ValueError, match="texts"):
        be.loss([torch.zeros(3, 16)], ["a", "b"])
    with pytest.raises(ValueError, match="3 audio frames"):
        be.loss([torch.zeros(3, 16)], ["a text holding <|AUDIO|>"])
    with pytest.raises(ValueError, match="padding_side"):
        be.build_inputs([torch.zeros(3, 16)], padding_side="middle")


def test_pipeline_extract_pool_finetune_decode_score(tiny_qwen2_audio, tmp_path):
    from lalmtool.decode import decode
    from lalmtool.extract import extract
    from lalmtool.finetune import TrainConfig, finetune
    from lalmtool.pool import pool_store
    from lalmtool.score import score
    from lalmtool.segment import segment
    from lalmtool.store import Store

    rows = []
    for i, sec in enumerate([0.8, 1.3, 0.5, 1.1]):
        sf.write(tmp_path / f"{i}.wav", tone(sec, freq=180 + 60 * i, seed=i), 16000)
        rows.append({"id": f"q{i}", "audio": f"{i}.wav", "text": TEXTS[i % 3]})
    m = write_manifest(tmp_path / "m.jsonl", rows)
    feats = extract(m, tiny_qwen2_audio, str(tmp_path / "feats"), backend="qwen2-audio")["store"]
    assert Store(feats).meta["frame_rate"] == 25 and Store(feats)["q1"].shape == (32, 16)
    segment(feats, "uniform", str(tmp_path / "seg"), k=2)
    pooled = pool_store(feats, str(tmp_path / "seg"), "mean", str(tmp_path / "pooled"))["store"]
    cfg = TrainConfig(backend="qwen2-audio", max_steps=8, batch_size=2, lr=1e-2, warmup_steps=0,
                      lora_r=4, lora_dropout=0.0, save_every=8, log_every=1,
                      extra={"train_projector": True})
    summary = finetune(pooled, m, tiny_qwen2_audio, str(tmp_path / "lora"), cfg)
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "lora" / "log.jsonl")]
    assert summary["steps"] == 8 and np.isfinite(losses).all() and losses[-1] < losses[0]
    info = decode(pooled, tiny_qwen2_audio, str(tmp_path / "dec"), adapter=summary["adapter"],
                  backend="qwen2-audio", manifest=m, max_new_tokens=8, batch_size=3)
    assert info["utterances"] == 4
    assert info["audio_tokens"] == sum(Store(pooled).dataset(u).shape[0] for u in Store(pooled).ids)
    assert info["compression_ratio"] == pytest.approx(2.0, rel=0.1)
    assert summary["condition"] == "uniform-mean-k2" and info["adapter_condition"] is None
    unaligned = decode(feats, tiny_qwen2_audio, str(tmp_path / "dec-frames"), max_new_tokens=2,
                       adapter=summary["adapter"], backend="qwen2-audio")
    assert unaligned["adapter_condition"] == "uniform-mean-k2"  # not trained on frames
    res = score(os.path.join(tmp_path, "dec", "hyp.jsonl"), m, normalizer="none")
    rows = [json.loads(line) for line in open(tmp_path / "dec" / "hyp.jsonl")]
    import jiwer  # the decoded texts, scored by the reference implementation
    assert res["wer"] == pytest.approx(jiwer.wer([r["ref"] for r in rows],
                                                 [r["hyp"] for r in rows]))
    assert os.path.exists(tmp_path / "dec" / "results.json")


# Qwen2-Audio-7B-Instruct's own chat_template.json tests for an 'audio' or 'audio_url' key,
# not for content['type'] == 'audio' as the processor's built-in template also does.
INSTRUCT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: "
    "<|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_the_instruct_checkpoints_own_chat_template_keeps_the_audio(tmp_path):
    from transformers import AutoProcessor

    path = write_random_qwen2_audio(str(tmp_path / "Qwen2-Audio-7B-Instruct"))
    os.remove(os.path.join(path, "chat_template.jinja"))
    with open(os.path.join(path, "chat_template.json"), "w") as fh:
        json.dump({"chat_template": INSTRUCT_TEMPLATE}, fh)
    proc = AutoProcessor.from_pretrained(path)
    assert proc.chat_template == INSTRUCT_TEMPLATE
    bare = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "x"}]}]
    assert "<|AUDIO|>" not in proc.apply_chat_template(bare, tokenize=False)  # what went wrong
    be = Qwen2AudioBackend(path)
    assert be.prompt_style == "chat"
    assert be.prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                         "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
                         "Transcribe the English speech into text. Output only the transcript."
                         "<|im_end|>\n<|im_start|>assistant\n")
    before, after = be._prompt_ids
    assert be.tokenizer.decode(before).endswith("Audio 1: <|audio_bos|>")
    builtin = write_random_qwen2_audio(str(tmp_path / "builtin-instruct"))
    assert Qwen2AudioBackend(builtin).prompt == be.prompt  # the built-in template agrees


def _stores(path, tmp_path, opts=None):
    """Frames of a 4 s and a 1 s tone, and their uniform k=2 pooling."""
    from lalmtool.extract import extract
    from lalmtool.pool import pool_store
    from lalmtool.segment import segment

    tmp_path.mkdir(exist_ok=True)
    rows = []
    for i, sec in enumerate([4.0, 1.0]):
        sf.write(tmp_path / f"{i}.wav", tone(sec, seed=i), 16000)
        rows.append({"id": f"t{i}", "audio": f"{i}.wav", "text": "the hen"})
    m = write_manifest(tmp_path / "m.jsonl", rows)
    frames = extract(m, path, str(tmp_path / "frames"), backend="qwen2-audio",
                     backend_opts=opts)["store"]
    segment(frames, "uniform", str(tmp_path / "seg"), k=2)
    return frames, pool_store(frames, str(tmp_path / "seg"), "mean", str(tmp_path / "k2"))["store"]


def test_an_utterance_beyond_the_llm_context_is_named_with_the_compression_that_fits(tmp_path):
    from lalmtool.decode import decode

    path = write_random_qwen2_audio(str(tmp_path / "ckpt"), max_positions=128)
    frames, k2 = _stores(path, tmp_path)
    prompt = Qwen2AudioBackend(path).prompt_positions(0)
    assert prompt == 47  # <|audio_bos|>, <|audio_eos|> and the ASR instruction, byte-level
    with pytest.raises(ValueError) as err:
        decode(frames, path, str(tmp_path / "d1"), backend="qwen2-audio", max_new_tokens=8)
    assert str(err.value) == (
        f"utterance 't0' of {frames} needs 155 positions (prompt + 100 audio tokens + up to 8 "
        f"new tokens), more than the 128 that {path}'s decoder holds (max_position_embeddings); "
        "2x fewer audio tokens would fit (uniform pooling of the frames by k=2), or decode it "
        "30 s at a time (--too-long chunk)")
    assert not os.path.exists(tmp_path / "d1" / "hyp.part0.jsonl") or \
        open(tmp_path / "d1" / "hyp.part0.jsonl").read() == ""  # nothing decoded before it
    info = decode(k2, path, str(tmp_path / "d2"), backend="qwen2-audio", max_new_tokens=8)
    recs = {json.loads(l)["id"]: json.loads(l) for l in open(tmp_path / "d2" / "hyp.jsonl")}
    assert recs["t0"]["positions"] == prompt + 50 and recs["t1"]["positions"] == prompt + 13
    assert info["max_positions"] == prompt + 50


def test_the_store_and_adapter_tap_are_kept_and_checked(tiny_qwen2_audio, tmp_path):
    import yaml
    from peft import LoraConfig, get_peft_model

    from lalmtool.decode import decode

    prepool, _ = _stores(tiny_qwen2_audio, tmp_path / "pre", {"tap": "prepool"})
    pooled, _ = _stores(tiny_qwen2_audio, tmp_path / "pooled")
    be = Qwen2AudioBackend(tiny_qwen2_audio, tap="prepool")
    get_peft_model(be.model, LoraConfig(r=2, target_modules=be.default_lora_targets)) \
        .save_pretrained(str(tmp_path / "run" / "adapter"))
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(
        {"backend": "qwen2-audio", "extra": {"tap": "prepool"}}))
    adapter = str(tmp_path / "run" / "adapter")
    info = decode(prepool, tiny_qwen2_audio, str(tmp_path / "d1"), adapter=adapter,
                  backend="qwen2-audio", max_new_tokens=2, backend_opts={"language": "de"})
    assert info["backend_opts"] == {"tap": "prepool", "language": "de"}
    with pytest.raises(ValueError, match="tap mismatch: store 'pooled', decode 'prepool', "
                                         "adapter 'prepool'"):
        decode(pooled, tiny_qwen2_audio, str(tmp_path / "d2"), adapter=adapter,
               backend="qwen2-audio", max_new_tokens=2)
    with pytest.raises(ValueError, match="tap mismatch: store 'prepool', decode 'pooled'"):
        decode(prepool, tiny_qwen2_audio, str(tmp_path / "d3"), backend="qwen2-audio",
               max_new_tokens=2)
