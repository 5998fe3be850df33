"""finetune with ``shard: fsdp`` (PyTorch FSDP2) on a tiny random Voxtral: 2 CPU ranks (gloo,
under torchrun) give the adapter and the loss log of one process with the same micro-batches
per step, with the frozen base weights and the LoRA sharded across the ranks; a killed FSDP run
resumes; without torchrun the option trains in one process."""
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import word_clips
from lalmtool import finetune as F
from lalmtool import trainer
from lalmtool.testing import write_random_audio_llm

FAMILY = "voxtral"
#: 2 ranks x grad_accum 2 x batch 1 = one process's grad_accum 4 x batch 1, per step
COMMON = dict(backend=FAMILY, max_steps=4, batch_size=1, lora_r=4, lora_dropout=0.0,
              warmup_steps=1, save_every=2, valid_every=2, log_every=1)

#: Run under torchrun: probes how the model was sharded (rank{N}.json: per parameter its
#: name, trainable, sharded, local and whole sizes), optionally stops the run as if killed when
#: it would write the checkpoint of step KILL_AT, then runs ``lalmtool finetune ARGS``.
WORKER = '''
import json, os, sys
from lalmtool import finetune as F, trainer

probe, kill_at = sys.argv[1], int(sys.argv[2])
real_shard = trainer.shard_model


def shard_model(model, dist):
    real_shard(model, dist)
    from torch.distributed.tensor import DTensor
    rows = [[n, p.requires_grad, isinstance(p, DTensor),
             p.to_local().numel() if isinstance(p, DTensor) else p.numel(), p.numel()]
            for n, p in model.named_parameters()]
    with open(os.path.join(probe, f"rank{dist.rank}.json"), "w") as fh:
        json.dump(rows, fh)


trainer.shard_model = shard_model
if kill_at:
    real_save = F._save_checkpoint

    def save(run):
        if run.state["step"] == kill_at:
            raise SystemExit(3)  # killed before this checkpoint
        real_save(run)
    F._save_checkpoint = save
from lalmtool.cli import main
main(sys.argv[3:])
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(model, training feats, manifest, worker script): a tiny random Voxtral, 8 utterances."""
    from lalmtool.extract import extract

    d = tmp_path_factory.mktemp("fsdp")
    model = write_random_audio_llm(FAMILY, str(d / "model"))
    m = word_clips(d, 8, "u{i}")
    feats = extract(m, model, str(d / "feats"), backend=FAMILY)["store"]
    worker = d / "worker.py"
    worker.write_text(WORKER)
    return model, feats, m, str(worker)


def torchrun(data, out, probe, kill_at: int = 0, **options):
    """``lalmtool finetune`` on 2 CPU ranks with ``COMMON`` and ``options`` (the worker's
    probe in ``probe``); the completed process."""
    model, feats, m, worker = data
    cfg = {**COMMON, **options}
    os.makedirs(probe, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", worker, str(probe), str(kill_at), "finetune",
         "--feats", feats, "--manifest", m, "--model", model, "--out", str(out),
         "--valid-feats", feats, "--valid-manifest", m,
         *[f"--{k}={v}" for k, v in cfg.items()]],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_process(data, out, **options):
    model, feats, m, _ = data
    return F.finetune(feats, m, model, str(out), F.TrainConfig(**{**COMMON, **options}),
                      valid_feats=feats, valid_manifest=m)


def adapter(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def assert_same(a, b, atol):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-4)


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Output directories of one process (grad_accum 4) and of 2 FSDP ranks (grad_accum 2)."""
    d = tmp_path_factory.mktemp("runs")
    one_process(data, d / "one", grad_accum=4)
    done = torchrun(data, d / "fsdp", d / "probe", shard="fsdp", grad_accum=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return d


def test_two_fsdp_ranks_give_the_adapter_and_log_of_one_process(runs):
    one, fsdp = runs / "one", runs / "fsdp"
    for name in ("adapter", "best", "last"):  # gathered from both ranks, written by rank 0
        assert_same(adapter(fsdp / name), adapter(one / name), atol=1e-5)
    got, want = records(fsdp), records(one)
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for g, w in zip(got, want):  # the loss of the step over both ranks, the global norm
        for key in ("loss", "grad_norm", "valid_loss", "lr"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5), (g, w)
    # every weight was sharded, frozen and LoRA: the ranks hold a half each
    ranks = [json.load(open(runs / "probe" / f"rank{rank}.json")) for rank in (0, 1)]
    assert [r[0] for r in ranks[0]] == [r[0] for r in ranks[1]]
    assert {trainable for _, trainable, *_ in ranks[0]} == {True, False}
    for (_, _, sharded, local, whole), (_, _, _, other, _) in zip(*ranks):
        assert sharded and local + other == whole
    whole = sum(r[4] for r in ranks[0])
    assert all(sum(r[3] for r in rows) <= 0.51 * whole for rows in ranks)
    # the checkpoint holds the whole trainable weights (by name) and the optimizer's state
    ck = torch.load(fsdp / "checkpoints" / "step-4" / "state.pt", weights_only=False)
    assert ck["sharded"] and len(ck["trainable"]) == len(adapter(one / "adapter"))
    shapes = {k.replace(".default", ""): tuple(v.shape) for k, v in ck["trainable"].items()}
    assert shapes == {k: tuple(v.shape) for k, v in adapter(one / "adapter").items()}
    assert len(ck["optimizer"]["state"]) == len(ck["trainable"])


def test_a_killed_fsdp_run_resumes_to_the_same_adapter(data, runs, tmp_path):
    out = tmp_path / "killed"
    killed = torchrun(data, out, tmp_path / "probe", kill_at=4, shard="fsdp", grad_accum=2)
    assert killed.returncode != 0
    assert F.latest_checkpoint(str(out)).endswith("step-2")
    assert not (out / "adapter").exists()
    done = torchrun(data, out, tmp_path / "probe", shard="fsdp", grad_accum=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same(adapter(out / "adapter"), adapter(runs / "fsdp" / "adapter"), atol=0)
    got, want = records(out), records(runs / "fsdp")  # nothing logged twice
    assert [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("valid_loss")) for r in got] \
        == [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("valid_loss")) for r in want]


def test_fsdp_without_torchrun_trains_in_one_process(data, runs, tmp_path, monkeypatch,
                                                     caplog):
    monkeypatch.setattr(trainer, "shard_model", lambda *a: pytest.fail("sharded in one process"))
    with caplog.at_level(logging.INFO, logger="lalmtool"):
        one_process(data, tmp_path / "one", grad_accum=4, shard="fsdp")
    assert "shard=fsdp without torchrun: one process holds the whole model" in caplog.text
    assert_same(adapter(tmp_path / "one" / "adapter"), adapter(runs / "one" / "adapter"), atol=0)


def test_the_shard_option_is_checked():
    assert F.TrainConfig().shard == "ddp"
    with pytest.raises(ValueError, match="shard must be one of ddp, fsdp, not 'zero'"):
        F.TrainConfig(shard="zero")
    with pytest.raises(ValueError, match=r"amp must be auto, bf16 or off with shard=fsdp"):
        F.TrainConfig(shard="fsdp", amp="fp16")


def test_units_are_the_outermost_layers_and_trainable_modules_outside_them(tmp_path):
    """Qwen2-Audio names its attention among its no-split modules, inside its encoder layers:
    the layers are the units; a projector trained in full gets its own."""
    from peft import LoraConfig, get_peft_model

    from lalmtool.models import load_backend

    path = write_random_audio_llm("qwen2-audio-chat", str(tmp_path / "m"))
    for train_projector in (False, True):
        be = load_backend("qwen2-audio-chat", path, tap="encoder",
                          train_projector=train_projector)
        be.model.requires_grad_(False)
        peft = get_peft_model(be.model, LoraConfig(
            r=2, target_modules=be.default_lora_targets,
            modules_to_save=be.modules_to_save or None))
        units = trainer._units(peft.get_base_model())
        kinds = [type(u).__name__ for u in units]
        assert set(kinds) - {"Linear"} == {"Qwen2AudioEncoderLayer", "Qwen2DecoderLayer"}
        assert kinds.count("Qwen2DecoderLayer") == 2
        outside = [u for u in units if type(u).__name__ == "Linear"]
        assert bool(outside) == train_projector
        assert all(p.requires_grad for u in outside for p in u.parameters())
