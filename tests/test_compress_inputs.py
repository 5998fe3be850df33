"""The Python API's arguments (lalmtool.compress): each wrong one is a one-line ValueError
naming it, raised before any work, by compress, boundaries and pool alike; right ones give
exactly what they gave before (3.0 is k=3, numpy frames are torch frames)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lalmtool.compress import boundaries, compress, pool
from lalmtool.pooler import LearntPooler

NAN, INF = float("nan"), float("inf")
X = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(0))

# (id, compress arguments besides the frames, the words the message must hold)
BAD = [
    ("fractional-lengths", {"lengths": [12.0, 5.5]}, r"lengths must be whole numbers"),
    ("lengths-2d", {"lengths": torch.tensor([[12], [5]])},
     r"lengths must be one number per utterance.*shape \(2, 1\)"),
    ("lengths-too-long", {"lengths": [12, 13]}, r"lengths must be 2 values in 1..12"),
    ("lengths-zero", {"lengths": [12, 0]}, r"lengths must be 2 values in 1..12"),
    ("lengths-count", {"lengths": [12]}, r"lengths must be 2 values in 1..12"),
    ("lengths-bool", {"lengths": torch.tensor([True, True])}, r"lengths must be whole numbers"),
    ("lengths-nan", {"lengths": [12.0, NAN]}, r"lengths must be whole numbers"),
    ("k-fraction", {"method": "uniform", "k": 2.5}, r"k must be a whole number >= 1, got 2.5"),
    ("k-zero", {"method": "uniform", "k": 0}, r"k must be a whole number >= 1, got 0"),
    ("k-negative", {"method": "uniform", "k": -1}, r"k must be a whole number >= 1, got -1"),
    ("k-bool", {"method": "uniform", "k": True}, r"k must be a whole number >= 1, got True"),
    ("k-string", {"method": "uniform", "k": "3"}, r"k must be a whole number >= 1"),
    ("k-missing", {"method": "uniform"}, r"uniform needs k"),
    ("rate-negative", {"method": "uniform", "target_rate": -5, "frame_rate": 50},
     r"target_rate must be a finite number > 0, got -5"),
    ("rate-zero", {"method": "uniform", "target_rate": 0, "frame_rate": 50},
     r"target_rate must be a finite number > 0, got 0"),
    ("rate-nan", {"method": "scpc", "target_rate": NAN, "frame_rate": 50},
     r"target_rate must be a finite number > 0, got nan"),
    ("rate-inf", {"method": "prominence", "target_rate": INF, "frame_rate": 50},
     r"target_rate must be a finite number > 0, got inf"),
    ("frame-rate-zero", {"method": "uniform", "target_rate": 10, "frame_rate": 0},
     r"frame_rate must be a finite number > 0, got 0"),
    ("rate-without-frame-rate", {"method": "uniform", "target_rate": 10},
     r"target_rate needs frame_rate"),
    ("threshold-negative", {"method": "scpc", "threshold": -1.0},
     r"threshold must be a finite number >= 0, got -1.0"),
    ("threshold-nan", {"method": "prominence", "threshold": NAN},
     r"threshold must be a finite number >= 0, got nan"),
    ("k-and-rate", {"method": "uniform", "k": 3, "target_rate": 10, "frame_rate": 50},
     r"give target_rate or k/threshold, not both"),
    ("threshold-and-rate", {"method": "scpc", "threshold": 0.1, "target_rate": 10,
                            "frame_rate": 50}, r"give target_rate or k/threshold, not both"),
    ("peaks-k", {"method": "peaks", "k": 3}, r"k is the segment length of uniform; peaks takes "
                                             r"no k"),
    ("scpc-k", {"method": "scpc", "k": 3}, r"scpc takes no k"),
    ("peaks-threshold", {"method": "peaks", "threshold": 0.1},
     r"threshold is for scpc and prominence; peaks takes no threshold"),
    ("uniform-threshold", {"method": "uniform", "k": 3, "threshold": 0.1},
     r"uniform takes no threshold"),
    ("peaks-rate", {"method": "peaks", "target_rate": 10, "frame_rate": 50},
     r"peaks has none"),
    ("method-unknown", {"method": "peak"}, r"unknown method 'peak'"),
    ("reduce-unknown", {"reduce": "max"}, r"unknown reducer 'max'"),
    ("learnt-without-pooler", {"reduce": "learnt"}, r"reduce='learnt' needs its trained pooler"),
    ("pooler-without-learnt", {"reduce": "mean", "pooler": LearntPooler(8, heads=4)},
     r"pooler is for reduce='learnt'"),
    ("pooler-dimension", {"reduce": "learnt", "pooler": LearntPooler(16, heads=4)},
     r"pooler pools 16-dimensional frames, but the frames are 8-dimensional"),
    ("seconds-count", {"method": "scpc", "target_rate": 10, "frame_rate": 50, "seconds": [1.0]},
     r"seconds must be the audio duration of each utterance: 2 finite numbers > 0"),
    ("seconds-negative", {"method": "scpc", "target_rate": 10, "frame_rate": 50,
                          "seconds": [1.0, -1.0]}, r"seconds must be the audio duration"),
    ("int-frames", {"x": X.long()}, r"frames must be floating point, got torch.int64"),
    ("bool-frames", {"x": X > 0}, r"frames must be floating point, got torch.bool"),
    ("int-numpy-frames", {"x": X.long().numpy()}, r"frames must be floating point"),
    ("list-frames", {"x": X.tolist()}, r"frames must be a torch tensor \(or numpy array\)"),
    ("1d-frames", {"x": X[0, 0]}, r"frames must be \[T, D\] or \[B, T, D\], got shape \(8,\)"),
    ("no-frames", {"x": X[:, :0]}, r"frames must hold at least one frame"),
    ("lengths-for-one-utterance", {"x": X[0], "lengths": [12]},
     r"lengths is for a padded batch"),
]


@pytest.mark.parametrize("args,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_each_bad_argument_is_a_one_line_value_error_naming_it(args, words):
    args = dict(args)
    x = args.pop("x", X)
    with pytest.raises(ValueError, match=words) as err:
        compress(x, **args)
    assert "\n" not in str(err.value)


def test_the_checks_come_before_any_work(monkeypatch):
    import lalmtool.compress as C

    def no_work(*a, **k):
        raise AssertionError("worked before checking")

    monkeypatch.setattr(C, "dissimilarity", no_work)
    with pytest.raises(ValueError, match="k must be"):
        compress(X, "uniform", k=2.5)
    with pytest.raises(ValueError, match="pooler pools 16-dimensional"):
        compress(X, "uniform", "learnt", k=3, pooler=LearntPooler(16, heads=4))


def test_boundaries_and_pool_check_the_same_arguments():
    for kwargs, words in [({"k": 2.5}, "k must be a whole number"),
                          ({"k": 3, "lengths": [12.0, 5.5]}, "lengths must be whole numbers"),
                          ({"k": 3, "threshold": 0.1}, "uniform takes no threshold"),
                          ({}, "uniform needs k")]:
        with pytest.raises(ValueError, match=words):
            boundaries(X, "uniform", **kwargs)
    with pytest.raises(ValueError, match="peaks takes no k"):
        boundaries(X, "peaks", k=3)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        boundaries(X, "scpc", threshold=-1.0)
    with pytest.raises(ValueError, match="frames must be floating point"):
        boundaries(X.long(), "peaks")
    starts = [torch.tensor([0, 4]), torch.tensor([0, 2])]
    for kwargs, words in [({"reduce": "max"}, "unknown reducer"),
                          ({"lengths": [12, 5.5]}, "lengths must be whole numbers"),
                          ({"lengths": [12, 13]}, "lengths must be 2 values in 1..12"),
                          ({"reduce": "learnt", "pooler": LearntPooler(16, heads=4)},
                           "pooler pools 16-dimensional frames, but the frames are 8"),
                          ({"reduce": "learnt"}, "needs its trained pooler")]:
        with pytest.raises(ValueError, match=words):
            pool(X, starts, **kwargs)
    with pytest.raises(ValueError, match="frames must be floating point"):
        pool(X.int(), starts)
    with pytest.raises(ValueError, match="1 boundary lists for 2 utterances"):
        pool(X, starts[:1])
    for bad in ([1, 4], [0, 4, 4], [0, 12], [0.0, 4.0], []):
        with pytest.raises(ValueError, match=r"starts\[0\] must be integer segment starts"):
            pool(X, [torch.tensor(bad), starts[1]], lengths=[12, 5])


def same(a, b) -> None:
    assert a.tokens.dtype == b.tokens.dtype and torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths)
    assert [s.tolist() for s in a.boundaries] == [s.tolist() for s in b.boundaries]
    assert a.params == b.params


@pytest.mark.parametrize("method,opts", [
    ("peaks", {}), ("uniform", {"k": 3}), ("scpc", {"threshold": 0.01}),
    ("prominence", {}), ("prominence", {"target_rate": 12.0, "frame_rate": 50.0}),
    ("uniform", {"target_rate": 20.0, "frame_rate": 50.0})])
def test_equivalent_spellings_give_the_same_tokens(method, opts):
    lengths = torch.tensor([12, 5])
    ref = compress(X, method, lengths=lengths, **opts)
    # lengths as a list, a float list of whole numbers, numpy ints
    for other in ([12, 5], [12.0, 5.0], np.array([12, 5]), torch.tensor([12.0, 5.0])):
        same(compress(X, method, lengths=other, **opts), ref)
    # numpy frames: torch.from_numpy, so torch tokens equal to the torch frames' ones
    out = compress(X.numpy(), method, lengths=lengths, **opts)
    assert torch.is_tensor(out.tokens)
    same(out, ref)
    # boundaries with the parameters used give compress's
    assert [b.tolist() for b in boundaries(X.numpy(), method, lengths=lengths, **ref.params)] \
        == [b.tolist() for b in ref.boundaries]


def test_whole_floats_and_numpy_numbers_are_the_same_k_and_threshold():
    ref = compress(X, "uniform", k=3)
    assert ref.params == {"k": 3} and type(ref.params["k"]) is int
    for k in (3.0, np.int64(3), np.float32(3.0), torch.tensor(3)):
        out = compress(X, "uniform", k=k)
        same(out, ref)
        assert type(out.params["k"]) is int
    ref = compress(X, "scpc", threshold=0.01)
    same(compress(X, "scpc", threshold=np.float64(0.01)), ref)
    zero = compress(X, "prominence", threshold=0)
    same(zero, compress(X, "prominence"))
    assert zero.params == {"threshold": 0.0}


def test_numpy_frames_of_every_float_kind_and_layout():
    z = X[0].numpy()
    ref = compress(X[0], "peaks")
    for a in (z.copy(), np.asfortranarray(z), z.astype(">f4")):
        same(compress(a, "peaks"), ref)
    ro = z.copy()
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not writable" warning from torch
        same(compress(ro, "peaks"), ref)
    half = compress(z.astype(np.float16), "uniform", k=3)
    assert half.tokens.dtype == torch.float16
    same(half, compress(torch.from_numpy(z.astype(np.float16)), "uniform", k=3))
    # pool takes numpy frames too, and starts as lists
    tokens, counts = pool(z, [[0, 4, 9]])
    torch.testing.assert_close(tokens, pool(X[0], [torch.tensor([0, 4, 9])])[0])
    assert counts.tolist() == [3]


def test_a_learnt_pooler_of_the_frames_dimension_is_applied():
    p = LearntPooler(8, heads=4)
    out = compress(X, "uniform", "learnt", k=3, lengths=[12, 5], pooler=p)
    # at initialisation the learnt pooler is the mean
    torch.testing.assert_close(out.tokens, compress(X, "uniform", k=3, lengths=[12, 5]).tokens)
