"""speechllm backend: Whisper encoder → stacked frames → projector → a causal LM with LoRA.

Mechanics run on a tiny random Llama (2 layers, hidden 32) with the real SmolLM2 tokenizer and
chat template, and on the tiny random Whisper of conftest; one slow test overfits the real
SmolLM2-135M-Instruct on two LibriVox clips encoded by the real Whisper tiny.en.
"""
import json
import math
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import librivox_rows, tone, write_manifest
from lalmtool.models import load_backend
from lalmtool.models.speechllm import (SpeechLLMBackend, export_speechllm, read_spec,
                                       stack_frames)

TEXTS = ["the cat sat on the mat", "hello world", "a b c d e f g"]


@pytest.fixture(scope="module")
def backend(tiny_llm, tiny_whisper) -> SpeechLLMBackend:
    return load_backend("speechllm", tiny_llm, encoder=tiny_whisper, stack=3, hidden=24)


def feats_for(lengths, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for n in lengths]


def test_stack_frames_keeps_every_frame_and_pads_the_tail():
    x = torch.arange(14, dtype=torch.float32).reshape(7, 2)
    s = stack_frames(x, 3)
    assert s.shape == (3, 6)
    assert s[0].tolist() == [0, 1, 2, 3, 4, 5] and s[2].tolist() == [12, 13, 0, 0, 0, 0]
    assert torch.equal(stack_frames(x, 1), x)
    assert stack_frames(x[:1], 4).shape == (1, 8)
    with pytest.raises(ValueError, match="non-empty"):
        stack_frames(x[:0], 2)


def test_splice_has_one_audio_position_per_stacked_token(backend):
    feats = feats_for([7, 3, 12])
    tok = backend.tokenizer
    before, after = backend._prompt_ids
    assert "user" in tok.decode(before) and "Transcribe the audio." in tok.decode(before)
    assert tok.decode(after).endswith("assistant\n")
    assert tok.convert_ids_to_tokens(backend.end_token_id) == "<|im_end|>"
    for side in ("right", "left"):
        b = backend.build_inputs(feats, TEXTS, padding_side=side)
        counts = [math.ceil(f.shape[0] / 3) for f in feats]  # stack=3, tail padded
        assert b.audio_mask.sum(1).tolist() == counts
        assert counts == [backend.num_audio_tokens(f) for f in feats]
        assert b.audio.shape == (sum(counts), 48)
        for i, (f, text) in enumerate(zip(feats, TEXTS)):
            real = b.attention_mask[i].nonzero().squeeze(1)
            start = int(real[0])
            assert real.tolist() == list(range(start, start + len(real)))  # one padded side
            edge = start if side == "right" else b.attention_mask.shape[1] - 1 - int(real[-1])
            assert edge == 0
            slots = b.audio_mask[i].nonzero().squeeze(1).tolist()
            first = start + len(before)  # right after the prompt prefix
            assert slots == list(range(first, first + counts[i]))
            target = tok.encode(text, add_special_tokens=False) + [backend.end_token_id]
            assert b.labels[i][b.labels[i] != -100].tolist() == target
            assert b.position_ids[i, real].tolist() == list(range(len(real)))
    # the projected rows land exactly in the slots, in batch order
    core = backend._core()
    with torch.no_grad():
        emb = core.embed(b.input_ids, b.audio_mask, b.audio)
        proj = core.projector(torch.cat([stack_frames(f, 3) for f in feats]))
    torch.testing.assert_close(emb[b.audio_mask], proj)
    text_emb = core.llm.get_input_embeddings()(b.input_ids)
    torch.testing.assert_close(emb[~b.audio_mask], text_emb[~b.audio_mask])


def test_batched_loss_equals_per_utterance_loss(backend):
    feats = feats_for([7, 3, 12], seed=1)
    with torch.no_grad():
        loss, n = backend.loss(feats, TEXTS)
        singles = [backend.loss([f], [t]) for f, t in zip(feats, TEXTS)]
    assert n == sum(k for _, k in singles)
    weighted = sum(float(l) * k for l, k in singles) / n
    assert float(loss) == pytest.approx(weighted, rel=1e-5)
    core = backend._core()  # an LLM that cannot limit its logits gives the same loss
    core._keeps_logits = False
    try:
        with torch.no_grad():
            assert float(backend.loss(feats, TEXTS)[0]) == pytest.approx(float(loss), rel=1e-6)
    finally:
        del core._keeps_logits


@pytest.mark.parametrize("beam", [1, 2])
def test_batched_generation_equals_unbatched(backend, beam):
    feats = feats_for([5, 13, 2, 9], seed=2)
    batched = backend.generate_ids(feats, beam=beam, max_new_tokens=6)
    for i, f in enumerate(feats):
        alone = backend.generate_ids([f], beam=beam, max_new_tokens=6)[0]
        assert batched[i, : len(alone)].tolist() == alone.tolist()
    assert len(backend.generate(feats[:2], max_new_tokens=4)) == 2


def test_a_length_aware_end_reaches_a_decoder_only_generate(backend):
    """The floors go through the LLM's own ``generate``: a model pushed to end at once ends
    after exactly 2 and 4 new tokens."""
    from lalmtool.models.base import EndNotBefore

    head = backend._core().llm.get_output_embeddings()
    push = torch.zeros(head.out_features)
    push[backend.end_token_id] = 100.0
    hook = head.register_forward_hook(lambda _m, _i, out: out + push)
    try:
        feats = feats_for([5, 9], seed=3)
        ends = [row.index(backend.end_token_id) for row in backend.generate_ids(
            feats, max_new_tokens=8, processors=[EndNotBefore([2, 4], backend.stop_ids())]
        ).tolist()]
        assert ends == [2, 4]
        assert [row.index(backend.end_token_id) for row in
                backend.generate_ids(feats, max_new_tokens=8).tolist()] == [0, 0]
    finally:
        hook.remove()


def test_extract_reuses_the_whisper_encoder_without_loading_the_llm(tiny_llm, tiny_whisper,
                                                                    audio_set, tmp_path):
    from lalmtool.extract import extract
    from lalmtool.store import Store

    ours = extract(audio_set, tiny_llm, str(tmp_path / "s"), backend="speechllm",
                   backend_opts={"encoder": tiny_whisper})["store"]
    theirs = extract(audio_set, tiny_whisper, str(tmp_path / "w"))["store"]
    a, b = Store(ours), Store(theirs)
    assert a.meta["frame_rate"] == 50 and a.ids == b.ids
    for u in a.ids:
        np.testing.assert_array_equal(a[u], b[u])
    be = load_backend("speechllm", tiny_llm, encoder=tiny_whisper)
    be.encode([tone(0.3)])
    assert be._model is None  # the LLM is built only when the decoder side needs it


def test_options_and_clear_errors(tiny_llm, tiny_whisper, tmp_path):
    with pytest.raises(ValueError, match="encoder=whisper-tiny.en"):
        SpeechLLMBackend(tiny_llm)
    with pytest.raises(ValueError, match="no 'llm' option"):
        SpeechLLMBackend(tiny_llm, encoder=tiny_whisper, llm=tiny_llm)
    with pytest.raises(ValueError, match="projector"):
        SpeechLLMBackend(tiny_llm, encoder=tiny_whisper, projector="transformer")
    with pytest.raises(ValueError, match="stack"):
        SpeechLLMBackend(tiny_llm, encoder=tiny_whisper, stack=0)
    be = SpeechLLMBackend(tiny_llm, encoder=tiny_whisper, projector="linear", stack=2)
    assert [type(m).__name__ for m in be.model.projector.net] == ["Linear"]
    assert be.model.projector.net[0].in_features == 32
    with pytest.raises(ValueError, match=r"\[T, 16\]"):
        be.loss([torch.zeros(4, 8)], ["x"])
    with pytest.raises(ValueError, match="texts"):
        be.loss([torch.zeros(4, 16)], ["a", "b"])
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"encoder": tiny_whisper, "llm": tiny_llm, "stack": 2}))
    assert read_spec(str(spec))["stack"] == 2 and read_spec(str(spec))["weights"] is None
    with pytest.raises(ValueError, match="contradicts"):
        read_spec(str(spec), stack=4)
    assert read_spec(str(spec), prompt="Write it down.")["prompt"] == "Write it down."


@pytest.fixture(scope="module")
def trained(tiny_llm, tiny_whisper, tmp_path_factory):
    """extract → segment → pool → finetune (projector + LoRA from scratch) on tones."""
    from lalmtool.extract import extract
    from lalmtool.finetune import TrainConfig, finetune
    from lalmtool.pool import pool_store
    from lalmtool.segment import segment

    d = tmp_path_factory.mktemp("speechllm-run")
    rows = []
    for i, sec in enumerate([0.8, 1.4, 0.5, 1.1]):
        sf.write(d / f"{i}.wav", tone(sec, freq=170 + 70 * i, seed=i), 16000)
        rows.append({"id": f"s{i}", "audio": f"{i}.wav", "text": TEXTS[i % 3]})
    m = write_manifest(d / "m.jsonl", rows)
    feats = extract(m, tiny_llm, str(d / "feats"), backend="speechllm",
                    backend_opts={"encoder": tiny_whisper})["store"]
    segment(feats, "uniform", str(d / "seg"), k=2)
    pooled = pool_store(feats, str(d / "seg"), "mean", str(d / "pooled"))["store"]
    extra = {"encoder": tiny_whisper, "stack": 2, "hidden": 24, "prompt": "Write it down."}
    cfg = TrainConfig(backend="speechllm", max_steps=6, batch_size=2, lr=1e-2, warmup_steps=0,
                      lora_r=4, lora_dropout=0.0, save_every=6, log_every=1, extra=extra)
    summary = finetune(pooled, m, tiny_llm, str(d / "lora"), cfg)
    return {"dir": d, "manifest": m, "frames": feats, "pooled": pooled, "extra": extra,
            "summary": summary}


def test_finetune_trains_projector_and_lora_only_in_the_llm(trained):
    from safetensors.torch import load_file

    s = trained["summary"]
    losses = [json.loads(l)["loss"] for l in open(trained["dir"] / "lora" / "log.jsonl")]
    assert s["steps"] == 6 and np.isfinite(losses).all() and losses[-1] < losses[0]
    keys = load_file(os.path.join(s["adapter"], "adapter_model.safetensors")).keys()
    assert {k for k in keys if "projector" in k} == {
        f"base_model.model.projector.net.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    lora = [k for k in keys if "lora_" in k]
    assert lora and all(k.startswith("base_model.model.llm.model.layers.") for k in lora)
    assert {k.split(".")[-3] for k in lora} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    config = json.load(open(os.path.join(s["adapter"], "adapter_config.json")))
    assert config["modules_to_save"] == ["projector"]


def reload_logits(be, feats):
    with torch.no_grad():
        return be.model(**be.build_inputs(feats, TEXTS[:len(feats)]).model_inputs()).logits


def test_adapter_and_exported_directory_reload_the_trained_model(trained, tiny_llm, tmp_path):
    from peft import PeftModel

    from lalmtool.models import training_options
    from lalmtool.store import Store

    adapter = trained["summary"]["adapter"]
    st = Store(trained["pooled"])
    feats = [torch.from_numpy(st[u].astype(np.float32)) for u in st.ids[:3]]
    # as finetune left it: the unmerged peft model
    live = load_backend("speechllm", tiny_llm, **trained["extra"])
    live.model = PeftModel.from_pretrained(live.model, adapter)
    # as decode loads it: --model LLM --adapter, options from the run's config.yaml
    opts = training_options(adapter, "speechllm")
    assert opts == trained["extra"]
    merged = load_backend("speechllm", tiny_llm, **opts)
    merged.model = PeftModel.from_pretrained(merged.model, adapter).merge_and_unload()
    # as one directory: speechllm.json + projector.safetensors + lora/
    out = export_speechllm(adapter, str(tmp_path / "model"))
    assert sorted(os.listdir(out)) == ["lora", "projector.safetensors", "speechllm.json"]
    shutil.copytree(out, tmp_path / "moved")  # nothing in it points back at the run
    whole = load_backend("speechllm", str(tmp_path / "moved"))
    assert whole.prompt == "Write it down." and whole.stack == 2
    ref = reload_logits(live, feats)
    for be in (merged, whole):
        torch.testing.assert_close(reload_logits(be, feats), ref, atol=2e-5, rtol=1e-5)
        assert be.generate_ids(feats, max_new_tokens=5).tolist() == \
            live.generate_ids(feats, max_new_tokens=5).tolist()
    with pytest.raises(ValueError, match="contradicts"):
        load_backend("speechllm", out, stack=4)


def test_pipeline_decode_and_score(trained, tiny_llm, tmp_path):
    from lalmtool.decode import decode
    from lalmtool.score import score
    from lalmtool.store import Store

    adapter, m = trained["summary"]["adapter"], trained["manifest"]
    info = decode(trained["pooled"], tiny_llm, str(tmp_path / "dec"), adapter=adapter,
                  backend="speechllm", manifest=m, max_new_tokens=6, batch_size=3)
    st = Store(trained["pooled"])
    assert info["utterances"] == 4 and info["backend_opts"] == trained["extra"]
    stack = trained["extra"].get("stack", 4)  # the LLM reads ceil(rows / stack) positions
    assert info["audio_tokens"] == sum(-(-st.dataset(u).shape[0] // stack) for u in st.ids)
    res = score(os.path.join(tmp_path, "dec", "hyp.jsonl"), m, normalizer="none")
    rows = [json.loads(line) for line in open(tmp_path / "dec" / "hyp.jsonl")]
    import jiwer  # the decoded texts, scored by the reference implementation
    assert res["wer"] == pytest.approx(jiwer.wer([r["ref"] for r in rows],
                                                 [r["hyp"] for r in rows]))
    assert os.path.exists(tmp_path / "dec" / "result.txt")
    # the frame-level store continues from the pooled run's adapter (--init-adapter)
    from lalmtool.finetune import TrainConfig, finetune

    from safetensors.torch import load_file

    # lr 1e-8: two AdamW steps move each weight by about 2e-8, so the result is where training began
    cfg = TrainConfig(backend="speechllm", max_steps=2, batch_size=2, warmup_steps=0, lr=1e-8,
                      save_every=2, extra=trained["extra"])
    s = finetune(trained["frames"], m, tiny_llm, str(tmp_path / "again"), cfg,
                 init_adapter=adapter)
    assert s["steps"] == 2 and os.path.exists(os.path.join(s["adapter"], "adapter_config.json"))

    def weights(path):
        return load_file(os.path.join(path, "adapter_model.safetensors"))

    given, continued = weights(adapter), weights(s["adapter"])
    assert sorted(continued) == sorted(given)
    for key in given:  # LoRA A and B and the projector: the given adapter's, not fresh ones
        torch.testing.assert_close(continued[key], given[key], atol=1e-6, rtol=0, msg=key)
    same_rank = TrainConfig(**{**cfg.__dict__, "lora_r": 4})  # the pooled run's LoRA rank
    fresh = weights(finetune(trained["frames"], m, tiny_llm, str(tmp_path / "fresh"),
                             same_rank)["adapter"])
    assert sorted(fresh) == sorted(given)
    farthest = max((fresh[k] - given[k]).abs().max().item() for k in given)
    assert farthest > 1e-3  # a run from a fresh LoRA would fail the check above


@pytest.mark.slow
def test_real_smollm2_memorises_two_librivox_utterances(tiny_en, smollm2, tmp_path):
    """SmolLM2-135M-Instruct + Whisper tiny.en: projector and LoRA from scratch, 25 steps."""
    from lalmtool.decode import decode
    from lalmtool.extract import extract
    from lalmtool.finetune import TrainConfig, finetune

    rows = sorted(librivox_rows(), key=lambda r: r["duration"])[:2]
    m = write_manifest(tmp_path / "m.jsonl", rows)
    feats = extract(m, "smollm2-135m-instruct", str(tmp_path / "feats"), backend="speechllm",
                    backend_opts={"encoder": "whisper-tiny.en"})["store"]
    cfg = TrainConfig(backend="speechllm", max_steps=25, batch_size=2, lr=3e-3, warmup_steps=0,
                      schedule="constant", lora_r=8, lora_dropout=0.0, save_every=25,
                      extra={"encoder": "whisper-tiny.en"})
    s = finetune(feats, m, "smollm2-135m-instruct", str(tmp_path / "lora"), cfg)
    assert s["last"]["loss"] < 0.05
    decode(feats, "smollm2-135m-instruct", str(tmp_path / "dec"), adapter=s["adapter"],
           backend="speechllm", max_new_tokens=40)
    hyps = {json.loads(l)["id"]: json.loads(l)["hyp"] for l in open(tmp_path / "dec" / "hyp.jsonl")}
    assert hyps == {r["id"]: r["text"] for r in rows}


def test_norm_embedding_rescales_projected_rows_and_init_projector_checks(tiny_llm, tiny_whisper,
                                                                           tmp_path):
    from safetensors.torch import save_file

    be = SpeechLLMBackend(tiny_llm, encoder=tiny_whisper, stack=2, hidden=24, norm="embedding")
    rows = be.model.llm.get_input_embeddings().weight
    target = float(rows.detach().norm(dim=-1).mean())
    with torch.no_grad():
        out = be.model.projector(torch.randn(5, 32))
    torch.testing.assert_close(out.norm(dim=-1), torch.full((5,), target))
    plain = SpeechLLMBackend(tiny_llm, encoder=tiny_whisper, stack=2, hidden=24)
    with torch.no_grad():  # same seed, same weights: only the rescaling differs
        raw = plain.model.projector(torch.ones(1, 32))
        torch.testing.assert_close(be.model.projector(torch.ones(1, 32)),
                                   raw / raw.norm() * target)
    with pytest.raises(ValueError, match="norm"):
        SpeechLLMBackend(tiny_llm, encoder=tiny_whisper, norm="unit")
    spec = tmp_path / "spec.json"  # an older speechllm.json without norm means norm=none
    spec.write_text(json.dumps({"encoder": tiny_whisper, "llm": tiny_llm}))
    assert read_spec(str(spec))["norm"] == "none"
    with pytest.raises(ValueError, match="norm='embedding' contradicts"):
        read_spec(str(spec), norm="embedding")
    # init_projector: weights of another shape are refused in one clear sentence
    save_file({"net.0.weight": torch.zeros(24, 48), "net.0.bias": torch.zeros(24),
               "net.2.weight": torch.zeros(32, 24), "net.2.bias": torch.zeros(32)},
              str(tmp_path / "projector.safetensors"))
    wrong = SpeechLLMBackend(tiny_llm, encoder=tiny_whisper, stack=2, hidden=24,
                             init_projector=str(tmp_path))
    with pytest.raises(ValueError, match="does not fit this model's projector"):
        wrong.model
    with pytest.raises(FileNotFoundError, match="init_projector: .*nothing.safetensors"):
        SpeechLLMBackend(tiny_llm, encoder=tiny_whisper,
                         init_projector=str(tmp_path / "nothing.safetensors")).model
