"""extract --pack: several utterances per encoder window, each utterance's frames cut out of its
window by time; the stages read a packed store as any other."""
import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import tone, write_manifest
from lalmtool.extract import Packing, cut_rows, extract
from lalmtool.models import load_backend
from lalmtool.store import Store


@pytest.fixture
def clips(tmp_path):
    """Eight clips of 1.5-3.6 s from two speakers, in manifest order a a a b b a a b."""
    rows, waves = [], {}
    for i, (sec, spk) in enumerate(zip([2.0, 3.1, 1.5, 2.4, 3.6, 2.2, 1.8, 2.9],
                                       "aaabbaab")):
        waves[f"u{i}"] = tone(sec, freq=150 + 40 * i, seed=i)
        sf.write(tmp_path / f"u{i}.wav", waves[f"u{i}"], 16000)
        rows.append({"id": f"u{i}", "audio": f"u{i}.wav", "text": "x", "speaker": spk})
    return write_manifest(tmp_path / "m.jsonl", rows), waves


def test_windows_join_consecutive_utterances_of_one_group():
    seconds = dict(zip("abcdef", [2.0, 3.0, 4.0, 12.0, 1.0, 1.0]))
    assert Packing(6.0).windows(list("abcdef"), seconds) == [["a", "b"], ["c"], ["d"],
                                                             ["e", "f"]]
    groups = dict(zip("abcdef", "xxyyyy"))
    assert Packing(10.0, groups).windows(list("abcdef"), seconds) == [["a", "b"], ["c"], ["d"],
                                                                      ["e", "f"]]
    frames = torch.arange(100).float()[:, None]  # 2 s at 50 rows/s, three utterances joined
    parts = cut_rows(frames, [16000, 8000, 8000], 16000, 50.0)
    assert [len(p) for p in parts] == [50, 25, 25] and parts[1][0, 0] == 50
    # a boundary that rounds onto its neighbour still leaves each utterance one row
    assert [len(p) for p in cut_rows(frames[:4], [100, 100, 12000], 16000, 50.0)] == [1, 1, 2]


def test_a_packed_store_holds_each_utterances_rows_of_its_window(tiny_whisper, clips, tmp_path):
    m, waves = clips
    be = load_backend("whisper", tiny_whisper)

    plain = extract(m, tiny_whisper, str(tmp_path / "plain"))
    packed = extract(m, tiny_whisper, str(tmp_path / "packed"), pack=10.0)
    grouped = extract(m, tiny_whisper, str(tmp_path / "grouped"), pack=10.0,
                      pack_group="speaker")
    assert (plain["windows"], packed["windows"], grouped["windows"]) == (8, 3, 4)
    store = Store(str(tmp_path / "packed"))
    assert store.meta["pack"] == {"seconds": 10.0, "group": None}
    assert store.fingerprint != Store(str(tmp_path / "plain")).fingerprint
    # u0 u1 u2 u3 (9.0 s) | u4 u5 u6 (7.6 s) | u7 (2.9 s): each window encoded once
    window = np.concatenate([waves[u] for u in ("u4", "u5", "u6")])
    frames = be.encode([window])[0].numpy().astype(np.float16)
    starts = [0, round(3.6 * 50), round(5.8 * 50), len(frames)]
    for u, s, e in zip(("u4", "u5", "u6"), starts, starts[1:]):
        assert store[u].shape == frames[s:e].shape  # (batched windows: float16 rounding)
        np.testing.assert_allclose(store[u].astype(np.float32), frames[s:e].astype(np.float32),
                                   atol=4e-3, rtol=4e-3)
        assert store.attrs(u)["pack"] == "u4"
    assert store.attrs("u5")["pack_start"] == pytest.approx(3.6)
    assert "pack" not in store.attrs("u7")  # alone in its window
    assert sum(len(store[u]) for u in store.ids) == pytest.approx(
        sum(len(Store(str(tmp_path / "plain"))[u]) for u in store.ids), abs=3)
    # the stages read it as any other store
    from lalmtool.pool import pool_store
    from lalmtool.segment import segment

    segment(str(tmp_path / "packed"), "uniform", str(tmp_path / "seg"), k=3)
    pooled = Store(pool_store(str(tmp_path / "packed"), str(tmp_path / "seg"), "mean",
                              str(tmp_path / "pooled"))["store"])
    assert {u: len(pooled[u]) for u in pooled.ids} == {
        u: math.ceil(len(store[u]) / 3) for u in store.ids}
    # every later store keeps where the window held each utterance
    assert [pooled.attrs(u).get("pack") for u in pooled.ids] == \
        [store.attrs(u).get("pack") for u in store.ids] == [*["u0"] * 4, *["u4"] * 3, None]
    assert pooled.attrs("u5")["pack_start"] == pytest.approx(3.6)


def test_joined_examples_of_one_window_are_the_windows_own_rows(tiny_whisper, clips, tmp_path):
    """concat_group pack: a long training input is consecutive utterances of one encoder
    window, whose rows join into the window's own frames."""
    from lalmtool.examples import Examples, joined_examples
    from lalmtool.finetune import TrainConfig

    m, _ = clips
    extract(m, tiny_whisper, str(tmp_path / "packed"), pack=10.0)
    ex = Examples(str(tmp_path / "packed"), m, group_field="pack")
    cfg = TrainConfig(concat_seconds=30.0, concat_group="pack")
    assert joined_examples(ex, cfg, 0) == [("u0", "u1", "u2", "u3"), ("u4", "u5", "u6"), "u7"]
    extract(m, tiny_whisper, str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="was not extracted with --pack"):
        Examples(str(tmp_path / "plain"), m, group_field="pack")


def test_pack_options_are_checked_and_group_fields_must_exist(tiny_whisper, clips, tmp_path):
    m, _ = clips
    with pytest.raises(ValueError, match="--pack must be a number of seconds > 0"):
        extract(m, tiny_whisper, str(tmp_path / "a"), pack=0)
    with pytest.raises(ValueError, match="--pack-group needs --pack"):
        extract(m, tiny_whisper, str(tmp_path / "a"), pack_group="speaker")
    with pytest.raises(ValueError, match="--pack-group 'chapter': 8 utterance"):
        extract(m, tiny_whisper, str(tmp_path / "a"), pack=10.0, pack_group="chapter")
    assert not os.path.exists(tmp_path / "a")


def test_no_utterance_straddles_an_encoder_window_boundary():
    """--pack longer than the encoder's 30 s window: an utterance that a window boundary would
    cut (its frames could not be cut out exactly) starts the next run instead."""
    seconds = {f"s{i}": 7.0 for i in range(9)}
    ids = list(seconds)
    assert Packing(60.0).windows(ids, seconds) == [ids[:8], ids[8:]]  # s4 over 28-35 s
    assert Packing(60.0).windows(ids, seconds, 30.0) == [ids[:4], ids[4:8], ids[8:]]
    exact = {"a": 10.0, "b": 20.0, "c": 5.0, "d": 40.0, "e": 5.0}  # b ends on the boundary
    assert Packing(60.0).windows(list("abc"), exact, 30.0) == [["a", "b", "c"]]
    # one longer than the window starts at 0 (its own windows); the next may follow it
    assert Packing(60.0).windows(list("de"), exact, 30.0) == [["d", "e"]]
    assert Packing(10.0).windows(ids[:3], seconds, 30.0) == [[u] for u in ids[:3]]


def test_mixed_sample_rates_are_resampled_before_they_share_a_window(tiny_whisper, tmp_path):
    rows = []
    for i, sr in enumerate([16000, 8000, 22050]):
        wave = tone(2.0, freq=200 + 50 * i, seed=i, sr=sr)
        sf.write(tmp_path / f"r{i}.wav", wave, sr)
        rows.append({"id": f"r{i}", "audio": f"r{i}.wav", "text": "x"})
    m = write_manifest(tmp_path / "m.jsonl", rows)
    packed = extract(m, tiny_whisper, str(tmp_path / "packed"), pack=10.0)
    store = Store(str(tmp_path / "packed"))
    assert packed["windows"] == 1
    assert [round(store.attrs(u)["duration"], 3) for u in store.ids] == [2.0, 2.0, 2.0]
    assert [len(store[u]) for u in store.ids] == [100, 100, 100]
    assert store.attrs("r2")["pack_start"] == pytest.approx(4.0)


def test_spans_out_of_time_order_are_packed_in_manifest_order_said_once(tiny_whisper, tmp_path,
                                                                        caplog):
    wave = tone(6.0, freq=180, seed=1)
    sf.write(tmp_path / "rec.wav", wave, 16000)
    rows = [{"id": f"c{i}", "audio": "rec.wav", "offset": off, "duration": 1.5, "text": "x"}
            for i, off in enumerate([0.0, 3.0, 1.5, 4.5])]
    m = write_manifest(tmp_path / "m.jsonl", rows)
    with caplog.at_level("WARNING", logger="lalmtool"):
        extract(m, tiny_whisper, str(tmp_path / "packed"), pack=10.0)
    said = [r.getMessage() for r in caplog.records if "out of time order" in r.getMessage()]
    assert len(said) == 1 and "1 utterance(s)" in said[0] and "e.g. c2" in said[0]
    store = Store(str(tmp_path / "packed"))
    assert [store.attrs(u)["pack_start"] for u in ("c0", "c1", "c2", "c3")] == \
        pytest.approx([0.0, 1.5, 3.0, 4.5])  # joined in the manifest's order
