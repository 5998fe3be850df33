"""The training core shared by finetune and align (lalmtool.trainer), the run record
(lalmtool.record), and align's encoder-side CTC head for Whisper.

Mechanics on the random 1-layer Whisper with tiny.en's tokenizer (conftest's tiny_whisper_lm)
and random frame stores; no real weights are trained.
"""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import random_feats_store, write_manifest
from lalmtool import record, trainer
from lalmtool.align import AlignConfig, align
from lalmtool.cli import main
from lalmtool.ctc import ctc_boundaries, load_aligner

TEXTS = {"a": "the cat sat", "b": "hello world"}


@pytest.fixture(scope="module")
def whisper_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("whisper-align")
    m = write_manifest(d / "m.jsonl", [{"id": u, "audio": f"{u}.wav", "text": t}
                                       for u, t in TEXTS.items()])
    return {"manifest": m, "feats": random_feats_store(d / "feats", {"a": 40, "b": 30}, dim=32)}


def wcfg(**kw):
    base = dict(backend="whisper", max_steps=60, batch_size=2, lr=3e-2, warmup_steps=0,
                log_every=1, valid_every=30, save_every=30)
    return AlignConfig(**{**base, **kw})


def test_whisper_head_learns_the_transcripts_and_ctc_segment_cuts_by_its_rule(
        whisper_data, tiny_whisper_lm, tmp_path):
    d = whisper_data
    s = align(d["feats"], d["manifest"], tiny_whisper_lm, str(tmp_path / "al"), wcfg(),
              valid_feats=d["feats"], valid_manifest=d["manifest"])
    assert (s["backend"], s["utterances"], s["skipped"]) == ("whisper", 2, 0)
    assert s["initial_valid_wer"] > 0.5 and s["best_valid_wer"] == 0.0
    al = load_aligner(str(tmp_path / "al"), tiny_whisper_lm)
    assert (al.backend, al.stack) == ("whisper", 1)
    assert tuple(al.projector.net[0].weight.shape) == (32, 32)  # encoder -> decoder embeddings
    from lalmtool.ctc import ctc_segment
    from lalmtool.store import Store

    info = ctc_segment(str(tmp_path / "al"), d["feats"], tiny_whisper_lm, str(tmp_path / "seg"))
    seg, src = Store(str(tmp_path / "seg")), Store(d["feats"])
    assert seg.meta["method"] == "ctc" and seg.meta["frame_rate"] == 50.0
    for u in TEXTS:
        lp = al.log_probs([torch.from_numpy(src[u].astype(np.float32))])[0]
        assert seg[u].tolist() == ctc_boundaries(lp, 1, "join").tolist()
    # blank runs joined: one segment per token the head emits (the transcript's tokens)
    tokens = sum(len(al.labels(t)) for t in TEXTS.values())
    assert info["tokens"] == tokens == sum(len(seg[u]) for u in TEXTS)


def test_whisper_head_may_be_an_mlp(whisper_data, tiny_whisper_lm, tmp_path):
    d = whisper_data
    align(d["feats"], d["manifest"], tiny_whisper_lm, str(tmp_path / "al"),
          wcfg(max_steps=2, head_hidden=8))
    al = load_aligner(str(tmp_path / "al"), tiny_whisper_lm)
    assert [tuple(p.shape) for p in al.projector.parameters()] == [(8, 32), (8,), (32, 8), (32,)]


def test_a_finished_align_run_is_reused_and_patience_stops_early(whisper_data,
                                                                 tiny_whisper_lm, tmp_path):
    d = whisper_data
    out = tmp_path / "al"
    # lr 1e-30: nothing moves, so the validation WER never improves on step 0's
    s = align(d["feats"], d["manifest"], tiny_whisper_lm, str(out),
              wcfg(lr=1e-30, valid_every=2, patience=2, max_steps=50),
              valid_feats=d["feats"], valid_manifest=d["manifest"])
    assert (s["steps"], s["stopped_early"], s["best_step"]) == (4, True, 0)
    log = (out / "log.jsonl").read_text()
    assert [r["step"] for r in map(json.loads, log.splitlines()) if "valid_wer" in r] == [0, 2, 4]
    again = align(d["feats"], d["manifest"], tiny_whisper_lm, str(out),
                  wcfg(lr=1e-30, valid_every=2, patience=2, max_steps=50, keep_checkpoints=3),
                  valid_feats=d["feats"], valid_manifest=d["manifest"])
    assert again == json.loads((out / "summary.json").read_text())  # reused, not retrained
    assert (out / "log.jsonl").read_text() == log


def test_an_unknown_backend_option_is_one_line_and_writes_nothing(whisper_data,
                                                                  tiny_whisper_lm, tmp_path):
    d = whisper_data
    for command in (["align", "--backend", "whisper"], ["finetune"]):
        out = tmp_path / command[0]
        r = CliRunner().invoke(main, command + [
            "--feats", d["feats"], "--manifest", d["manifest"], "--model", tiny_whisper_lm,
            "--out", str(out), "--backend-opt", "chunks=3", "--max-steps=1"])
        assert r.exit_code == 1, r.output
        assert r.output.strip().splitlines()[-1] == (
            "Error: backend 'whisper' has no option chunks (from --backend-opt"
            + (")" if command[0] == "align" else " or --extra)") + "; it takes dtype, "
            "language, positions, task, trim"), r.output
        assert "Traceback" not in r.output and not out.exists()


def test_record_names_each_difference_and_ignores_paths_defaults_and_resumables():
    old = {"config": {"lr": 0.01, "keep_checkpoints": 2},
           "inputs": {"feats": {"path": "/a/feats", "fingerprint": "0123456789abcdef"},
                      "texts": "aaaaaaaaaaaaaaaa"}}
    moved = {"config": {"lr": 0.01, "keep_checkpoints": 5, "patience": 0},
             "inputs": {"feats": {"path": "/b/feats", "fingerprint": "0123456789abcdef"},
                        "texts": "aaaaaaaaaaaaaaaa"}}
    # another path, a resumable option, an option added since at its default: the same run
    assert record.differences(old, moved, {"patience": 0}, ("keep_checkpoints",)) == []
    other = {"config": {"lr": 0.001, "patience": 3},
             "inputs": {"feats": {"path": "/b/feats", "fingerprint": "fedcba9876543210"},
                        "texts": "bbbbbbbbbbbbbbbb"}}
    assert record.differences(old, other, {"patience": 0}, ("keep_checkpoints",)) == [
        "lr: 0.01 there, 0.001 now", "patience: None there, 3 now",
        "--feats: /a/feats (fingerprint 0123456789ab) there, /b/feats (fingerprint "
        "fedcba987654) now", "--texts: aaaaaaaaaaaa there, bbbbbbbbbbbb now"]


def test_options_are_typed_checked_and_named_by_their_command():
    assert AlignConfig(lr="3e-4", max_steps="40").lr == 3e-4
    with pytest.raises(ValueError, match=r"^align option backend must be one of speechllm, "
                                         r"whisper, not 'qwen2-audio'$"):
        AlignConfig(backend="qwen2-audio")
    with pytest.raises(ValueError, match=r"^unknown align option 'max_step' \(did you mean "
                                         r"max_steps"):
        AlignConfig.load(None, {"max_step": 3})
    with pytest.raises(ValueError, match=r"^align option patience must be >= 0, not -1$"):
        AlignConfig(patience=-1)


def test_the_schedule_warms_up_then_decays_as_asked():
    cfg = trainer.TrainingOptions(warmup_steps=4, schedule="cosine")
    f = trainer.lr_lambda(cfg, 12)
    assert [round(f(s), 4) for s in (0, 3, 4, 8, 12)] == [0.2, 0.8, 1.0, 0.5, 0.0]
    f = trainer.lr_lambda(trainer.TrainingOptions(warmup_steps=0), 10)
    assert [f(s) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]


def test_the_data_order_resumes_at_any_micro_batch():
    batches = lambda epoch: [[x] for x in trainer.shuffled(["a", "b", "c"], 7, epoch)]  # noqa
    whole = trainer.data_stream(batches, (0, 0), "empty")
    seen = [next(whole) for _ in range(7)]
    resumed = trainer.data_stream(batches, seen[3][0], "empty")
    assert [next(resumed) for _ in range(3)] == seen[4:]
    assert sorted(b[0] for _, b in seen[:3]) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="^empty$"):
        next(trainer.data_stream(lambda epoch: [], (0, 0), "empty"))


def test_the_adapter_carries_its_backend_options_beside_its_weights(whisper_data,
                                                                    tiny_whisper_lm, tmp_path):
    import shutil

    from lalmtool.finetune import TrainConfig, finetune
    from lalmtool.models import training_options

    d = whisper_data
    s = finetune(d["feats"], d["manifest"], tiny_whisper_lm, str(tmp_path / "ft"),
                 TrainConfig(max_steps=1, warmup_steps=0, lora_r=2,
                             extra={"positions": "global"}))
    moved = tmp_path / "elsewhere" / "adapter"  # copied alone: no run (config.yaml) around it
    shutil.copytree(s["adapter"], moved)
    from lalmtool.models import base_weights

    record = json.loads((moved / "lalmtool.json").read_text())
    assert {k: record[k] for k in ("kind", "backend", "backend_options", "base_weights")} == {
        "kind": "lora-adapter", "backend": "whisper", "backend_options": {"positions": "global"},
        "base_weights": base_weights(tiny_whisper_lm)}
    assert training_options(str(moved), "whisper") == {"positions": "global"}
    with pytest.raises(ValueError, match=r"was trained with the whisper backend \(.*lalmtool.json"
                                         r"\); decode it with --backend whisper"):
        training_options(str(moved), "qwen2-audio")


def test_an_out_without_a_run_record_is_refused_and_force_starts_over(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 3, "loss": 1.0}\n')
    cfg = trainer.TrainingOptions()
    with pytest.raises(ValueError, match=rf"^{out} holds a finetune run without run.json \(made "
                                         r"by an older lalmtool\): its inputs cannot be "
                                         r"compared; use another --out, or --force"):
        trainer.prepare_out(str(out), cfg, {"feats": "f"}, False, "a finetune run",
                            ("log.jsonl",))
    assert (out / "log.jsonl").exists()  # nothing removed
    trainer.prepare_out(str(out), cfg, {"feats": "f"}, True, "a finetune run", ("log.jsonl",))
    assert sorted(os.listdir(out)) == ["config.yaml", "run.json"]
    assert json.loads((out / "run.json").read_text())["inputs"] == {"feats": "f"}
    # the same record again: continued; another input: refused, naming it
    trainer.prepare_out(str(out), cfg, {"feats": "f"}, False, "a finetune run", ("log.jsonl",))
    with pytest.raises(ValueError, match=r"\(--feats: f there, g now\)"):
        trainer.prepare_out(str(out), cfg, {"feats": "g"}, False, "a finetune run",
                            ("log.jsonl",))
