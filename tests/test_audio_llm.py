"""The generic audio LLM backend on a tiny random checkpoint of every family it supports: the
splice path equals the model's own forward and generate on the processor's inputs, compressed
tokens fill exactly their placeholders, LoRA trains only the adapter, the stages run.

Checkpoints come from ``lalmtool.testing`` (config at tiny sizes, a constructed tokenizer with
the family's special tokens and chat template, the family's processor): nothing is downloaded.
"""
import json
import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import tone, write_manifest
from lalmtool.models import load_backend
from lalmtool.models.audio_llm import FAMILIES, AudioLLMBackend, family_of
from lalmtool.pool import pool
from lalmtool.segment import peaks, uniform
from lalmtool.testing import AUDIO_LLM_WRITERS, write_random_audio_llm

FAMILY_NAMES = sorted(AUDIO_LLM_WRITERS)
WAVES = [tone(1.0, seed=1), tone(2.3, freq=330, seed=2), tone(0.6, freq=150, seed=3)]
TEXTS = ["the hen", "in the end it is", "then"]


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request, tmp_path_factory) -> tuple[str, str]:
    """(family name, path of its tiny random checkpoint)."""
    path = str(tmp_path_factory.mktemp(request.param))
    return request.param, write_random_audio_llm(request.param, path)


@pytest.fixture(scope="module")
def backend(family) -> AudioLLMBackend:
    return load_backend(family[0], family[1])


def reference_inputs(be: AudioLLMBackend, wave: np.ndarray, text: str | None = None):
    """The processor's own inputs for ``wave`` in the backend's prompt, with the target text
    and its end token appended when given (what the model reads in training)."""
    inputs = be.request([wave])
    if text is not None:
        target = be.tokenizer.encode(text, add_special_tokens=False) + [be.end_token_id]
        target = torch.tensor([target])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], target], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"],
                                              torch.ones_like(target)], dim=1)
    return inputs


def test_every_registered_family_has_a_random_checkpoint_and_a_backend_name():
    from lalmtool.models import AUDIO_LLM_FAMILIES, BACKENDS

    assert set(FAMILIES) == set(AUDIO_LLM_WRITERS) == set(AUDIO_LLM_FAMILIES)
    assert set(FAMILIES) < set(BACKENDS)


def test_identity_logits_equal_the_models_own_forward(backend):
    feats = backend.encode(WAVES)
    batch = backend.build_inputs(feats, TEXTS)
    with torch.no_grad():
        ours = backend.model(**batch.model_inputs()).logits
    worst = 0.0
    for i, (w, t) in enumerate(zip(WAVES, TEXTS)):
        ref = reference_inputs(backend, w, t)
        n = ref["input_ids"].shape[1]
        assert int(batch.attention_mask[i].sum()) == n
        assert batch.ids[i, :n].tolist() == ref["input_ids"][0].tolist()
        with torch.no_grad():
            theirs = backend.model(**ref).logits[0]
        worst = max(worst, float((ours[i, :n] - theirs).abs().max()))
    assert worst <= 1e-4, f"{backend.name}: max abs logit difference {worst:.2e}"


def test_rows_are_one_per_placeholder_the_processor_inserts(backend):
    feats = backend.encode(WAVES)
    for w, f in zip(WAVES, feats):
        ref = backend.request([w])
        n = int((ref["input_ids"] == backend.audio_token_id).sum())
        assert f.shape[0] == n and f.shape[1] == backend.model.get_input_embeddings().weight.shape[1]
    for a, w in zip(feats, WAVES):  # batching changes nothing
        torch.testing.assert_close(a, backend.encode([w])[0], atol=1e-5, rtol=1e-5)


def test_greedy_decode_equals_the_models_own_generate(backend):
    feats = backend.encode(WAVES)
    batched = backend.generate_ids(feats, max_new_tokens=8)
    outputs = set()
    for i, (w, f) in enumerate(zip(WAVES, feats)):
        ref = backend.request([w])
        theirs = backend.model.generate(**ref, do_sample=False, max_new_tokens=8)
        theirs = theirs[0, ref["input_ids"].shape[1]:].tolist()
        ours = backend.generate_ids([f], max_new_tokens=8)[0].tolist()
        assert ours[: len(theirs)] == theirs
        assert batched[i, : len(ours)].tolist() == ours
        outputs.add(tuple(ours))
    assert len(outputs) > 1, "the audio should change what a random decoder says"


def test_uniform_k3_fills_ceil_n_over_3_placeholders_and_peaks_run(backend):
    frames = [f.numpy() for f in backend.encode(WAVES)]
    for cut in (lambda z: uniform(z, 3), peaks):
        pooled = [torch.from_numpy(pool(z, cut(z))) for z in frames]
        if cut is not peaks:
            assert [len(p) for p in pooled] == [math.ceil(len(z) / 3) for z in frames]
        batch = backend.build_inputs(pooled, TEXTS)
        assert (batch.ids == backend.audio_token_id).sum(1).tolist() == [len(p) for p in pooled]
        loss, n = backend.loss(pooled, TEXTS)
        assert np.isfinite(float(loss.detach())) and n == sum(
            len(backend.tokenizer.encode(t, add_special_tokens=False)) + 1 for t in TEXTS)
        assert len(backend.generate(pooled, max_new_tokens=3)) == 3


def test_a_lora_step_changes_only_the_adapter(family):
    from peft import LoraConfig, get_peft_model

    be = load_backend(family[0], family[1])
    feats = be.encode(WAVES[:2])
    be.model.requires_grad_(False)
    be.model = get_peft_model(be.model, LoraConfig(r=4, target_modules=be.default_lora_targets,
                                                   init_lora_weights=False))
    lora = [n for n, _ in be.model.named_modules() if n.endswith("lora_A")]
    decoder = be._core().get_decoder()
    llm = {n for n, m in be.model.named_modules() if m is decoder}.pop()
    assert all(n.startswith(llm + ".layers.") for n in lora)  # the LLM's layers only
    assert {n.rsplit(".", 1)[0].rsplit(".", 1)[1] for n in lora} >= {"q_proj", "v_proj"}
    before = {n: p.detach().clone() for n, p in be.model.named_parameters()}
    optim = torch.optim.SGD([p for p in be.model.parameters() if p.requires_grad], lr=0.1)
    loss, _ = be.loss(feats, TEXTS[:2])
    loss.backward()
    optim.step()
    changed = {n for n, p in be.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_the_encoder_tap_through_the_projector_gives_the_tokens(family):
    name, path = family
    if not FAMILIES[name].projector:
        with pytest.raises(ValueError, match="only tap=tokens"):
            load_backend(name, path, tap="encoder")
        return
    tokens = load_backend(name, path).encode(WAVES)
    enc = load_backend(name, path, tap="encoder")
    rows = enc.encode(WAVES)
    assert [len(r) for r in rows] == [len(t) for t in tokens]
    with torch.no_grad():
        torch.testing.assert_close(enc.project(rows), torch.cat(tokens), atol=1e-5, rtol=1e-5)


def test_audio_beyond_the_window_is_encoded_window_by_window(backend):
    window = backend.family.window
    long = tone((window or 30.0) + 5.0)
    whole = backend.encode([long])[0]
    if window is None:  # one pass, as the model itself: as many rows as the processor says
        ref = backend.request([long])
        assert whole.shape[0] == int((ref["input_ids"] == backend.audio_token_id).sum())
        return
    parts = backend.encode([long[: int(window * 16000)], long[int(window * 16000):]])
    assert whole.shape[0] == parts[0].shape[0] + parts[1].shape[0]
    torch.testing.assert_close(whole, torch.cat(parts))


def test_an_unsupported_architecture_is_one_line_naming_the_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError) as err:
        family_of(str(tmp_path))
    said = str(err.value)
    assert "model_type 'bert' is not an audio LLM family" in said and "\n" not in said
    assert all(name in said for name in FAMILIES) and "docs/adding-a-family.md" in said


def test_a_checkpoint_of_another_family_is_refused_by_name(family, tmp_path):
    other = next(n for n in FAMILIES if n != family[0]) if len(FAMILIES) > 1 else None
    if other is None:
        pytest.skip("one family only")
    with pytest.raises(ValueError, match=f"is a {family[0]} checkpoint, not {other}"):
        load_backend(other, family[1])


def test_stages_extract_pool_finetune_decode(family, tmp_path):
    from lalmtool.decode import decode
    from lalmtool.extract import extract
    from lalmtool.finetune import TrainConfig, finetune
    from lalmtool.pool import pool_store
    from lalmtool.segment import segment
    from lalmtool.store import Store

    name, path = family
    rows = []
    for i, sec in enumerate([0.8, 1.3, 0.5, 1.1]):
        sf.write(tmp_path / f"{i}.wav", tone(sec, freq=180 + 60 * i, seed=i), 16000)
        rows.append({"id": f"q{i}", "audio": f"{i}.wav", "text": TEXTS[i % 3]})
    m = write_manifest(tmp_path / "m.jsonl", rows)
    feats = extract(m, path, str(tmp_path / "feats"), backend=name)["store"]
    be = load_backend(name, path)
    assert Store(feats).meta["frame_rate"] == FAMILIES[name].rate
    for i, row in enumerate(rows):  # the store holds what the backend's encode gives
        wave = sf.read(tmp_path / row["audio"], dtype="float32")[0]
        torch.testing.assert_close(torch.from_numpy(Store(feats)[row["id"]]).float(),
                                   be.encode([wave])[0], atol=2e-2, rtol=2e-2)
    segment(feats, "uniform", str(tmp_path / "seg"), k=3)
    pooled = pool_store(feats, str(tmp_path / "seg"), "mean", str(tmp_path / "pooled"))["store"]
    cfg = TrainConfig(backend=name, max_steps=6, batch_size=2, lr=1e-2, warmup_steps=0,
                      lora_r=4, lora_dropout=0.0, save_every=6, log_every=1)
    summary = finetune(pooled, m, path, str(tmp_path / "lora"), cfg)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "lora" / "log.jsonl")]
    assert summary["steps"] == 6 and losses[-1] < losses[0]
    info = decode(pooled, path, str(tmp_path / "dec"), adapter=summary["adapter"],
                  backend=name, manifest=m, max_new_tokens=6, batch_size=3)
    store = Store(pooled)
    assert info["utterances"] == 4 and info["audio_tokens"] == sum(
        math.ceil(Store(feats).dataset(u).shape[0] / 3) for u in store.ids)
    other = next((n for n in FAMILIES if n != name), "qwen2-audio")
    with pytest.raises(ValueError, match=f"holds the audio tokens of the {name} backend, not "
                                         f"of {other}: use --backend {name}"):
        decode(pooled, path, str(tmp_path / "dec-other"), backend=other, max_new_tokens=2)
    assert not os.path.exists(tmp_path / "dec-other" / "hyp.jsonl")


def test_the_position_guard_names_what_fits_a_30_minute_recording(family, tmp_path):
    """With the family's real context (its main checkpoint's max_position_embeddings), a
    30-minute recording at the native rate is refused naming the compression that fits, or
    decoded in one piece where the context holds it."""
    from transformers import AutoConfig

    from lalmtool.decode import _pieces
    from lalmtool.store import ShardResult, Store, StoreWriter, plan_shards

    name, path = family
    fam = FAMILIES[name]
    config = AutoConfig.from_pretrained(path)
    config.get_text_config().max_position_embeddings = fam.context
    config.save_pretrained(path)
    try:
        be = load_backend(name, path)
        assert be.position_limit() == fam.context
        rows, width = int(fam.rate * 1800), be.model.get_input_embeddings().weight.shape[1]
        w = StoreWriter.create(str(tmp_path / "s"), "feats", "f" * 64,
                               {"stage": "extract", "frame_rate": fam.rate},
                               plan_shards(["rec"], 1, "feats"))
        for shard in w.pending():
            w.write_shard(shard, ShardResult(items=[("rec", np.zeros((rows, width), np.float16),
                                                     {"duration": 1800.0})]))
        w.finish()
        store = Store(str(tmp_path / "s"))
        new = 1800 * 3 + 1  # decode's expected tokens for 30 min of speech (3 per second)
        prompt = be.prompt_positions(0)
        fits = prompt + rows + new <= fam.context
        if fits:
            [(start, end, cap)] = _pieces(be, store, "rec", 0, None, "fail", path, {})
            assert (start, end) == (0, rows) and cap >= new
            return
        k = next(k for k in range(2, 100) if prompt + math.ceil(rows / k) + new <= fam.context)
        with pytest.raises(ValueError, match=rf"{k}x fewer audio tokens would fit \(uniform "
                                             rf"pooling of the frames by k={k}\)"):
            _pieces(be, store, "rec", 0, None, "fail", path, {})
    finally:
        config.get_text_config().max_position_embeddings = 4096
        config.save_pretrained(path)


def test_a_device_map_placed_model_decodes_as_one_on_its_device(family):
    name, path = family
    whole = load_backend(name, path)
    placed = load_backend(name, path, device_map="auto")
    assert {p.device.type for p in placed.model.parameters()} == {"cpu"}  # no GPU here
    feats = whole.encode(WAVES[:2])
    assert placed.generate_ids(feats, max_new_tokens=6).tolist() == \
        whole.generate_ids(feats, max_new_tokens=6).tolist()


def test_qwen2_audio_chat_is_the_qwen2_audio_backends_chat_prompt(tmp_path):
    """The generic backend on a Qwen2-Audio checkpoint reads what the qwen2-audio backend
    stores at its default tap (the tower's output) and says the same, token for token."""
    from lalmtool.models.qwen2_audio import Qwen2AudioBackend

    path = write_random_audio_llm("qwen2-audio-chat", str(tmp_path / "ckpt"))
    old = Qwen2AudioBackend(path, prompt_style="chat")
    new = load_backend("qwen2-audio-chat", path, tap="encoder")
    frames = old.encode(WAVES)
    for a, b in zip(frames, new.encode(WAVES)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert new._prompt_ids == old._prompt_ids and new.end_token_id == old.end_token_id
    pooled = [torch.from_numpy(pool(z.numpy(), uniform(z.numpy(), 3))) for z in frames]
    assert new.generate_ids(pooled, max_new_tokens=8).tolist() == \
        old.generate_ids(pooled, max_new_tokens=8).tolist()
    assert new.generate(pooled, max_new_tokens=8) == old.generate(pooled, max_new_tokens=8)


def test_qwen3_asr_transcribes_in_the_language_given_and_takes_no_instruction(family):
    name, path = family
    if not FAMILIES[name].transcription_request:
        return
    be = load_backend(name, path, language="de")
    before, after = be._prompt_ids
    assert be.tokenizer.decode(after).endswith("language German<asr_text>")
    for bad in ({"task": "translate", "target_language": "de"}, {"instruction": "Summarise."}):
        with pytest.raises(ValueError, match="takes no instruction"):
            load_backend(name, path, **bad)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family):
    name, path = family
    plain, ckpt = (load_backend(name, path, gradient_checkpointing=g) for g in (False, True))
    feats = plain.encode(WAVES[:2])
    grads = []
    for be in (plain, ckpt):
        be.model.train()
        loss, _ = be.loss(feats, TEXTS[:2])
        loss.backward()
        q = be._core().get_decoder().layers[0].self_attn.q_proj.weight
        grads.append((float(loss.detach()), q.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_audio_llm_records_the_family_so_every_stage_can_name_it(tmp_path):
    from lalmtool.decode import decode
    from lalmtool.extract import extract
    from lalmtool.store import Store

    path = write_random_audio_llm("glm-asr", str(tmp_path / "ckpt"))
    sf.write(tmp_path / "a.wav", tone(1.2), 16000)
    m = write_manifest(tmp_path / "m.jsonl", [{"id": "a", "audio": "a.wav", "text": "the"}])
    feats = extract(m, path, str(tmp_path / "feats"), backend="audio-llm")["store"]
    assert Store(feats).meta["backend"] == "glm-asr"
    for name in ("glm-asr", "audio-llm"):
        info = decode(feats, path, str(tmp_path / f"dec-{name}"), backend=name, max_new_tokens=2)
        assert info["backend"] == "glm-asr"
