"""``lalmtool transcribe`` / ``Transcriber``: in memory, the hypotheses of the stages (manifest →
extract → segment → pool → decode) on the same audio with the same adapter, per backend and per
compressor kind; long recordings in pieces with times; bad input named."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from conftest import OLD_FILES, hyps_of, librivox_rows, previous_release, tone, write_manifest
from lalmtool import trained
from lalmtool.cli import main
from lalmtool.decode import _adapter_condition, decode
from lalmtool.export import export, read_export
from lalmtool.extract import extract
from lalmtool.fileio import file_sha256
from lalmtool.finetune import TrainConfig, finetune
from lalmtool.models import base_weights
from lalmtool.pool import pool_store
from lalmtool.segment import segment
from lalmtool.store import Store
from lalmtool.transcribe import Transcriber, parse_condition, render

TEXTS = ["the cat sat", "then the end", "in the hen", "the ten men", "a hat", "the sun"]


def clips(tmp_path, seconds=(0.9, 1.4, 0.6, 1.2, 0.8, 1.7)) -> tuple[str, list[str]]:
    rows, paths = [], []
    tmp_path.mkdir(parents=True, exist_ok=True)
    for i, sec in enumerate(seconds):
        path = tmp_path / f"c{i}.wav"
        sf.write(path, tone(sec, freq=170 + 50 * i, seed=i), 16000)
        rows.append({"id": f"c{i}", "audio": path.name, "text": TEXTS[i % len(TEXTS)]})
        paths.append(str(path))
    return write_manifest(tmp_path / "m.jsonl", rows), paths


def stages(tmp_path, model, backend, method, k=None, learnt=False, steps=4, opts=None,
           decode_opts=None) -> tuple[str, dict[str, str]]:
    """The adapter trained on ``method`` (uniform by k, or peaks; ``learnt``: the pooler too)
    and the hypotheses of decoding the pooled store with it; the transcriber's compression of
    each clip is checked against the pooled store, row for row."""
    m, _ = clips(tmp_path)
    feats = extract(m, model, str(tmp_path / "feats"), backend=backend,
                    backend_opts=opts)["store"]
    segment(feats, method, str(tmp_path / "seg"), k=k)
    cfg = TrainConfig(backend=backend, max_steps=steps, batch_size=3, lr=1e-2, warmup_steps=0,
                      lora_r=4, lora_dropout=0.0, save_every=steps, log_every=1,
                      extra=dict(opts or {}))
    if learnt:
        s = finetune(feats, m, model, str(tmp_path / "lora"), cfg, segments=str(tmp_path / "seg"))
        pooled = pool_store(feats, str(tmp_path / "seg"), "learnt", str(tmp_path / "pooled"),
                            pooler=s["adapter"])["store"]
    else:
        pooled = pool_store(feats, str(tmp_path / "seg"), "mean", str(tmp_path / "pooled"))["store"]
        s = finetune(pooled, m, model, str(tmp_path / "lora"), cfg)
    decode(pooled, model, str(tmp_path / "dec"), adapter=s["adapter"], backend=backend,
           max_new_tokens=8, batch_size=4, backend_opts=decode_opts)
    hyps = {json.loads(l)["id"]: json.loads(l)["hyp"] for l in open(tmp_path / "dec" / "hyp.jsonl")}
    t = Transcriber(model, adapter=s["adapter"])
    store = Store(pooled)
    for u in store.ids:  # the same features as the stores, bit for bit
        wave = sf.read(tmp_path / f"{u}.wav", dtype="float32")[0]
        ours = t.compress(t.be.encode([wave])[0].numpy())
        assert ours.dtype == np.float16 and np.array_equal(ours, store[u]), u
    return s["adapter"], hyps


def transcribed(model, adapter, tmp_path, **kw) -> dict[str, str]:
    _, paths = clips(tmp_path)
    t = Transcriber(model, adapter=adapter, max_new_tokens=8, batch_size=4, **kw)
    return {os.path.basename(r.name)[:-4]: r.text for r in t.transcribe(paths)}


@pytest.mark.parametrize("method,k,learnt", [("uniform", 3, False), ("peaks", None, False),
                                             ("uniform", 3, True)],
                         ids=["uniform-k3", "peaks", "learnt-k3"])
def test_whisper_transcribe_gives_the_stages_hypotheses(tiny_whisper_lm, tmp_path, method, k,
                                                         learnt):
    adapter, hyps = stages(tmp_path, tiny_whisper_lm, "whisper", method, k, learnt)
    with open(os.path.join(adapter, "lalmtool.json")) as fh:
        record = json.load(fh)["compression"]
    reduce = "learnt" if learnt else "mean"
    assert record["steps"] == [{"method": method, "params": {"k": k} if k else {},
                                "reduce": reduce}]
    assert transcribed(tiny_whisper_lm, adapter, tmp_path) == hyps


def test_decoder_only_backends_transcribe_as_the_stages(tmp_path):
    from lalmtool.testing import write_random_audio_llm, write_random_qwen2_audio

    q = write_random_qwen2_audio(str(tmp_path / "q2a"))
    adapter, hyps = stages(tmp_path / "a", q, "qwen2-audio", "uniform", 2)
    assert transcribed(q, adapter, tmp_path / "a") == hyps
    v = write_random_audio_llm("voxtral", str(tmp_path / "vox"))
    adapter, hyps = stages(tmp_path / "b", v, "voxtral", "peaks")
    assert transcribed(v, adapter, tmp_path / "b") == hyps


def test_a_long_recording_is_decoded_in_30_s_pieces_with_times(tiny_whisper_lm, tmp_path):
    adapter, _ = stages(tmp_path, tiny_whisper_lm, "whisper", "uniform", 3)
    long = tmp_path / "long.wav"
    sf.write(long, tone(70.0, seed=9), 16000)
    m = write_manifest(tmp_path / "long.jsonl", [{"id": "long", "audio": "long.wav", "text": "x"}])
    feats = extract(m, tiny_whisper_lm, str(tmp_path / "lf"))["store"]
    segment(feats, "uniform", str(tmp_path / "ls"), k=3)
    pooled = pool_store(feats, str(tmp_path / "ls"), "mean", str(tmp_path / "lp"))["store"]
    decode(pooled, tiny_whisper_lm, str(tmp_path / "ld"), adapter=adapter, max_new_tokens=8,
           chunk=500)  # 30 s of frames pooled by 3
    staged = json.loads(open(tmp_path / "ld" / "hyp.jsonl").readline())
    t = Transcriber(tiny_whisper_lm, adapter=adapter, max_new_tokens=8)
    [r] = t.transcribe([str(long)])
    assert r.text == staged["hyp"] and staged["chunks"] == 3
    assert [(p.start, p.end) for p in r.pieces] == [(0.0, 29.991), (29.991, 59.983),
                                                    (59.983, 70.0)]
    srt = render(r, "srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:29,991\n")
    assert render(r, "vtt").startswith("WEBVTT\n\n00:00:00.000 --> 00:00:29.991\n")


def test_the_compression_comes_from_the_adapter_and_compress_must_agree(tiny_whisper_lm,
                                                                         tmp_path):
    adapter, _ = stages(tmp_path, tiny_whisper_lm, "whisper", "uniform", 3, steps=2)
    assert Transcriber(tiny_whisper_lm, adapter=adapter).condition == "uniform-mean-k3"
    assert Transcriber(tiny_whisper_lm, adapter=adapter,
                       compress="uniform-mean-k3").condition == "uniform-mean-k3"
    with pytest.raises(ValueError, match="--compress uniform-mean-k2 contradicts --adapter .* "
                                         "trained on uniform-mean-k3"):
        Transcriber(tiny_whisper_lm, adapter=adapter, compress="uniform-mean-k2")

    previous_release(adapter)
    os.remove(os.path.join(adapter, "compression.json"))  # from before compression.json
    with pytest.raises(ValueError, match="does not record the compression it was trained on.*"
                                         "--compress"):
        Transcriber(tiny_whisper_lm, adapter=adapter)
    assert Transcriber(tiny_whisper_lm, adapter=adapter,
                       compress="uniform-mean-k3").condition == "uniform-mean-k3"
    assert parse_condition("peaks-mean+uniform-pick-k2") == [
        {"method": "peaks", "params": {}, "reduce": "mean"},
        {"method": "uniform", "params": {"k": 2}, "reduce": "pick"}]
    with pytest.raises(ValueError, match="a condition is frames or METHOD-REDUCE"):
        parse_condition("uniform-k3")


def test_cli_formats_folders_stdin_and_bad_files(tiny_whisper_lm, tmp_path):
    _, paths = clips(tmp_path / "audio")
    (tmp_path / "audio" / "bad.wav").write_bytes(b"not audio at all")
    (tmp_path / "audio" / "notes.txt").write_text("not audio")
    base = ["transcribe", "--model", tiny_whisper_lm, "--max-new-tokens", "3"]
    r = CliRunner().invoke(main, base + [str(tmp_path / "audio")])
    assert r.exit_code != 0 and "bad.wav" in r.output and "--on-error skip" in r.output
    r = CliRunner().invoke(main, base + ["--on-error", "skip", "--format", "jsonl",
                                         str(tmp_path / "audio")])
    assert r.exit_code == 0, r.output
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert [os.path.basename(x["name"]) for x in lines] == [f"c{i}.wav" for i in range(6)]
    assert "skipped" in r.stderr and "bad.wav" in r.stderr
    out = tmp_path / "out"
    r = CliRunner().invoke(main, base + ["--format", "srt", "--out", str(out), "-"],
                           input="\n".join(paths[:2]) + "\n")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["c0.srt", "c1.srt"]
    assert open(out / "c0.srt").read().startswith("1\n00:00:00,000 --> 00:00:00,900\n")
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, base + [str(tmp_path / "empty")])
    assert r.exit_code != 0 and "a folder with no audio files" in r.output
    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(main, base + ["--out", str(tmp_path / "afile"), paths[0]])
    assert r.exit_code != 0 and "--out" in r.output and "is a file" in r.output


def test_arrays_are_16k_mono_and_bad_arrays_are_named(tiny_whisper):
    t = Transcriber(tiny_whisper, max_new_tokens=3)
    wave = tone(1.0)
    mono, stereo = t.transcribe([wave, np.stack([wave, wave], axis=1)])
    assert (mono.name, stereo.name) == ("array0", "array1") and mono.text == stereo.text
    assert mono.tokens == 50 and mono.duration == 1.0  # frames: 50 per second
    with pytest.raises(ValueError, match="array0: a waveform is a non-empty 1-D array"):
        t.transcribe([np.zeros((0,), np.float32)])


def test_export_is_the_adapter_merged_and_transcribes_alone(tiny_whisper_lm, tmp_path):
    import torch

    from lalmtool.models import load_adapter, load_backend

    adapter, hyps = stages(tmp_path, tiny_whisper_lm, "whisper", "uniform", 3, learnt=True)
    out = tmp_path / "exported"
    r = CliRunner().invoke(main, ["export", "--adapter", adapter, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "whisper on uniform-learnt-k3 (LoRA merged" in r.output
    assert not any(n.startswith("adapter_") for n in os.listdir(out))  # no peft files
    assert {"lalmtool.json", "pooler.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    assert transcribed(str(out), None, tmp_path) == hyps
    # the merged weights give the unmerged adapter's loss (float32)
    t = Transcriber(str(out))
    feats = [torch.from_numpy(Store(str(tmp_path / "pooled"))[u].astype(np.float32))
             for u in ("c0", "c1")]
    unmerged = load_backend("whisper", tiny_whisper_lm)
    unmerged.model = load_adapter(unmerged.model, adapter)
    with torch.no_grad():
        a, _ = t.be.loss(feats, TEXTS[:2])
        b, _ = unmerged.loss(feats, TEXTS[:2])
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    r = CliRunner().invoke(main, ["export", "--adapter", adapter, "--out", str(out)])
    assert r.exit_code != 0 and "exists" in r.output and "--force" in r.output


def test_other_rates_and_stereo_files_are_converted_and_said_once(tiny_whisper, tmp_path, caplog):
    wave = tone(1.0)
    sf.write(tmp_path / "a.wav", np.stack([wave, wave], 1), 16000)
    sf.write(tmp_path / "b.wav", np.stack([wave, wave], 1), 16000)
    from scipy.signal import resample_poly
    sf.write(tmp_path / "c.wav", resample_poly(wave, 3, 1).astype(np.float32), 48000)
    t = Transcriber(tiny_whisper, max_new_tokens=2)
    a, b, c = t.transcribe([str(tmp_path / f) for f in ("a.wav", "b.wav", "c.wav")])
    assert (a.duration, c.duration) == (1.0, 1.0) and c.tokens == a.tokens == 50
    said = [r.getMessage() for r in caplog.records]
    assert sum("mixed down to mono" in m for m in said) == 1
    assert sum("48000 Hz audio (e.g." in m and "resampled to 16000 Hz" in m for m in said) == 1


@pytest.mark.parametrize("quantization", ["float32", "int8"])
def test_ct2_export_decodes_the_compressed_memory_as_the_adapter(tiny_whisper_lm, tmp_path,
                                                                  quantization):
    adapter, hyps = stages(tmp_path, tiny_whisper_lm, "whisper", "uniform", 3, learnt=True)
    out = tmp_path / "ct2"
    r = CliRunner().invoke(main, ["export", "--adapter", adapter, "--out", str(out),
                                  "--format", "ct2", "--quantization", quantization])
    assert r.exit_code == 0, r.output
    assert f"whisper on uniform-learnt-k3 (CTranslate2 {quantization}" in r.output
    assert {"model.bin", "lalmtool.json", "pooler.safetensors", "tokenizer.json",
            "preprocessor_config.json"} <= set(os.listdir(out))
    assert not any(n.startswith("adapter_") or n.endswith(".safetensors") and n != "pooler.safetensors"
                   for n in os.listdir(out))
    assert transcribed(str(out), None, tmp_path) == hyps
    t = Transcriber(str(out))
    assert type(t.be).__name__ == "Ct2WhisperBackend" and t.condition == "uniform-learnt-k3"


@pytest.mark.slow
def test_ct2_int8_export_of_real_whisper_keeps_the_adapters_wer(tiny_en, librivox_manifest,
                                                                tmp_path):
    """Whisper tiny.en with a k=3 LoRA on the natural LibriVox clips: the CTranslate2 float32
    export gives the adapter's hypotheses, the int8 export its WER (within 0.5 points)."""
    from lalmtool.score import get_normalizer, wer_counts

    feats = extract(librivox_manifest, tiny_en, str(tmp_path / "feats"))["store"]
    segment(feats, "uniform", str(tmp_path / "seg"), k=3)
    pooled = pool_store(feats, str(tmp_path / "seg"), "mean", str(tmp_path / "pooled"))["store"]
    cfg = TrainConfig(backend="whisper", max_steps=30, batch_size=5, lr=1e-3, warmup_steps=0,
                      lora_r=8, lora_dropout=0.0, save_every=30, log_every=10)
    adapter = finetune(pooled, librivox_manifest, tiny_en, str(tmp_path / "lora"), cfg)["adapter"]
    rows = librivox_rows()
    norm = get_normalizer("whisper_english")

    def wer(model, adapter=None) -> tuple[float, list[str]]:
        texts = [r.text for r in Transcriber(model, adapter=adapter).transcribe(
            [row["audio"] for row in rows])]
        counts, _ = wer_counts([norm(row["text"]) for row in rows], [norm(t) for t in texts])
        return 100 * counts["wer"], texts

    ours, texts = wer(tiny_en, adapter)
    assert ours < 15, texts  # the adapter transcribes (without it: > 100 %, runaways)
    for q in ("float32", "int8"):
        export(adapter, str(tmp_path / q), format="ct2", quantization=q)
    assert wer(str(tmp_path / "float32"))[1] == texts
    assert wer(str(tmp_path / "int8"))[0] == pytest.approx(ours, abs=0.5)


# -- the adapter's record, lalmtool.json (lalmtool.trained) ------------------------------
def test_a_finetune_adapter_holds_one_record(tiny_whisper_lm, tmp_path):
    adapter, _ = stages(tmp_path, tiny_whisper_lm, "whisper", "uniform", 3, learnt=True)
    names = set(os.listdir(adapter))
    assert {"lalmtool.json", "adapter_config.json", "adapter_model.safetensors",
            "pooler.safetensors", "README.md"} <= names and not names & OLD_FILES
    record = json.loads((tmp_path / "lora" / "adapter" / "lalmtool.json").read_text())
    summary = json.loads((tmp_path / "lora" / "summary.json").read_text())
    assert record == {
        "kind": "lora-adapter", "format_version": 1, "backend": "whisper",
        "backend_options": {}, "base_model": tiny_whisper_lm,
        "base_weights": base_weights(tiny_whisper_lm),
        "compression": {"condition": "uniform-learnt-k3",
                        "steps": [{"method": "uniform", "params": {"k": 3}, "reduce": "learnt"}],
                        "frame_rate": 50.0, "trim": True, "input_seconds": None},
        "pooler": {k: v for k, v in summary["pooler"].items() if k != "parameters"},
        "trained_on": {
            "condition": "uniform-learnt-k3",
            "feats": {"path": str(tmp_path / "feats"),
                      "fingerprint": Store(str(tmp_path / "feats")).fingerprint},
            "manifest": {"path": str(tmp_path / "m.jsonl"),
                         "sha256": file_sha256(str(tmp_path / "m.jsonl"))},
            "segments": {"path": str(tmp_path / "seg"),
                         "fingerprint": Store(str(tmp_path / "seg")).fingerprint}}}
    assert trained.read(adapter) == record
    # OUT/last is an adapter too: the same record
    assert json.loads((tmp_path / "lora" / "last" / "lalmtool.json").read_text()) == record
    assert _adapter_condition(adapter, "frames") == "uniform-learnt-k3"
    assert _adapter_condition(adapter, "uniform-learnt-k3") is None


def test_an_adapter_of_the_previous_release_decodes_transcribes_pools_and_exports_the_same(
        tiny_whisper_lm, tmp_path):
    adapter, hyps = stages(tmp_path, tiny_whisper_lm, "whisper", "uniform", 3, learnt=True)
    new = previous_release(adapter)
    assert OLD_FILES <= set(os.listdir(adapter)) and "lalmtool.json" not in os.listdir(adapter)
    old = trained.read(adapter)
    assert old == {**new, "format_version": 0, "trained_on": {"condition": "uniform-learnt-k3"}}
    assert old.source("pooler") == os.path.join(adapter, "pooler.json")
    assert _adapter_condition(adapter, "frames") == "uniform-learnt-k3"
    # its pooler writes the same store, decode and transcribe give the same hypotheses
    feats, seg = str(tmp_path / "feats"), str(tmp_path / "seg")
    again = pool_store(feats, seg, "learnt", str(tmp_path / "pooled-old"), pooler=adapter)
    assert Store(again["store"]).fingerprint == Store(str(tmp_path / "pooled")).fingerprint
    decode(str(tmp_path / "pooled"), tiny_whisper_lm, str(tmp_path / "dec-old"), adapter=adapter,
           max_new_tokens=8, batch_size=4)
    assert hyps_of(tmp_path / "dec-old") == hyps
    assert transcribed(tiny_whisper_lm, adapter, tmp_path) == hyps
    # its export records what the adapter held
    out = str(tmp_path / "exported")
    record = export(adapter, out)
    assert (record["kind"], record["pooler"], record["compression"]) == \
        ("export", new["pooler"], new["compression"])
    assert read_export(out) == record and transcribed(out, None, tmp_path) == hyps
    # an export of the previous release (lalmtool.json without kind, pooler.json beside it)
    with open(os.path.join(out, "lalmtool.json"), "w") as fh:
        json.dump({k: record[k] for k in ("backend", "backend_options", "compression",
                                          "base_model", "adapter", "format")}, fh)
    with open(os.path.join(out, "pooler.json"), "w") as fh:
        json.dump(new["pooler"], fh)
    assert read_export(out)["pooler"] == new["pooler"]
    assert transcribed(out, None, tmp_path) == hyps
