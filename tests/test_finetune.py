"""finetune mechanics on a tiny random Whisper: resume after a kill, DDP on 2 CPU processes."""
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import CFG, adapter, assert_same, killed_at_step
from lalmtool import examples as E
from lalmtool import finetune as F
from lalmtool.extract import extract


def test_overrides_and_config_errors(tmp_path):
    from lalmtool.cli import parse_overrides

    o = parse_overrides(["--lr=3e-4", "max_steps=5", "target_modules=[q_proj, v_proj]"])
    cfg = F.TrainConfig.load(None, o)
    assert (cfg.lr, cfg.max_steps, cfg.target_modules) == (3e-4, 5, ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="must be a number"):
        F.TrainConfig.load(None, {"lr": "fast"})
    with pytest.raises(ValueError, match="unknown training option"):
        F.TrainConfig.load(None, {"learning_rate": 1})
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["lr"])


def test_batching_by_duration_and_epochs(train_set):
    ex = E.Examples(*train_set)
    cfg = F.TrainConfig(batch_seconds=2.0, seed=1)
    batches = E.epoch_batches(ex, cfg, 0)
    assert sorted(u for b in batches for u in b) == sorted(ex.ids)
    assert all(sum(ex.duration[u] for u in b) <= 2.0 or len(b) == 1 for b in batches)
    assert E.epoch_batches(ex, cfg, 0) == batches and E.epoch_batches(ex, cfg, 1) != batches


def test_resume_after_interruption_gives_the_same_adapter(train_set, tiny_whisper_lm, tmp_path,
                                                          monkeypatch):
    feats, m = train_set
    cfg = F.TrainConfig(**CFG)
    F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "a"), cfg)
    ref = adapter(tmp_path / "a" / "adapter")

    real_save = F._save_checkpoint
    monkeypatch.setattr(F, "_save_checkpoint", killed_at_step(6))
    with pytest.raises(KeyboardInterrupt):
        F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "b"), cfg)
    assert F.latest_checkpoint(str(tmp_path / "b")).endswith("step-4")
    # killed while writing step 6: a partial step-6.tmp/state.pt is never resumed from
    partial = tmp_path / "b" / "checkpoints" / "step-6.tmp"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"PK\x03 truncated")
    assert F.latest_checkpoint(str(tmp_path / "b")).endswith("step-4")
    monkeypatch.setattr(F, "_save_checkpoint", real_save)
    s = F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "b"), cfg)
    assert s["steps"] == 8
    assert_same(adapter(tmp_path / "b" / "adapter"), ref)
    steps = [json.loads(l)["step"] for l in open(tmp_path / "b" / "log.jsonl")]
    assert steps == list(range(1, 9))  # nothing logged twice
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["step-6", "step-8"]
    # a different configuration refuses to resume in the same directory
    with pytest.raises(ValueError, match=r"another configuration .*\(lr: 0.005 there, "
                                         r"1.0 now\)"):
        F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "b"), F.TrainConfig(**{**CFG, "lr": 1}))
    # a finished run's rerun returns its summary without loading the model
    monkeypatch.setattr(F, "_model", lambda *a: pytest.fail("the model was loaded"))
    assert F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "b"), cfg) == s


def test_sigkill_then_rerun_gives_the_same_adapter(train_set, tiny_whisper_lm, tmp_path):
    feats, m = train_set
    args = [sys.executable, "-m", "lalmtool.cli", "finetune", "--feats", feats, "--manifest", m,
            "--model", tiny_whisper_lm, "--max_steps=30", "--batch_size=3", "--save_every=3",
            "--log_every=1", "--warmup_steps=2"]
    subprocess.run(args + ["--out", str(tmp_path / "a")], check=True, capture_output=True)
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "b")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = tmp_path / "b" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 7:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "finished before it could be killed"
    assert not (tmp_path / "b" / "adapter").exists()
    subprocess.run(args + ["--out", str(tmp_path / "b")], check=True, capture_output=True)
    assert_same(adapter(tmp_path / "b" / "adapter"), adapter(tmp_path / "a" / "adapter"))


def test_ddp_two_processes_equals_gradient_accumulation(train_set, tiny_whisper_lm, tmp_path):
    feats, m = train_set
    common = ["--feats", feats, "--manifest", m, "--model", tiny_whisper_lm, "--max_steps=4",
              "--batch_size=3", "--lora_dropout=0", "--warmup_steps=1", "--save_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    "--master_port=29533", "-m", "lalmtool.cli", "finetune", *common,
                    "--out", str(tmp_path / "ddp")], check=True, capture_output=True, env=env)
    cfg = F.TrainConfig(max_steps=4, batch_size=3, lora_dropout=0.0, warmup_steps=1,
                        save_every=2, grad_accum=2)
    F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "single"), cfg)
    assert_same(adapter(tmp_path / "ddp" / "adapter"), adapter(tmp_path / "single" / "adapter"),
                atol=1e-5)


# -- configuration and command line -----------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    ({"save_every": 0}, "save_every must be >= 1, not 0"),
    ({"grad_accum": 0}, "grad_accum must be >= 1, not 0"),
    ({"max_steps": "abc"}, "max_steps must be an integer, not 'abc'"),
    ({"max_steps": 0}, r"max_steps must be >= 1 \(no steps would write untrained weights\)"),
    ({"max_steps": -5}, "max_steps must be >= 1 .*not -5"),
    ({"lr": 0}, "lr must be > 0, not 0.0"),
    ({"amp": "fp8"}, "amp must be one of auto, bf16, fp16, off, not 'fp8'"),
    ({"backend": "gpt"}, "backend must be one of whisper, qwen2-audio, speechllm, audio-llm, "
                         "qwen2-audio-chat, voxtral, granite-speech, qwen2.5-omni, audioflamingo3, "
                         "glm-asr, qwen3-asr, not 'gpt'"),
    ({"max_step": 3},
     r"unknown training option 'max_step' \(did you mean max_steps or warmup_steps\?\)"),
])
def test_bad_training_options_get_one_clear_message(values, message):
    with pytest.raises(ValueError, match=message):
        F.TrainConfig.load(None, values)


def test_config_file_values_are_typed():
    cfg = F.TrainConfig.load(None, {"lr": "3e-4", "max_steps": "1e3", "epochs": 2})
    assert (cfg.lr, cfg.max_steps, cfg.epochs) == (3e-4, 1000, 2.0)


def test_help_lists_every_training_key_with_default_and_help():
    from click.testing import CliRunner

    from lalmtool.cli import main

    out = CliRunner().invoke(main, ["finetune", "--help"], terminal_width=200).output
    text = " ".join(out.split())
    for f in dataclasses.fields(F.TrainConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        default = "null" if default is None else default
        assert f"--{f.name.replace('_', '-')} " in text
        assert f"{' '.join(f.metadata['help'].split())} [default: {default}]" in text
    assert "--max-steps INT optimizer steps to train (unless epochs is set) [default: 200]" in text
    assert "--tensorboard" not in text and "--force" in text


def test_cli_takes_key_value_and_key_equals_value_and_suggests_close_keys(monkeypatch):
    from click.testing import CliRunner

    from lalmtool.cli import main

    got = {}

    def fake(*a, **k):
        got.update(cfg=a[4], force=k["force"])
        return {"condition": "frames", "steps": 7, "last": {"step": 7, "loss": 0.123456},
                "best_valid_loss": None, "best_step": None, "adapter": "o/adapter"}

    monkeypatch.setattr(F, "finetune", fake)
    base = ["finetune", "--feats", "f", "--manifest", "m", "--model", "x", "--out", "o"]
    r = CliRunner().invoke(main, base + ["--max_steps", "7", "--lr=3e-4", "--lora-r", "4",
                                         "--target_modules=[q_proj, v_proj]", "--force"])
    assert r.exit_code == 0, r.output
    cfg = got["cfg"]
    assert (cfg.max_steps, cfg.lr, cfg.lora_r, cfg.target_modules, got["force"]) == \
        (7, 3e-4, 4, ["q_proj", "v_proj"], True)
    assert r.output.split() == ["condition", "steps", "loss", "best_valid_loss", "best_step",
                                "adapter", "frames", "7", "0.1235", "o/adapter"]  # one table
    r = CliRunner().invoke(main, base + ["--max_step=3"])
    assert r.exit_code == 2 and "No such option '--max_step'" in r.output
    assert "--max-steps" in r.output  # the close match
    r = CliRunner().invoke(main, base + ["--save-every", "0"])
    assert r.exit_code == 1
    assert r.output.strip() == "Error: training option save_every must be >= 1, not 0"


def test_cli_unwritable_out_is_one_line(monkeypatch):
    from click.testing import CliRunner

    from lalmtool.cli import main

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied", "/ro/out/run.json")

    monkeypatch.setattr(F, "finetune", read_only)
    r = CliRunner().invoke(main, ["finetune", "--feats", "f", "--manifest", "m", "--model", "x",
                                  "--out", "/ro/out"])
    assert r.exit_code == 1
    assert r.output.strip() == ("Error: cannot write /ro/out/run.json: Permission denied; "
                                "choose a writable --out (or fix its permissions)")


def test_warmup_longer_than_the_run_is_reported(train_set, caplog):
    ex = E.Examples(*train_set)
    with caplog.at_level("WARNING", logger="lalmtool"):
        assert F._total_steps(F.TrainConfig(max_steps=8, warmup_steps=20), ex, 1) == 8
    assert "warmup_steps=20 is not shorter than the 8 training steps" in caplog.text


# -- inputs, resumption, robustness ---------------------------------------------------------
def test_empty_store_is_refused_instead_of_spinning(train_set, tiny_whisper_lm, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "store.json").write_text(json.dumps(
        {"kind": "feats", "fingerprint": "0" * 64, "meta": {"frame_rate": 50.0}, "shards": {}}))
    with pytest.raises(ValueError, match=f"no utterances in {empty} "):
        F.finetune(str(empty), train_set[1], tiny_whisper_lm, str(tmp_path / "o"),
                   F.TrainConfig(**CFG))


def test_a_held_out_dir_refuses_a_second_finetune(train_set, tiny_whisper_lm, tmp_path):
    import fcntl

    from lalmtool.lock import LockError

    out = tmp_path / "o"
    out.mkdir()
    with open(out / ".lock", "w") as fh:  # another process's lock (an independent flock)
        fh.write(json.dumps({"host": "h", "pid": 4242, "since": "then"}))
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(LockError, match="is being written by pid 4242 on host h"):
            F.finetune(*train_set, tiny_whisper_lm, str(out), F.TrainConfig(**CFG))
    assert sorted(os.listdir(out)) == [".lock"]  # nothing written


def test_tap_of_the_store_must_match_the_backend_options():
    from types import SimpleNamespace

    from lalmtool.store import StoreMeta

    pooled = SimpleNamespace(path="P", meta=StoreMeta({"stage": "pool", "source_meta": {
        "stage": "segment", "source_meta": {"stage": "extract",
                                            "backend_opts": {"tap": "prepool"}}}}))
    with pytest.raises(ValueError, match=r"^tap mismatch: store 'prepool', training 'pooled' "
                                         r"\(P\); pass --backend-opt tap="):
        F._check_tap(pooled, F.TrainConfig(backend="qwen2-audio"))
    F._check_tap(pooled, F.TrainConfig(backend="qwen2-audio", extra={"tap": "prepool"}))
    plain = SimpleNamespace(path="Q", meta=StoreMeta({"stage": "extract", "backend_opts": {}}))
    F._check_tap(plain, F.TrainConfig(backend="qwen2-audio"))  # both the default tap
    with pytest.raises(ValueError, match="tap mismatch: store 'pooled', training 'prepool' "):
        F._check_tap(plain, F.TrainConfig(backend="qwen2-audio", extra={"tap": "prepool"}))


@pytest.fixture(scope="module")
def other_inputs(train_set, tmp_path_factory):
    """A pooled store (uniform k=2) of the training features and a manifest with other texts."""
    from lalmtool.pool import pool_store
    from lalmtool.segment import segment

    feats, m = train_set
    d = tmp_path_factory.mktemp("other")
    segment(feats, "uniform", str(d / "seg"), k=2)
    pooled = pool_store(feats, str(d / "seg"), "mean", str(d / "pooled"))["store"]
    rows = [json.loads(line) for line in open(m)]
    for r in rows:
        r["audio"] = os.path.join(os.path.dirname(m), r["audio"])
        r["text"] = r["text"].upper()
    m2 = d / "m2.jsonl"
    m2.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pooled, str(m2)


def test_other_inputs_are_refused_by_name_and_force_starts_over(train_set, other_inputs,
                                                                 tiny_whisper_lm, tmp_path):
    import shutil

    feats, m = train_set
    pooled, m2 = other_inputs
    cfg = F.TrainConfig(**{**CFG, "max_steps": 2})
    out = str(tmp_path / "run")
    F.finetune(feats, m, tiny_whisper_lm, out, cfg)
    first = adapter(os.path.join(out, "adapter"))
    with pytest.raises(ValueError, match=r"other inputs \(--feats: .*/feats \(fingerprint "
                                         r"[0-9a-f]{12}\) there, .*/pooled \(fingerprint"):
        F.finetune(pooled, m, tiny_whisper_lm, out, cfg)
    with pytest.raises(ValueError, match=r"\(--manifest: .*m.jsonl \(sha256 [0-9a-f]{12}\) "
                                         r"there, .*m2.jsonl"):
        F.finetune(feats, m2, tiny_whisper_lm, out, cfg)
    changed = tmp_path / "model-changed"
    shutil.copytree(tiny_whisper_lm, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "dropout": 0.5}))
    with pytest.raises(ValueError, match=r"\(--model: .*lm0 \(identity [0-9a-f]{12}\) there, "
                                         r".*model-changed \(identity [0-9a-f]{12}\) now"):
        F.finetune(feats, m, str(changed), out, cfg)
    with pytest.raises(ValueError, match=r"\(--init-adapter: none there, "
                                         r".*run/last \(identity [0-9a-f]{12}\) now"):
        F.finetune(feats, m, tiny_whisper_lm, out, cfg, init_adapter=os.path.join(out, "last"))
    with pytest.raises(ValueError, match=r"--valid-feats: none there.*--valid-manifest: none"):
        F.finetune(feats, m, tiny_whisper_lm, out, cfg, valid_feats=feats, valid_manifest=m)
    assert json.load(open(os.path.join(out, "summary.json")))["condition"] == "frames"
    # the same model under another path is the same model: the finished run stands
    same = tmp_path / "model-copy"
    shutil.copytree(tiny_whisper_lm, same)
    assert F.finetune(feats, m, str(same), out, cfg)["steps"] == 2
    assert_same(adapter(os.path.join(out, "adapter")), first)
    # --force starts over: a fresh log, the new condition, no checkpoint of the old run
    s = F.finetune(pooled, m, tiny_whisper_lm, out, cfg, force=True)
    assert s["condition"] == "uniform-mean-k2" and s["steps"] == 2
    assert [json.loads(l)["step"] for l in open(os.path.join(out, "log.jsonl"))] == [1, 2]
    fresh = F.finetune(pooled, m, tiny_whisper_lm, str(tmp_path / "fresh"), cfg)
    assert_same(adapter(os.path.join(out, "adapter")), adapter(fresh["adapter"]))


def test_a_best_adapter_of_an_earlier_run_is_never_exported(train_set, tiny_whisper_lm,
                                                            tmp_path):
    feats, m = train_set
    cfg = F.TrainConfig(**{**CFG, "max_steps": 2, "valid_every": 1})
    out = str(tmp_path / "run")
    s = F.finetune(feats, m, tiny_whisper_lm, out, cfg, valid_feats=feats, valid_manifest=m)
    assert s["best_step"] == 2 and os.path.isdir(os.path.join(out, "best"))
    s = F.finetune(feats, m, tiny_whisper_lm, out, F.TrainConfig(**{**CFG, "max_steps": 3}),
                   force=True)
    assert s["best_step"] is None and not os.path.exists(os.path.join(out, "best"))
    assert_same(adapter(os.path.join(out, "adapter")), adapter(os.path.join(out, "last")))


def test_portable_adapter_with_a_readme(train_set, tiny_whisper_lm, tmp_path, monkeypatch):
    import lalmtool.assets

    monkeypatch.setattr(lalmtool.assets, "list_assets",
                        lambda: [{"name": "tiny-asset", "path": tiny_whisper_lm}])
    feats, m = train_set
    s = F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "o"),
                   F.TrainConfig(**{**CFG, "max_steps": 2}))
    config = json.load(open(os.path.join(s["adapter"], "adapter_config.json")))
    assert config["base_model_name_or_path"] == "tiny-asset"
    readme = open(os.path.join(s["adapter"], "README.md")).read()
    loss = [json.loads(l) for l in open(tmp_path / "o" / "log.jsonl")][-1]["loss"]
    assert "# LoRA adapter: whisper on frames features" in readme
    assert "- base model: tiny-asset" in readme
    assert f"- training data: 12 utterances, texts from {m} (field text)" in readme
    assert f"- steps: 2 (lr 0.005, linear schedule, batch 3 x 1 x 1 rank(s)); final training " \
           f"loss {loss:.4f}" in readme
    assert "- validation: no validation set; this adapter is the last one" in readme


# -- mixed precision ------------------------------------------------------------------------
def test_fp16_uses_a_gradient_scaler_that_is_checkpointed_and_restored(train_set,
                                                                        tiny_whisper_lm,
                                                                        tmp_path, monkeypatch):
    feats, m = train_set
    cfg = F.TrainConfig(**{**CFG, "max_steps": 4, "amp": "fp16"})
    out = tmp_path / "o"
    real_save, real_step = F._save_checkpoint, F._train_step

    def crash_at_step_4(run):
        if run.state["step"] == 4:
            raise KeyboardInterrupt("killed")
        real_save(run)

    monkeypatch.setattr(F, "_save_checkpoint", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        F.finetune(feats, m, tiny_whisper_lm, str(out), cfg)
    ck_path = out / "checkpoints" / "step-2" / "state.pt"
    ck = torch.load(ck_path, weights_only=False)
    assert ck["scaler"]["scale"] == 65536.0 and ck["scaler"]["_growth_tracker"] == 2
    ck["scaler"]["scale"] = 1024.0
    torch.save(ck, ck_path)
    scales = []

    def step(run, *a):
        scales.append(run.scaler.get_scale())
        return real_step(run, *a)

    monkeypatch.setattr(F, "_save_checkpoint", real_save)
    monkeypatch.setattr(F, "_train_step", step)
    assert F.finetune(feats, m, tiny_whisper_lm, str(out), cfg)["steps"] == 4
    assert scales == [1024.0, 1024.0]


def test_trainable_projector_keeps_float32_master_weights_under_bf16(tiny_whisper, smollm2,
                                                                     tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from conftest import tone, write_manifest
    import soundfile as sf

    tok = AutoTokenizer.from_pretrained(smollm2)
    llm = str(tmp_path / "llm")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).save_pretrained(llm)
    tok.save_pretrained(llm)
    rows = []
    for i in range(3):
        sf.write(tmp_path / f"{i}.wav", tone(0.6, freq=200 + 50 * i, seed=i), 16000)
        rows.append({"id": f"s{i}", "audio": f"{i}.wav", "text": "hello world"})
    m = write_manifest(tmp_path / "m.jsonl", rows)
    feats = extract(m, llm, str(tmp_path / "feats"), backend="speechllm",
                    backend_opts={"encoder": tiny_whisper})["store"]
    extra = {"encoder": tiny_whisper, "stack": 2, "hidden": 24, "dtype": "bfloat16"}
    cfg = F.TrainConfig(backend="speechllm", max_steps=2, batch_size=3, warmup_steps=0,
                        lora_r=4, save_every=2, amp="bf16", extra=extra)
    be, model = F._model(cfg, llm, "cpu", None)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {dtypes[n] for n in trained} == {torch.float32}
    assert {n.split("projector.")[1] for n in trained if "projector" in n} == {
        f"modules_to_save.default.net.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert dtypes["base_model.model.llm.model.embed_tokens.weight"] == torch.bfloat16
    s = F.finetune(feats, m, llm, str(tmp_path / "o"), cfg)
    saved = adapter(s["adapter"])
    assert {v.dtype for k, v in saved.items() if "projector" in k} == {torch.float32}
    assert s["last"]["step"] == 2 and math.isfinite(s["last"]["loss"])


# -- torchrun -------------------------------------------------------------------------------
def test_a_rank_alone_fails_with_a_message_instead_of_hanging(monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    import datetime

    timeouts = []
    real = torch.distributed.init_process_group

    def init_process_group(*args, **kwargs):
        timeouts.append(kwargs.get("timeout"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    with pytest.raises(RuntimeError, match=r"^rank 0 of 2: the other ranks did not join within "
                                           r"2 s \(dist_timeout\); are all 2 processes"):
        F._distributed(F.TrainConfig(device="cpu", dist_timeout=2))
    # the rank waits dist_timeout for the others (not torch's default of 10 or 30 min)
    assert timeouts == [datetime.timedelta(seconds=2)]
    assert not torch.distributed.is_initialized()


def test_each_rank_takes_its_gpu_before_nccl_starts(monkeypatch):
    import datetime

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, timeout: calls.append(("init", backend, timeout)))
    for key, value in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(key, value)
    dist = F._distributed(F.TrainConfig(device="cuda", dist_timeout=90))
    assert (dist.rank, dist.world, dist.device) == (3, 4, "cuda:1")
    assert calls == [("set_device", "cuda:1"),
                     ("init", "nccl", datetime.timedelta(seconds=90))]


def test_amp_takes_the_dtype_names_of_extract_and_decode():
    assert [F.TrainConfig(amp=a).amp for a in ("bfloat16", "float16", "float32", "bf16", "auto")] \
        == ["bf16", "fp16", "off", "bf16", "auto"]
    with pytest.raises(ValueError, match="training option amp must be"):
        F.TrainConfig(amp="half")


# -- failures found by breaking the stage (named cases) -------------------------------------
def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(train_set, tiny_whisper_lm,
                                                                    tmp_path, caplog):
    """R3: ``truncate -s 5000 checkpoints/step-8/state.pt`` made every rerun fail naming no
    file; now the checkpoint is named, kept as step-8.broken, and the run resumes from step-6
    to the same adapter."""
    feats, m = train_set
    cfg = F.TrainConfig(**CFG)
    F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "a"), cfg)
    ref = adapter(tmp_path / "a" / "adapter")
    os.remove(tmp_path / "a" / "summary.json")  # as if killed after the step-8 checkpoint
    for name in ("adapter", "last"):
        shutil.rmtree(tmp_path / "a" / name)
    state = tmp_path / "a" / "checkpoints" / "step-8" / "state.pt"
    os.truncate(state, 5000)
    s = F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "a"), cfg)
    assert f"checkpoint file {state} cannot be read" in caplog.text
    assert s["steps"] == 8 and (tmp_path / "a" / "checkpoints" / "step-8.broken").is_dir()
    assert_same(adapter(tmp_path / "a" / "adapter"), ref)
    steps = [json.loads(l)["step"] for l in open(tmp_path / "a" / "log.jsonl")]
    assert steps == list(range(1, 9))


def test_a_full_disk_during_a_checkpoint_is_named_and_leaves_no_partial_one(
        train_set, tiny_whisper_lm, tmp_path, monkeypatch):
    """R7: torch's 'unexpected pos' error named no path and left checkpoints/step-2.tmp."""
    feats, m = train_set
    real = torch.save

    def full(obj, path, *a, **k):
        if str(path).endswith("state.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")
        real(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "full"
    with pytest.raises(OSError, match=rf"cannot write the checkpoint {out}/checkpoints/step-2 "
                                      r"\(\[enforce fail .*\); [\d.]+ MiB are free on its disk"):
        F.finetune(feats, m, tiny_whisper_lm, str(out), F.TrainConfig(**CFG))
    assert os.listdir(out / "checkpoints") == []


def test_bad_extra_is_refused_before_anything_is_written(train_set, tiny_whisper_lm, tmp_path):
    """R4, R5: a YAML error was a traceback; an unknown backend option failed after run.json
    was written, and the corrected command was then refused until --force."""
    from lalmtool.cli import parse_overrides

    with pytest.raises(ValueError, match=r"option extra: 'not: \[valid' is not a valid YAML "
                                         r"value \(.*\); quote a mapping or list whole"):
        parse_overrides(["extra=not: [valid"])
    feats, m = train_set
    out = tmp_path / "x"
    with pytest.raises(ValueError, match=r"backend 'whisper' has no option bogus_key \(from "
                                         r"--backend-opt or --extra\); it takes dtype, language"):
        F.finetune(feats, m, tiny_whisper_lm, str(out),
                   F.TrainConfig(**{**CFG, "max_steps": 1}, extra={"bogus_key": 1}))
    assert not (out / "run.json").exists()
    assert F.finetune(feats, m, tiny_whisper_lm, str(out),
                      F.TrainConfig(**{**CFG, "max_steps": 1}))["steps"] == 1


def test_out_may_not_be_the_training_store(train_set, tiny_whisper_lm):
    """R10: finetune --out <the store> wrote adapter/ and checkpoints/ into the store."""
    feats, m = train_set
    with pytest.raises(ValueError, match=rf"--out {feats} is the input store {feats}; give "
                                         "another directory"):
        F.finetune(feats, m, tiny_whisper_lm, feats, F.TrainConfig(**CFG))
    assert not os.path.exists(os.path.join(feats, ".lock"))
