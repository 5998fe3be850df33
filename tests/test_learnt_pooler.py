"""The learnt pooler (``finetune --segments``, ``pool --reduce learnt``) and distillation
(``finetune --teacher``) on a tiny random Whisper."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import CFG, adapter, assert_same, frames_store, killed_at_step
from lalmtool import examples as E
from lalmtool import finetune as F
from lalmtool.compress import compress, pool_utterance
from lalmtool.decode import decode
from lalmtool.pool import pool_store
from lalmtool.pooler import LearntPooler, load
from lalmtool.segment import segment
from lalmtool.store import Store, StoreError


def test_at_initialisation_the_learnt_pooler_is_the_mean():
    torch.manual_seed(0)
    z, starts = torch.randn(23, 16), torch.tensor([0, 5, 6, 15])
    p = LearntPooler(16, heads=4, rank=3, width=4)
    torch.testing.assert_close(p(z, starts), pool_utterance(z, starts, "mean"))
    # uniform windows: avg_pool1d with ceil_mode (the last window is the mean of what it has)
    u = torch.arange(0, 23, 5)
    ref = torch.nn.functional.avg_pool1d(z.T[None], 5, 5, ceil_mode=True)[0].T
    ref[-1] = z[20:].mean(0)
    torch.testing.assert_close(p(z, u), ref)


def test_the_learnt_pooler_rule_on_known_weights():
    z = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 0.0], [7.0, 1.0]])
    p = LearntPooler(2, heads=2, rank=1, width=2)
    with torch.no_grad():
        p.place[1] = torch.tensor([np.log(3.0), 0.0])  # head 0: the 2nd place weighs 3x
        p.score.weight[1] = torch.tensor([0.0, np.log(2.0)])  # head 1: weight 2 ** z[:, 1]
        p.down.zero_()
        p.down[0, 0, 0], p.down[1, 1, 0] = 1.0, 10.0  # stacked: z[first, 0] + 10 z[second, 1]
        p.up[0] = torch.tensor([1.0, -1.0])
    # segments [0, 1] and [2, 3, ...]: places 0, 1 (and later frames share place 1)
    out = p(z, torch.tensor([0, 2]))
    w1 = torch.tensor([2.0 ** 2, 2.0 ** 6]) / (2.0 ** 2 + 2.0 ** 6)
    seg0 = torch.tensor([(1 + 3 * 3) / 4, float(w1 @ torch.tensor([2.0, 6.0]))])
    seg0 += (1 + 10 * 6) * torch.tensor([1.0, -1.0])
    w1 = torch.tensor([1.0, 2.0]) / 3
    seg1 = torch.tensor([(5 + 3 * 7) / 4, float(w1 @ torch.tensor([0.0, 1.0]))])
    seg1 += (5 + 10 * 1) * torch.tensor([1.0, -1.0])
    torch.testing.assert_close(out, torch.stack([seg0, seg1]))


def test_the_pooler_computes_in_float32_under_autocast():
    torch.manual_seed(0)
    p = LearntPooler(16, heads=4, rank=3, width=4)
    with torch.no_grad():
        p.up.normal_()
        p.score.weight.normal_()
    z, starts = torch.randn(23, 16).bfloat16(), torch.tensor([0, 5, 6, 15])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = p(z, starts)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, p(z.float(), starts))


def test_bad_pooler_shapes_are_refused():
    with pytest.raises(ValueError, match="heads=5: must be >= 1 and divide the feature "
                                         "dimension 16"):
        LearntPooler(16, heads=5)


@pytest.fixture(scope="module")
def k3(train_set, tmp_path_factory):  # noqa: F811
    feats, _ = train_set
    d = tmp_path_factory.mktemp("k3")
    segment(feats, "uniform", str(d / "seg"), k=3)
    return str(d / "seg")


def pooler_weights(path):
    return load_file(os.path.join(path, "pooler.safetensors"))


def test_learnt_pooler_trains_resumes_to_the_same_weights_and_writes_the_store(
        train_set, k3, tiny_whisper_lm, tmp_path, monkeypatch):  # noqa: F811
    feats, m = train_set
    cfg = F.TrainConfig(**CFG, pooler_heads=4, pooler_rank=8)
    s = F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "a"), cfg, segments=k3)
    assert s["condition"] == "uniform-learnt-k3"
    # 32 x 4 scores + 4 biases, 3 x 4 place biases, 32 x 3 x 8 down, 8 x 32 up
    assert s["pooler"] == {"dim": 32, "heads": 4, "rank": 8, "width": 3,
                           "parameters": 128 + 4 + 12 + 768 + 256}
    assert "`lalmtool pool --reduce learnt --pooler <this directory>`" in \
        (tmp_path / "a" / "adapter" / "README.md").read_text()
    ref = pooler_weights(tmp_path / "a" / "adapter")
    assert json.loads((tmp_path / "a" / "adapter" / "lalmtool.json").read_text())["pooler"] == \
        {"dim": 32, "heads": 4, "rank": 8, "width": 3}
    assert float(ref["score.weight"].abs().max()) > 1e-3  # trained away from the mean
    assert float(ref["up"].abs().max()) > 1e-3

    real_save = F._save_checkpoint
    monkeypatch.setattr(F, "_save_checkpoint", killed_at_step(6))
    with pytest.raises(KeyboardInterrupt):
        F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "b"), cfg, segments=k3)
    monkeypatch.setattr(F, "_save_checkpoint", real_save)
    F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "b"), cfg, segments=k3)
    assert_same(pooler_weights(tmp_path / "b" / "adapter"), ref)
    assert_same(adapter(tmp_path / "b" / "adapter"), adapter(tmp_path / "a" / "adapter"))
    # --init-adapter continues its pooler too (at lr 1e-8 it stays where it was)
    F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "c"), F.TrainConfig(**{
        **CFG, "lr": 1e-8}, pooler_heads=2), segments=k3,
        init_adapter=str(tmp_path / "a" / "adapter"))
    assert_same(pooler_weights(tmp_path / "c" / "adapter"), ref, atol=1e-5)

    # the pooled store holds the trained pooler's tokens; its condition names the pooler
    ad = str(tmp_path / "a" / "adapter")
    out = pool_store(feats, k3, "learnt", str(tmp_path / "pooled"), pooler=ad)
    store, seg, frames, pooler = Store(out["store"]), Store(k3), Store(feats), load(ad)
    for u in frames.ids:
        want = pooler(torch.from_numpy(frames[u].astype(np.float32)),
                      torch.from_numpy(seg[u].astype(np.int64))).detach().numpy()
        np.testing.assert_allclose(store[u].astype(np.float32), want, atol=2e-3, rtol=2e-3)
    assert store.meta.condition()[2] == "uniform-learnt-k3"
    # the Python API gives the same tokens (batched, zero-padded)
    lengths = torch.tensor([len(frames[u]) for u in frames.ids])
    x = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(frames[u].astype(np.float32))
                                         for u in frames.ids], batch_first=True)
    api = compress(x, "uniform", "learnt", k=3, lengths=lengths, pooler=pooler)
    for i, u in enumerate(frames.ids):
        np.testing.assert_allclose(api.tokens[i, : api.lengths[i]].detach().numpy(),
                                   store[u].astype(np.float32), atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="reduce='learnt' needs its trained pooler"):
        compress(x, "uniform", "learnt", k=3, lengths=lengths)
    # the adapter decodes that store, and refuses the frames (never pooled by its pooler)
    info = decode(out["store"], tiny_whisper_lm, str(tmp_path / "dec"), adapter=ad,
                  max_new_tokens=5)
    assert (info["condition"], info["adapter_condition"]) == ("uniform-learnt-k3", None)
    with pytest.raises(ValueError, match="trained with its own learnt pooler .* was not "
                                         "pooled by it: write this set's store with "
                                         "`lalmtool pool --reduce learnt"):
        decode(feats, tiny_whisper_lm, str(tmp_path / "dec2"), adapter=ad, max_new_tokens=5)
    # a pool store with another adapter's pooler is another store (not reused)
    with pytest.raises(ValueError, match="--reduce learnt and --pooler ADAPTER go together"):
        pool_store(feats, k3, "learnt", str(tmp_path / "p2"))
    with pytest.raises(ValueError, match=r"holds no learnt pooler \(none in its lalmtool.json\)"):
        pool_store(feats, k3, "learnt", str(tmp_path / "p3"), pooler=str(tmp_path))
    other = frames_store(tmp_path / "f16")  # 16-dimensional frames of another model
    segment(other, "uniform", str(tmp_path / "s16"), k=3)
    with pytest.raises(ValueError, match="pools 32-dimensional frames, .* holds 16-dimensional "
                                         "ones"):
        pool_store(other, str(tmp_path / "s16"), "learnt", str(tmp_path / "p4"), pooler=ad)
    assert not (tmp_path / "p4").exists()


def test_segments_of_other_features_and_bad_heads_are_refused(train_set, k3, tiny_whisper_lm,
                                                 tmp_path):  # noqa: F811
    feats, m = train_set
    pooled = pool_store(feats, k3, "mean", str(tmp_path / "pooled"))["store"]
    seg = str(tmp_path / "seg")
    segment(pooled, "uniform", seg, k=2)
    with pytest.raises(StoreError, match="was segmented from .* whose content differs from"):
        F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "a"), F.TrainConfig(**CFG),
                   segments=seg)
    with pytest.raises(ValueError, match="pooler_heads=3 does not divide the dimension 32 of "):
        F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "a"),
                   F.TrainConfig(**CFG, pooler_heads=3), segments=k3)
    with pytest.raises(ValueError, match="--segments with --valid-feats needs --valid-segments"):
        F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "a"), F.TrainConfig(**CFG),
                   valid_feats=feats, valid_manifest=m, segments=k3)
    with pytest.raises(ValueError, match="--valid-segments needs --segments"):
        F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "a"), F.TrainConfig(**CFG),
                   valid_feats=feats, valid_manifest=m, valid_segments=k3)
    assert not (tmp_path / "a").exists()


def test_distillation_term_is_zero_when_the_student_reads_what_the_teacher_reads(
        train_set, tiny_whisper_lm, tmp_path):  # noqa: F811
    feats, m = train_set
    segment(feats, "uniform", str(tmp_path / "k1"), k=1)
    segment(feats, "uniform", str(tmp_path / "k3"), k=3)
    cfg = F.TrainConfig(**CFG)
    be, peft_model = F._model(cfg, tiny_whisper_lm, "cpu", None)
    for k, kl_is_zero in (("k1", True), ("k3", False)):
        ex = E.Examples(feats, m, segments=str(tmp_path / k))
        job = F.Job(be, peft_model, pooler=F._pooler(cfg, ex, "cpu", None), teacher=be)
        items = ex.ids[:4]
        ce, n = job.loss(ex, items)
        kl, n1 = job.loss(ex, items, distill=1.0)
        half, _ = job.loss(ex, items, distill=0.5)
        assert n == n1 == sum(be.text_tokens(ex.text[u]) + 1 for u in items)
        if kl_is_zero:  # one frame per segment: the pooled tokens are the frames
            assert float(kl) == 0.0
        else:  # the tiny random decoder barely reads its input, but it does
            assert float(kl) > 1e-7
        torch.testing.assert_close(half, 0.5 * ce + 0.5 * kl, rtol=1e-4, atol=1e-5)


def test_teacher_is_recorded_and_goes_with_distill(train_set, k3, tiny_whisper_lm,
                                                   tmp_path):  # noqa: F811
    feats, m = train_set
    F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "t"), F.TrainConfig(**CFG))
    teacher = str(tmp_path / "t" / "adapter")
    with pytest.raises(ValueError, match="--teacher and distill > 0 go together"):
        F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "s"), F.TrainConfig(**CFG),
                   segments=k3, teacher=teacher)
    with pytest.raises(ValueError, match="--teacher needs --segments"):
        F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "s"),
                   F.TrainConfig(**CFG, distill=0.5), teacher=teacher)
    cfg = F.TrainConfig(**CFG, distill=0.5)
    with pytest.raises(ValueError, match="--teacher .*t: no adapter_config.json there"):
        F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "s"), cfg, segments=k3,
                   teacher=str(tmp_path / "t"))
    assert not (tmp_path / "s").exists()
    F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "s"), cfg, segments=k3,
               teacher=teacher)
    inputs = json.loads((tmp_path / "s" / "run.json").read_text())["inputs"]
    assert inputs["teacher"]["path"] == teacher
    assert inputs["segments"]["fingerprint"] == Store(k3).fingerprint
    with pytest.raises(ValueError, match="distill: 0.5 there, 0.25 now"):
        F.finetune(feats, m, tiny_whisper_lm, str(tmp_path / "s"),
                   F.TrainConfig(**CFG, distill=0.25), segments=k3, teacher=teacher)


def test_cli_trains_a_pooler_and_pools_with_it(train_set, k3, tiny_whisper_lm,
                                               tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from lalmtool.cli import main

    feats, m = train_set
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["finetune", "--feats", feats, "--manifest", m, "--model",
                                  tiny_whisper_lm, "--out", str(out), "--segments", k3,
                                  "--max-steps=2", "--pooler-heads=2", "--pooler-rank=0"])
    assert r.exit_code == 0, r.output
    assert "uniform-learnt-k3" in r.output
    assert json.loads((out / "adapter" / "lalmtool.json").read_text())["pooler"] == \
        {"dim": 32, "heads": 2, "rank": 0, "width": 3}
    r = CliRunner().invoke(main, ["pool", "--feats", feats, "--segments", k3, "--reduce",
                                  "learnt", "--pooler", str(out / "adapter"), "--out",
                                  str(tmp_path / "pooled")])
    assert r.exit_code == 0, r.output
    assert Store(str(tmp_path / "pooled")).meta["pooler"]["path"] == str(out / "adapter")


def test_joined_utterances_keep_each_ones_segments(train_set, k3):  # noqa: F811
    feats, m = train_set
    ex = E.Examples(feats, m, segments=k3)
    n0 = len(ex.store["u00"])
    joined, alone = ex.starts([("u00", "u01"), "u02"])
    want = np.concatenate([ex.segments["u00"], ex.segments["u01"] + n0])
    assert joined.tolist() == want.tolist() and want[len(ex.segments["u00"])] == n0
    assert alone.tolist() == ex.segments["u02"].tolist() == list(range(0, len(ex.store["u02"]), 3))
