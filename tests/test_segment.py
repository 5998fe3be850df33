import numpy as np
import pytest
import torch
from scipy.signal import find_peaks

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
