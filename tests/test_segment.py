import numpy as np
import pytest
import torch
from scipy.signal import find_peaks

from conftest import write_frames_store
from lalmtool import segment as S
from lalmtool.pool import pool


def rand(T, D=8, seed=0):
    return np.random.default_rng(seed).standard_normal((T, D)).astype(np.float32)


def test_dissimilarity_is_one_minus_cosine():
    z = rand(20)
    d = S.dissimilarity(z)
    ref = 1 - torch.nn.functional.cosine_similarity(torch.tensor(z[:-1]), torch.tensor(z[1:]), dim=1)
    np.testing.assert_allclose(d, ref.numpy(), atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_peaks_equals_direct_loop(seed):
    z = rand(200, seed=seed)
    d = S.dissimilarity(z)
    expected = [0] + [t + 1 for t in range(1, len(d) - 1) if d[t] > d[t - 1] and d[t] > d[t + 1]]
    assert S.peaks(z).tolist() == expected


def test_peaks_plateau_is_not_strict_maximum():
    # d = [0, 1, 1, 0]: no strict local maximum
    z = np.array([[1, 0], [1, 0], [0, 1], [1, 0], [1, 0]], np.float32)
    d = S.dissimilarity(z)
    assert d.tolist() == [0, 1, 1, 0]
    assert S.peaks(z).tolist() == [0]


@pytest.mark.parametrize("thr", [0.0, 0.05, 0.2])
def test_prominence_equals_find_peaks(thr):
    z = rand(300, seed=3)
    idx, _ = find_peaks(S.dissimilarity(z), prominence=thr)
    assert S.prominence(z, thr).tolist() == [0] + (idx + 1).tolist()


def test_scpc_threshold_zero_includes_peaks_and_threshold_prunes():
    z = rand(300, seed=4)
    base = set(S.peaks(z).tolist())
    assert base <= set(S.scpc(z, 0.0).tolist())
    assert len(S.scpc(z, 0.3)) < len(S.scpc(z, 0.0))


def test_scpc_peakiness_by_definition():
    d = np.array([0.1, 0.5, 0.2, 0.3, 0.9, 0.1, 0.4], np.float32)
    p = S.scpc_peakiness(d)
    t = 4  # d4 = .9: p1 = min(.6, .8) = .6; p2 = min(.9-.2, .9-.4) = .5
    assert p[t] == pytest.approx(0.6)
    assert p[0] == 0 and p[-1] == 0
    assert p[1] == pytest.approx(0.3)  # min(.4, .3); no second order at t=1


@pytest.mark.parametrize("method", ["peaks", "scpc", "prominence"])
@pytest.mark.parametrize("T", [1, 2, 3])
def test_short_inputs(method, T):
    assert S.boundaries(rand(T), method).tolist() == [0]


@pytest.mark.parametrize("method", ["peaks", "scpc", "prominence"])
def test_constant_frames_are_one_segment(method):
    z = np.ones((50, 4), np.float32)
    assert S.boundaries(z, method).tolist() == [0]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_is_a_clear_error(bad):
    z = rand(10)
    z[3, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        S.peaks(z)


def test_uniform_boundaries():
    assert S.uniform(rand(7), 3).tolist() == [0, 3, 6]
    assert S.uniform(rand(1), 3).tolist() == [0]
    with pytest.raises(ValueError):
        S.uniform(rand(4), 0)


@pytest.mark.parametrize("T,k", [(30, 3), (31, 3), (32, 3), (7, 2), (1, 3), (5, 5)])
def test_uniform_mean_equals_avg_pool1d(T, k):
    z = rand(T, D=6, seed=T)
    pooled = pool(z, S.uniform(z, k), "mean")
    x = torch.tensor(z).T[None]  # [1, D, T]
    if T >= k:
        whole = torch.nn.functional.avg_pool1d(x, k)[0].T.numpy()
        np.testing.assert_allclose(pooled[: T // k], whole, atol=1e-6)
    # tail rule: the last T mod k frames form one shorter segment, averaged over its own frames
    ceil = torch.nn.functional.avg_pool1d(x, k, ceil_mode=True)[0].T.numpy()
    np.testing.assert_allclose(pooled, ceil, atol=1e-6)
    if T % k:
        np.testing.assert_allclose(pooled[-1], z[T - T % k:].mean(0), atol=1e-6)


def test_pick_is_strided_downsampling():
    z = rand(11)
    np.testing.assert_array_equal(pool(z, S.uniform(z, 3), "pick"), z[::3])


def test_pool_mean_of_variable_segments():
    z = rand(10)
    starts = np.array([0, 1, 4, 9])
    out = pool(z, starts, "mean")
    for i, (a, b) in enumerate(zip(starts, [1, 4, 9, 10])):
        np.testing.assert_allclose(out[i], z[a:b].mean(0), atol=1e-6)


@pytest.mark.parametrize("starts", [[1, 3], [0, 3, 3], [0, 5, 2], [0, 10], []])
def test_pool_rejects_bad_boundaries(starts):
    with pytest.raises(ValueError, match="boundaries"):
        pool(rand(10), np.array(starts, dtype=np.int32))


# -- the segment and pool stages on a small synthetic store: options, invalidation ------------
import logging  # noqa: E402
import os  # noqa: E402

from click.testing import CliRunner  # noqa: E402

from lalmtool.cli import main  # noqa: E402
from lalmtool.pool import pool_store  # noqa: E402
from lalmtool.store import Store, StoreError, StoreWriter, plan_shards  # noqa: E402


def feats_store(path, n=4, seed=0, fp="a" * 64) -> str:
    """A frames store of ``n`` random utterances (50 frames/s, 2 per shard)."""
    write_frames_store(path, {f"u{i}": (rand(40 + 10 * i, seed=seed + i).astype(np.float16),
                                        {"duration": 0.8 + 0.2 * i}) for i in range(n)}, fp=fp)
    return str(path)


@pytest.mark.parametrize("method,opts,message", [
    ("uniform", {"target_rate": 0.0}, "--target-rate must be a finite number of tokens/s > 0, got 0.0"),
    ("uniform", {"target_rate": -5.0}, "--target-rate must be a finite number of tokens/s > 0, got -5.0"),
    ("uniform", {"target_rate": float("inf")}, "--target-rate must be a finite number of tokens/s > 0, got inf"),
    ("uniform", {"target_rate": float("nan")}, "--target-rate must be a finite number of tokens/s > 0, got nan"),
    ("uniform", {"k": -2}, "--k must be a whole number of frames >= 1, got -2"),
    ("uniform", {"k": 0}, "--k must be a whole number of frames >= 1, got 0"),
    ("uniform", {}, "method uniform needs --k (or --target-rate)"),
    ("uniform", {"k": 3, "target_rate": 10.0}, "give --target-rate or --k/--threshold, not both (the target rate sets them)"),
    ("peaks", {"k": 3}, "--k is the segment length of uniform; peaks does not use it"),
    ("peaks", {"threshold": 0.1}, "--threshold is for scpc and prominence; peaks does not use it"),
    ("peaks", {"target_rate": 10.0}, "--target-rate needs a method with a threshold (scpc, prominence) or uniform; peaks has none"),
    ("scpc", {"threshold": -0.1}, "--threshold must be a finite number >= 0, got -0.1"),
    ("prominence", {"threshold": float("nan")}, "--threshold must be a finite number >= 0, got nan"),
    ("uniform", {"k": 3, "nj": 0}, "--nj must be >= 1, got 0"),
    ("uniform", {"target_rate": 60.0}, "--target-rate 60 cannot be reached: {feats} has 50 frames/s, the most uniform can keep (--k 1)"),
])
def test_bad_options_refused_before_anything_is_written(tmp_path, method, opts, message):
    feats = feats_store(tmp_path / "feats")
    out = tmp_path / "seg"
    with pytest.raises(ValueError) as e:
        S.segment(feats, method, str(out), **opts)
    assert str(e.value) == message.format(feats=feats)
    assert not (out / "store.json").exists()
    good = {"k": 3} if method == "uniform" else {}
    assert S.segment(feats, method, str(out), **good)["utterances"] == 4  # corrected: accepted


def test_cli_refuses_k_minus_2_then_accepts_k_3(tmp_path):
    feats = feats_store(tmp_path / "feats")
    args = ["segment", "--feats", feats, "--method", "uniform", "--out", str(tmp_path / "seg")]
    r = CliRunner().invoke(main, args + ["--k", "-2"])
    assert (r.exit_code, r.output) == (1, "Error: --k must be a whole number of frames >= 1, got -2\n")
    r = CliRunner().invoke(main, args + ["--k", "3"])
    assert r.exit_code == 0, r.output
    assert Store(str(tmp_path / "seg"))["u0"].tolist() == list(range(0, 40, 3))


def test_unreachable_target_rate_for_a_threshold_is_reported(tmp_path, caplog):
    feats = feats_store(tmp_path / "feats")
    with caplog.at_level(logging.WARNING, logger="lalmtool"):
        s = S.segment(feats, "prominence", str(tmp_path / "seg"), target_rate=49.0)
    closest = s["tokens"] / (0.8 + 1.0 + 1.2 + 1.4)
    assert f"--target-rate 49 cannot be reached with prominence on this set: the closest is " \
           f"{closest:.3g} tokens/s (every peak kept)" in caplog.text


def test_pool_refuses_a_feature_store_as_segments(tmp_path):
    feats = feats_store(tmp_path / "feats")
    with pytest.raises(StoreError) as e:
        pool_store(feats, feats, "mean", str(tmp_path / "pooled"))
    assert str(e.value) == (f"{feats} is a feats store, not boundaries: give --segments a store "
                            "from `lalmtool segment`")
    assert not os.path.exists(tmp_path / "pooled" / "store.json")


def test_pool_refuses_nj_0_before_writing(tmp_path):
    feats = feats_store(tmp_path / "feats")
    S.segment(feats, "peaks", str(tmp_path / "seg"))
    with pytest.raises(ValueError, match=r"^--nj must be >= 1, got -3$"):
        pool_store(feats, str(tmp_path / "seg"), "mean", str(tmp_path / "pooled"), nj=-3)
    assert not os.path.exists(tmp_path / "pooled")


def test_changed_features_invalidate_exactly_the_stores_downstream(tmp_path):
    feats = feats_store(tmp_path / "feats", seed=0, fp="a" * 64)
    S.segment(feats, "peaks", str(tmp_path / "seg"))
    pool_store(feats, str(tmp_path / "seg"), "mean", str(tmp_path / "pooled"))
    before = Store(str(tmp_path / "pooled"))["u1"].copy()
    # the same inputs again: nothing to redo, nothing refused
    assert S.segment(feats, "peaks", str(tmp_path / "seg"))["utterances"] == 0
    # new features (another fingerprint) in place of the old ones
    StoreWriter.create(feats, "feats", "b" * 64, {"stage": "extract", "frame_rate": 50.0},
                       plan_shards([f"u{i}" for i in range(4)], 2, "feats"), force=True)
    feats_store(tmp_path / "feats", seed=7, fp="b" * 64)
    with pytest.raises(StoreError, match=r"seg already holds a seg store made with different inputs"):
        S.segment(feats, "peaks", str(tmp_path / "seg"))
    with pytest.raises(StoreError, match=r"seg was segmented from .*feats, whose content differs"):
        pool_store(feats, str(tmp_path / "seg"), "mean", str(tmp_path / "pooled"))
    S.segment(feats, "peaks", str(tmp_path / "seg"), force=True)
    with pytest.raises(StoreError, match=r"pooled already holds a pooled store made with different"):
        pool_store(feats, str(tmp_path / "seg"), "mean", str(tmp_path / "pooled"))
    pool_store(feats, str(tmp_path / "seg"), "mean", str(tmp_path / "pooled"), force=True)
    after = Store(str(tmp_path / "pooled"))["u1"]
    z = Store(feats)["u1"]
    np.testing.assert_allclose(after, pool(z, S.peaks(z)).astype(np.float16))
    assert after.shape != before.shape or not np.array_equal(after, before)
