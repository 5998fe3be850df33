"""decode: batching equals unbatched greedy output on real weights; resume; rank merge."""
import json
import os

import pytest

from click.testing import CliRunner

from lalmtool.cli import main
from lalmtool.decode import decode
from lalmtool.extract import extract
from lalmtool.pool import pool_store
from lalmtool.segment import segment
from lalmtool.store import Store, StoreError

@pytest.fixture(scope="module")
def stores(tiny_en, librivox_manifest, tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    feats = extract(librivox_manifest, tiny_en, str(d / "frames"))["store"]
    native = extract(librivox_manifest, tiny_en, str(d / "native"), trim=False)["store"]
    segment(feats, "peaks", str(d / "seg"))
    pooled = pool_store(feats, str(d / "seg"), "mean", str(d / "pooled"))["store"]
    return {"frames": feats, "native": native, "pooled": pooled}


def hyps(out):
    return {json.loads(l)["id"]: json.loads(l)["hyp"] for l in open(os.path.join(out, "hyp.jsonl"))}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["native", "pooled"])
def test_batched_equals_unbatched_greedy(kind, stores, tiny_en, librivox_manifest, tmp_path):
    one = decode(stores[kind], tiny_en, str(tmp_path / "b1"), batch_size=1, max_new_tokens=60)
    five = decode(stores[kind], tiny_en, str(tmp_path / "b5"), batch_size=5, max_new_tokens=60,
                  manifest=librivox_manifest)
    assert hyps(tmp_path / "b1") == hyps(tmp_path / "b5")
    assert one["audio_tokens"] == five["audio_tokens"] == sum(
        Store(stores[kind]).dataset(u).shape[0] for u in Store(stores[kind]).ids)
    rec = json.loads(open(tmp_path / "b5" / "hyp.jsonl").readline())
    assert set(rec) == {"id", "hyp", "ref", "tokens", "duration", "seconds"}


@pytest.mark.slow
def test_native_whisper_transcribes_librivox(stores, tiny_en, tmp_path):
    info = decode(stores["native"], tiny_en, str(tmp_path / "d"), batch_size=5)
    h = hyps(tmp_path / "d")
    assert h["sense_and_sensibility_01_austen_64kb-0930"].lower().rstrip(".") == \
        "he might even have been made amiable himself"
    assert info["condition"] == "native" and info["compression_ratio"] < 1
    assert info["tokens_per_s"] == pytest.approx(5 * 1500 / info["audio_seconds"])


@pytest.mark.slow
def test_beam_batched_equals_unbatched(stores, tiny_en, tmp_path):
    decode(stores["pooled"], tiny_en, str(tmp_path / "b1"), batch_size=1, beam=3, max_new_tokens=25)
    decode(stores["pooled"], tiny_en, str(tmp_path / "b5"), batch_size=5, beam=3, max_new_tokens=25)
    assert hyps(tmp_path / "b1") == hyps(tmp_path / "b5")


@pytest.mark.slow
def test_resume_from_partial_hypotheses(stores, tiny_en, tmp_path):
    out = tmp_path / "d"
    full = decode(stores["pooled"], tiny_en, str(out), batch_size=2, max_new_tokens=30)
    lines = open(out / "hyp.jsonl").read().splitlines(keepends=True)
    strip = lambda ls: [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in ls]
    os.remove(out / "hyp.jsonl")
    os.remove(out / "decode.json")
    # two finished lines and one cut in the middle, as a kill leaves them
    (out / "hyp.part0.jsonl").write_text("".join(lines[:2]) + lines[2][:10])
    again = decode(stores["pooled"], tiny_en, str(out), batch_size=2, max_new_tokens=30)
    after = open(out / "hyp.jsonl").read().splitlines(keepends=True)
    assert after[:2] == lines[:2] and strip(after) == strip(lines)
    assert again["utterances"] == full["utterances"] == 5
    assert not list(out.glob("hyp.part*"))
    # a finished decode with the same inputs is skipped; other settings redo it
    assert decode(stores["pooled"], tiny_en, str(out), max_new_tokens=30)["fingerprint"] == full["fingerprint"]
    # a label names the condition in reports; relabelling a finished decode decodes nothing
    before = os.path.getmtime(out / "hyp.jsonl")
    relabelled = decode(stores["pooled"], tiny_en, str(out), max_new_tokens=30, label="peaks-other")
    assert relabelled["condition"] == json.load(open(out / "decode.json"))["condition"] == "peaks-other"
    assert os.path.getmtime(out / "hyp.jsonl") == before and full["condition"] == "peaks-mean"
    with pytest.raises(StoreError, match=r"--max-new-tokens: 30 there, 31 now\)"):
        decode(stores["pooled"], tiny_en, str(out), max_new_tokens=31)
    assert decode(stores["pooled"], tiny_en, str(out), max_new_tokens=31,
                  force=True)["fingerprint"] != full["fingerprint"]


@pytest.mark.slow
def test_condition_labels(stores, tmp_path):
    assert Store(stores["frames"]).meta.condition()[2] == "frames"
    assert Store(stores["pooled"]).meta.condition()[:2] == ("peaks", {"reduce": "mean"})
    segment(stores["frames"], "uniform", str(tmp_path / "u"), k=3)
    p = pool_store(stores["frames"], str(tmp_path / "u"), "pick", str(tmp_path / "p"))["store"]
    assert Store(p).meta.condition()[2] == "uniform-pick-k3"


# -- fast checks on a random 1-layer Whisper with tiny.en's vocabulary ----------------------
@pytest.fixture
def small(tiny_whisper_lm, audio_set, tmp_path):
    """A frame store of five synthetic clips, its manifest and one finished decode of it."""
    feats = extract(audio_set, tiny_whisper_lm, str(tmp_path / "frames"))["store"]
    out = tmp_path / "dec"
    decode(feats, tiny_whisper_lm, str(out), max_new_tokens=4, manifest=audio_set)
    return {"feats": feats, "manifest": audio_set, "model": tiny_whisper_lm, "out": out}


def snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != ".lock"}


def lora_adapter(model_dir, path, seed, backend="whisper", extra=None):
    """A random (non-zero) LoRA adapter of ``model_dir`` at ``path``/adapter, with the
    config.yaml a finetune run writes beside it."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(seed)
    base = WhisperForConditionalGeneration.from_pretrained(model_dir)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(str(path / "adapter"))
    (path / "config.yaml").write_text(yaml.safe_dump({"backend": backend, "extra": extra or {}}))
    return str(path / "adapter")


def test_bad_options_are_refused_before_anything_is_touched(small):
    from click.testing import CliRunner

    from lalmtool.cli import main

    before = snapshot(small["out"])
    for bad in ({"max_new_tokens": 0}, {"beam": 0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match=f"--{next(iter(bad)).replace('_', '-')} must be"):
            decode(small["feats"], small["model"], str(small["out"]), **bad)
    for flag in ("--max-new-tokens", "--beam", "--batch-size"):
        res = CliRunner().invoke(main, ["decode", "--feats", small["feats"], "--model",
                                        small["model"], "--out", str(small["out"]), flag, "0"])
        assert res.exit_code == 2 and f"Invalid value for '{flag}'" in res.output
    assert snapshot(small["out"]) == before


def test_other_inputs_are_refused_naming_what_differs(small, tmp_path):
    import shutil

    from lalmtool.store import StoreError

    out, kw = str(small["out"]), {"max_new_tokens": 4}
    a = lora_adapter(small["model"], tmp_path / "a", seed=1)
    b = lora_adapter(small["model"], tmp_path / "b", seed=2)
    with_a = decode(small["feats"], small["model"], out, adapter=a, force=True, **kw)
    before = snapshot(small["out"])
    # finetune's and align's refusal, word for word (``record.refusal``)
    with pytest.raises(StoreError, match=r"holds a decode with another configuration or other "
                       r"inputs \(--adapter: its weights differ\); use another --out, or "
                       r"--force to start over"):
        decode(small["feats"], small["model"], out, adapter=b, **kw)
    assert snapshot(small["out"]) == before
    # the references changed: the manifest's content is an input
    rows = [json.loads(l) for l in open(small["manifest"])]
    rows[0]["text"] = "another reference"
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(StoreError, match=r"\(--manifest: its content differs\)"):
        decode(small["feats"], small["model"], out, adapter=a, manifest=str(changed), **kw)
    redone = decode(small["feats"], small["model"], out, adapter=a, manifest=str(changed),
                    force=True, **kw)
    assert json.loads(open(small["out"] / "hyp.jsonl").readline())["ref"] == "another reference"
    assert redone["fingerprint"] != with_a["fingerprint"]
    # the model is known by its content: a copy under another name is the same model
    copy = tmp_path / "copy-of-model"
    shutil.copytree(small["model"], copy)
    again = decode(small["feats"], str(copy), out, adapter=a, manifest=str(changed), **kw)
    assert again["fingerprint"] == redone["fingerprint"]
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "dropout": 0.5}))
    with pytest.raises(StoreError, match=r"\(--model: its weights differ\)"):
        decode(small["feats"], str(copy), out, adapter=a, manifest=str(changed), **kw)


def test_clear_messages_for_wrong_stores_models_and_adapters(small, tmp_path):
    from lalmtool.store import StoreError

    seg = segment(small["feats"], "uniform", str(tmp_path / "seg"), k=2)
    with pytest.raises(StoreError, match="is a boundary store .* Pool it first: lalmtool pool"):
        decode(str(tmp_path / "seg"), small["model"], str(tmp_path / "d1"))
    adapter = lora_adapter(small["model"], tmp_path / "a", seed=1)
    with pytest.raises(ValueError, match="is a LoRA adapter .* pass it as --adapter"):
        decode(small["feats"], adapter, str(tmp_path / "d2"))
    speech = lora_adapter(small["model"], tmp_path / "s", seed=1, backend="speechllm",
                          extra={"encoder": "whisper-tiny.en", "stack": 4})
    with pytest.raises(ValueError, match="trained with the speechllm backend .* --backend speechllm"):
        decode(small["feats"], small["model"], str(tmp_path / "d3"), adapter=speech)
    with pytest.raises(ValueError, match="backend 'whisper' has no option stack"):
        decode(small["feats"], small["model"], str(tmp_path / "d4"), backend_opts={"stack": 4})
    assert seg and not any((tmp_path / d).exists() and list((tmp_path / d).iterdir())
                           for d in ("d1", "d2", "d3", "d4"))


def test_backend_opts_update_the_adapters_training_options(small, tmp_path):
    adapter = lora_adapter(small["model"], tmp_path / "a", seed=1, extra={"trim": True,
                                                                          "language": "en"})
    info = decode(small["feats"], small["model"], str(tmp_path / "d"), adapter=adapter,
                  max_new_tokens=3, backend_opts={"language": "de"})
    assert info["backend_opts"] == {"trim": True, "language": "de"}


def test_a_finished_decode_reruns_without_the_backend(small, tmp_path, monkeypatch):
    import lalmtool.decode as dec

    first = decode(small["feats"], small["model"], str(tmp_path / "d"), max_new_tokens=3)
    for name in ("check_backend_options", "_check_tap", "load_for_decoding"):  # what imports the backend
        monkeypatch.setattr(dec, name, lambda *a, **k: pytest.fail("the backend was needed"))
    again = decode(small["feats"], small["model"], str(tmp_path / "d"), max_new_tokens=3)
    assert again == first
    with pytest.raises(BaseException, match="the backend was needed"):  # other inputs: checked
        decode(small["feats"], small["model"], str(tmp_path / "d2"), max_new_tokens=4)


def test_lora_stays_unmerged_in_bfloat16_and_decodes_as_the_unmerged_model(small, tmp_path):
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from lalmtool.models import attach_adapter
    from lalmtool.models.whisper import WhisperBackend

    adapter = lora_adapter(small["model"], tmp_path / "a", seed=3)
    merged = WhisperBackend(small["model"])
    attach_adapter(merged, adapter)  # float32: merged, no LoRA layer left
    assert not isinstance(merged.model, PeftModel)
    assert not any("lora_A" in n for n, _ in merged.model.named_modules())
    half = WhisperBackend(small["model"], dtype="bfloat16")
    attach_adapter(half, adapter)
    assert isinstance(half.model, PeftModel) and half.model.base_model.model.dtype == torch.bfloat16
    lora_layers = [m for m in half.model.modules() if isinstance(m, LoraLayer)]
    assert len(lora_layers) == 6  # q and v of the encoder's self-attention, decoder's self and cross
    info = decode(small["feats"], small["model"], str(tmp_path / "d"), adapter=adapter,
                  batch_size=5, max_new_tokens=6, backend_opts={"dtype": "bfloat16"})
    reference = WhisperBackend(small["model"], dtype="bfloat16")
    reference.model = PeftModel.from_pretrained(reference.model, adapter).eval()
    store = Store(small["feats"])
    expected = {u: reference.generate([torch.from_numpy(store[u].astype("float32"))],
                                      max_new_tokens=6)[0] for u in store.ids}
    assert hyps(tmp_path / "d") == expected and info["backend_opts"] == {"dtype": "bfloat16"}


def test_a_failing_batch_is_named(small, tmp_path, monkeypatch):
    from lalmtool.models.whisper import WhisperBackend

    def fail(self, feats, beam, caps, floors=None):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(WhisperBackend, "transcribe", fail)
    with pytest.raises(RuntimeError, match=r"decoding 'utt3', 'utt1' \(the longest 160 audio "
                                           r"positions; .*\): CUDA out of memory"):
        decode(small["feats"], small["model"], str(tmp_path / "d"), batch_size=2)


def test_end_not_before_is_transformers_min_new_tokens_when_every_floor_is_the_same():
    import torch
    from transformers import MinNewTokensLengthLogitsProcessor

    from lalmtool.models.base import EndNotBefore

    torch.manual_seed(0)
    ids, scores = torch.randint(0, 50, (4, 12)), torch.randn(4, 50)
    ours = EndNotBefore([3, 3], [7, 9], beams=2)  # 2 rows x 2 beams
    ref = MinNewTokensLengthLogitsProcessor(5, 3, [7, 9])
    for length in range(5, 12):  # the first call sees the 5 prompt tokens
        assert torch.equal(ours(ids[:, :length], scores), ref(ids[:, :length], scores)), length
    masked = EndNotBefore([1, 4], [7], beams=1)(ids[:2, :5], scores[:2])
    assert masked[:, 7].tolist() == [-float("inf")] * 2 and torch.equal(masked[:, :7],
                                                                         scores[:2, :7])


def test_a_length_aware_end_keeps_each_row_going_to_its_own_floor(tiny_whisper_lm):
    """A decoder that would end at once (its end token's logit raised by 100) ends exactly at
    each row's floor: after 3 and 6 new tokens."""
    import torch

    from lalmtool.models.base import EndNotBefore
    from lalmtool.models.whisper import WhisperBackend

    be = WhisperBackend(tiny_whisper_lm)
    eos = be.tokenizer.eos_token_id
    push = torch.zeros(be.model.config.vocab_size)
    push[eos] = 100.0
    be.model.proj_out.register_forward_hook(lambda _m, _i, out: out + push)
    feats = [torch.randn(40, 32), torch.randn(60, 32)]

    def first_end(processors):
        rows = be.new_token_ids(feats, 1, 10, processors).tolist()
        return [row.index(eos) for row in rows]

    assert first_end(None) == [1, 1]  # Whisper suppresses the end token at the first step only
    assert first_end([EndNotBefore([3, 6], be.stop_ids())]) == [3, 6]
    texts = be.transcribe(feats, 1, [10, 10], [3, 6])
    assert [len(be.tokenizer.encode(t, add_special_tokens=False)) for t, _ in texts] == [3, 6]


def test_decode_gives_each_piece_its_floor_from_its_seconds(small, tmp_path, monkeypatch):
    from lalmtool.models.whisper import WhisperBackend

    seen, real = [], WhisperBackend.transcribe

    def spy(self, feats, beam, caps, floors=None):
        seen.extend(zip(caps, floors))
        return real(self, feats, beam, caps, floors)

    monkeypatch.setattr(WhisperBackend, "transcribe", spy)
    with pytest.raises(ValueError, match=r"--min-tokens-per-s must be a number >= 0, not -1"):
        decode(small["feats"], small["model"], str(tmp_path / "d"), min_tokens_per_s=-1)
    info = decode(small["feats"], small["model"], str(tmp_path / "d"), min_tokens_per_s=2.5)
    store = Store(small["feats"])
    seconds = sorted(float(store.attrs(u)["duration"]) for u in store.ids)
    caps = [16 + int(-(-8 * s // 1)) for s in seconds]  # auto_cap
    assert sorted(seen) == sorted(zip(caps, [min(int(2.5 * s), c - 1)
                                             for s, c in zip(seconds, caps)]))
    assert info["min_tokens_per_s"] == 2.5
    before = json.load(open(tmp_path / "d" / "decode.fingerprint"))
    assert before["inputs"]["min_tokens_per_s"] == 2.5  # another decode: not reused


def test_cuda_means_the_local_rank_under_torchrun(small, tmp_path, monkeypatch):
    import lalmtool.models as stage

    seen = []

    def fake_load(backend, model, device, **opts):
        seen.append(device)
        raise RuntimeError("stop here")

    monkeypatch.setattr(stage, "load_backend", fake_load)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(RuntimeError, match="stop here"):
        decode(small["feats"], small["model"], str(tmp_path / "d"), device="cuda")
    assert seen == ["cuda:1"]


# -- failures found by breaking the stage (named cases) -------------------------------------
def test_a_manifest_without_some_of_the_stores_ids_is_refused(small, tmp_path):
    """R3a: hypotheses were written without references, and exited 0."""
    rows = [json.loads(line) for line in open(small["manifest"])][:3]
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf"2 utterance\(s\) of {small['feats']} are not in "
                                         rf"--manifest {partial} \(e.g. 'utt3', 'utt4'\)"):
        decode(small["feats"], small["model"], str(tmp_path / "d"), max_new_tokens=4,
               manifest=str(partial))
    assert not (tmp_path / "d").exists()


def test_a_damaged_or_mismatched_adapter_is_named_and_out_is_left_as_it_was(small, tmp_path):
    """R6, R9: a truncated adapter_model.safetensors gave a SafetensorError traceback and left
    decode.fingerprint; a rank that does not match gave torch's state-dict error."""
    import shutil

    good = lora_adapter(small["model"], tmp_path / "run", seed=1)
    cut = tmp_path / "cut" / "adapter"
    shutil.copytree(good, cut)
    weights = cut / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(ValueError, match=rf"adapter {cut} cannot be loaded \(SafetensorError: "
                                         r".*\); its files are damaged"):
        decode(small["feats"], small["model"], str(tmp_path / "d"), adapter=str(cut),
               max_new_tokens=4)
    assert os.listdir(tmp_path / "d") == []  # no decode.fingerprint left
    other = tmp_path / "rank" / "adapter"
    shutil.copytree(good, other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match=rf"adapter {other} does not fit this model \(its "
                                         r"adapter_config.json: r=8, base model .*\): size "
                                         r"mismatch for .*lora_A"):
        decode(small["feats"], small["model"], str(tmp_path / "e"), adapter=str(other),
               max_new_tokens=4)


def test_out_may_not_be_the_store_and_chunk_must_be_a_number(small, tmp_path, caplog):
    """R10, R8: hypotheses went into the feature store; chunk=abc gave int()'s message. chunk is
    a decode option (--chunk); the old --backend-opt chunk=N still works, said deprecated."""
    with pytest.raises(ValueError, match=rf"--out {small['feats']} is the input store"):
        decode(small["feats"], small["model"], small["feats"], max_new_tokens=4)
    assert not os.path.exists(os.path.join(small["feats"], "hyp.jsonl"))
    with pytest.raises(ValueError, match=r"^--chunk must be a whole number >= 0, not 'abc'$"):
        decode(small["feats"], small["model"], str(tmp_path / "c"), max_new_tokens=4,
               backend_opts={"chunk": "abc"})
    with pytest.raises(ValueError, match=r"^--chunk must be a whole number >= 0, not -2$"):
        decode(small["feats"], small["model"], str(tmp_path / "c"), max_new_tokens=4, chunk=-2)
    with pytest.raises(ValueError, match=r"^--chunk 3 and --backend-opt chunk=4 disagree"):
        decode(small["feats"], small["model"], str(tmp_path / "c"), max_new_tokens=4, chunk=3,
               backend_opts={"chunk": 4})
    new = decode(small["feats"], small["model"], str(tmp_path / "new"), max_new_tokens=4,
                 chunk=3)
    runner = CliRunner()
    r = runner.invoke(main, ["decode", "--feats", small["feats"], "--model", small["model"],
                             "--out", str(tmp_path / "old"), "--max-new-tokens", "4",
                             "--backend-opt", "chunk=3"])
    assert r.exit_code == 0, r.output
    assert "--backend-opt chunk=3 is now --chunk 3 (a decode option)" in caplog.text
    old = json.loads(open(tmp_path / "old" / "decode.json").read())
    assert (new["chunk"], old["chunk"], old["backend_opts"]) == (3, 3, {})
    assert hyps(str(tmp_path / "old")) == hyps(str(tmp_path / "new"))
    assert any(json.loads(line).get("chunks", 1) > 1
               for line in open(tmp_path / "new" / "hyp.jsonl"))
