"""finetune mechanics on a tiny random Whisper: resume after a kill, DDP on 2 CPU processes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lalmtool import finetune as F
from lalmtool.extract import extract


@pytest.fixture(scope="module")
def train_set(tiny_whisper_lm, tmp_path_factory):
    import soundfile as sf
    from conftest import tone, write_manifest

    d = tmp_path_factory.mktemp("train")
    words = "the quick brown fox jumps over a lazy dog and then sleeps all day long".split()
    rows = []
    for i in range(12):
        sf.write(d / f"{i}.wav", tone(0.5 + 0.1 * i, freq=150 + 30 * i, seed=i), 16000)
        rows.append({"id": f"u{i:02d}", "audio": f"{i}.wav", "text": " ".join(words[i : i + 3])})
    m = write_manifest(d / "m.jsonl", rows)
    feats = extract(m, tiny_whisper_lm, str(d / "feats"))["store"]
    return feats, m


def adapter(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-4)


CFG = dict(max_steps=8, batch_size=3, save_every=2, log_every=1, warmup_steps=2, lr=5e-3)


def test_overrides_and_config_errors(tmp_path):
    o = F.parse_overrides(["--lr=3e-4", "max_steps=5", "target_modules=[q_proj, v_proj]"])
    cfg = F.TrainConfig.load(None, o)
    assert (cfg.lr, cfg.max_steps, cfg.target_modules) == (3e-4, 5, ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="must be a number"):
        F.TrainConfig.load(None, {"lr": "fast"})
    with pytest.raises(ValueError, match="unknown training option"):
        F.TrainConfig.load(None, {"learning_rate": 1})
    with pytest.raises(ValueError, match="key=value"):
        F.parse_overrides(["lr"])


def test_batching_by_duration_and_epochs(train_set):
    ex = F.Examples(*train_set)
    cfg = F.TrainConfig(batch_seconds=2.0, seed=1)
    batches = F.epoch_batches(ex, cfg, 0)
    assert sorted(u for b in batches for u in b) == sorted(ex.ids)
    assert all(sum(ex.duration[u] for u in b) <= 2.0 or len(b) == 1 for b in batches)
    assert F.epoch_batches(ex, cfg, 0) == batches and F.epoch_batches(ex, cfg, 1) != batches


def test_resume_after_interruption_gives_the_same_adapter(train_set, tiny_whisper_lm, tmp_path,
                                                          monkeypatch):
    feats, m = train_set
    cfg = F.TrainConfig(**CFG)
    F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "a"), cfg)
    ref = adapter(tmp_path / "a" / "adapter")

    real_save = F._save_checkpoint

    def crash_at_step_5(out, model, opt, sched, state, *a):
        if state["step"] == 6:
            raise KeyboardInterrupt("killed")
        real_save(out, model, opt, sched, state, *a)

    monkeypatch.setattr(F, "_save_checkpoint", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "b"), cfg)
    assert F.latest_checkpoint(str(tmp_path / "b")).endswith("step-4")
    monkeypatch.setattr(F, "_save_checkpoint", real_save)
    s = F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "b"), cfg)
    assert s["steps"] == 8
    assert_same(adapter(tmp_path / "b" / "adapter"), ref)
    steps = [json.loads(l)["step"] for l in open(tmp_path / "b" / "log.jsonl")]
    assert steps == list(range(1, 9))  # nothing logged twice
    # a different configuration refuses to resume in the same directory
    with pytest.raises(ValueError, match="another configuration"):
        F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "b"), F.TrainConfig(**{**CFG, "lr": 1}))


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
