"""Store detection and faults: checksums, damaged and stale shards, few open handles, full disk."""
from __future__ import annotations

import errno
import glob
import json
import os

import h5py
import numpy as np
import pytest

from conftest import write_frames_store
from lalmtool import store as store_mod
from lalmtool.store import (ShardResult, Store, StoreError, StoreWriter, plan_shards,
                            shard_problem, verify_store)

FP = "f" * 64


def _arr(utt: str) -> np.ndarray:
    seed = int(utt[1:])
    return np.random.default_rng(seed).standard_normal((7 + seed, 4)).astype(np.float16)


def make_store(path, n: int = 6, shard_size: int = 2, fp: str = FP) -> StoreWriter:
    return write_frames_store(path, {f"u{i}": (_arr(f"u{i}"), {"duration": 1.0})
                                     for i in range(n)}, shard_size, fp)


def _flip_byte_in_data(file: str, utt: str) -> None:
    with h5py.File(file, "r") as f:
        offset = f[utt].id.get_chunk_info(0).byte_offset
    with open(file, "r+b") as fh:
        fh.seek(offset + 3)
        b = fh.read(1)
        fh.seek(offset + 3)
        fh.write(bytes([b[0] ^ 0x10]))


def test_datasets_are_checksummed_and_plain_h5py_reads_them(tmp_path):
    make_store(tmp_path / "s")
    with h5py.File(tmp_path / "s" / "feats.00001.h5", "r") as f:
        assert f["u2"].fletcher32 is True
        np.testing.assert_array_equal(f["u2"][()], _arr("u2"))
    assert verify_store(str(tmp_path / "s")) == (3, [])


def test_bit_flip_is_detected_on_read_and_redone_by_a_rerun(tmp_path):
    make_store(tmp_path / "s")
    shard = str(tmp_path / "s" / "feats.00001.h5")
    _flip_byte_in_data(shard, "u3")
    st = Store(str(tmp_path / "s"))
    np.testing.assert_array_equal(st["u2"], _arr("u2"))  # the rest of the shard still reads
    with pytest.raises(StoreError) as e:
        st["u3"]
    assert str(e.value).startswith(f"{shard} is damaged (utterance 'u3'): OSError: ")
    assert str(e.value).endswith(f"rerun `lalmtool extract` with the same --out "
                                 f"({tmp_path / 's'}) to redo it")
    n, problems = verify_store(str(tmp_path / "s"))
    assert (n, [p[0] for p in problems]) == (3, [shard])
    assert problems[0][1].startswith("is damaged (OSError")
    rerun = StoreWriter(str(tmp_path / "s"))
    assert rerun.pending() == ["feats.00001.h5"]
    make_store(tmp_path / "s")  # the stage's rerun
    np.testing.assert_array_equal(Store(str(tmp_path / "s"))["u3"], _arr("u3"))


def test_truncated_shard_named_and_redone(tmp_path):
    make_store(tmp_path / "s")
    shard = tmp_path / "s" / "feats.00002.h5"
    os.truncate(shard, os.path.getsize(shard) // 2)
    with pytest.raises(StoreError) as e:
        Store(str(tmp_path / "s"))
    assert str(e.value).startswith(f"{shard} is damaged: OSError: Unable to")
    assert StoreWriter(str(tmp_path / "s")).pending() == ["feats.00002.h5"]
    make_store(tmp_path / "s")
    assert Store(str(tmp_path / "s")).ids == [f"u{i}" for i in range(6)]


def test_overwritten_header_named(tmp_path):
    make_store(tmp_path / "s")
    shard = tmp_path / "s" / "feats.00000.h5"
    with open(shard, "r+b") as fh:
        fh.write(b"\0" * 64)
    with pytest.raises(StoreError, match=r"feats\.00000\.h5 is damaged: OSError"):
        Store(str(tmp_path / "s"))
    assert StoreWriter(str(tmp_path / "s")).pending() == ["feats.00000.h5"]


def test_shard_of_another_fingerprint_is_redone_after_store_json_is_lost(tmp_path):
    make_store(tmp_path / "s", fp="a" * 64)
    os.remove(tmp_path / "s" / "store.json")
    w = StoreWriter.create(str(tmp_path / "s"), "feats", "b" * 64, {"stage": "extract"},
                           plan_shards([f"u{i}" for i in range(6)], 2, "feats"))
    assert w.pending() == ["feats.00000.h5", "feats.00001.h5", "feats.00002.h5"]
    with pytest.raises(StoreError, match=r"feats\.00000\.h5 was written with other inputs"):
        Store(str(tmp_path / "s"))


def test_damaged_store_json_is_named_and_rewritten(tmp_path):
    make_store(tmp_path / "s")
    (tmp_path / "s" / "store.json").write_text('{"kind": "fe')
    with pytest.raises(StoreError, match=r"store\.json is damaged \(Unterminated string"):
        Store(str(tmp_path / "s"))
    make_store(tmp_path / "s")  # a rerun writes it again and keeps the shards
    assert len(Store(str(tmp_path / "s"))) == 6


def test_old_store_without_checksums_reads(tmp_path):
    w = StoreWriter.create(str(tmp_path / "s"), "feats", FP, {"stage": "extract"},
                           {"feats.00000.h5": ["u1"]})
    with h5py.File(tmp_path / "s" / "feats.00000.h5", "w") as f:  # as written before checksums
        f.attrs.update({"fingerprint": FP, "meta": "{}", "skipped": "[]"})
        f.create_dataset("u1", data=_arr("u1"))
    w.finish()
    np.testing.assert_array_equal(Store(str(tmp_path / "s"))["u1"], _arr("u1"))
    assert verify_store(str(tmp_path / "s")) == (1, [])


def test_store_keeps_at_most_max_open_files(tmp_path):
    make_store(tmp_path / "s", n=10, shard_size=1)
    st = Store(str(tmp_path / "s"), max_open=3)
    assert len(st._files) == 3
    for _ in range(2):
        for i in range(10):
            np.testing.assert_array_equal(st[f"u{i}"], _arr(f"u{i}"))
            assert len(st._files) == min(3, 10)
    assert list(st._files) == ["feats.00007.h5", "feats.00008.h5", "feats.00009.h5"]
    st.close()
    assert st._files == {}


def test_unpickled_store_reopens_lazily_with_the_same_limit(tmp_path):
    import pickle

    make_store(tmp_path / "s", n=6, shard_size=1)
    st = pickle.loads(pickle.dumps(Store(str(tmp_path / "s"), max_open=2)))
    assert len(st._files) == 0
    for _ in range(2):
        for i in range(6):
            np.testing.assert_array_equal(st[f"u{i}"], _arr(f"u{i}"))
    assert list(st._files) == ["feats.00004.h5", "feats.00005.h5"]


def test_full_disk_leaves_no_tmp_and_a_resumable_store(tmp_path, monkeypatch):
    ids = ["u0", "u1"]
    w = StoreWriter.create(str(tmp_path / "s"), "feats", FP, {"stage": "extract"},
                           plan_shards(ids, 1, "feats"))
    w.write_shard("feats.00000.h5", ShardResult(items=[("u0", _arr("u0"), {})]))
    real = store_mod._create_dataset

    def full(f, utt, arr):
        real(f, utt, arr)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "_create_dataset", full)
    with pytest.raises(StoreError) as e:
        w.write_shard("feats.00001.h5", ShardResult(items=[("u1", _arr("u1"), {})]))
    final = os.path.join(str(tmp_path / "s"), "feats.00001.h5")
    assert str(e.value) == (f"cannot write {final}: OSError: [Errno 28] No space left on device."
                            " Free space or choose a writable --out, then rerun: finished "
                            "shards are kept")
    assert glob.glob(str(tmp_path / "s" / "*.tmp*")) == []
    monkeypatch.setattr(store_mod, "_create_dataset", real)
    w2 = StoreWriter(str(tmp_path / "s"))
    assert w2.pending() == ["feats.00001.h5"]
    w2.write_shard("feats.00001.h5", ShardResult(items=[("u1", _arr("u1"), {})]))
    w2.finish()
    assert Store(str(tmp_path / "s")).ids == ids


def test_shard_problem_names_unplanned_utterances(tmp_path):
    make_store(tmp_path / "s")
    assert shard_problem(str(tmp_path / "s" / "feats.00000.h5"), FP, ["u0", "u9"]) == (
        "holds other utterances than store.json plans for it (missing ['u9'], unplanned "
        "['u1'])")
    info = json.loads((tmp_path / "s" / "store.json").read_text())
    assert info["shards"]["feats.00000.h5"] == ["u0", "u1"]


def test_overwritten_object_header_named_and_redone(tmp_path):
    make_store(tmp_path / "s")
    shard = str(tmp_path / "s" / "feats.00001.h5")
    with h5py.File(shard, "r") as f:
        addr = h5py.h5o.get_info(f["u3"].id).addr
    with open(shard, "r+b") as fh:
        fh.seek(addr)
        fh.write(b"\xff" * 16)
    st = Store(str(tmp_path / "s"))
    np.testing.assert_array_equal(st["u2"], _arr("u2"))
    with pytest.raises(StoreError) as e:
        st["u3"]
    assert str(e.value).startswith(f"{shard} is damaged (utterance 'u3'): KeyError: 'Unable to ")
    assert verify_store(str(tmp_path / "s"))[1][0][0] == shard
    assert StoreWriter(str(tmp_path / "s")).pending() == ["feats.00001.h5"]


def _count_verified(monkeypatch) -> list:
    calls = []
    real = store_mod.shard_problem
    monkeypatch.setattr(store_mod, "shard_problem", lambda f, *a: calls.append(
        os.path.basename(f)) or real(f, *a))
    return calls


def test_a_rerun_of_a_finished_store_reads_no_shard_again(tmp_path, monkeypatch):
    make_store(tmp_path / "s")
    calls = _count_verified(monkeypatch)
    assert StoreWriter(str(tmp_path / "s")).pending() == [] and calls == []
    # a shard changed since (its record no longer matches) is verified, and redone if damaged
    _flip_byte_in_data(str(tmp_path / "s" / "feats.00002.h5"), "u4")
    assert StoreWriter(str(tmp_path / "s")).pending() == ["feats.00002.h5"]
    assert calls == ["feats.00002.h5"]
    assert verify_store(str(tmp_path / "s"))[1][0][0].endswith("feats.00002.h5")  # reads all


def test_records_of_another_fingerprint_or_racily_clean_shards_are_not_trusted(tmp_path,
                                                                               monkeypatch):
    make_store(tmp_path / "s")
    rec = tmp_path / "s" / "verified.json"
    calls = _count_verified(monkeypatch)
    data = json.loads(rec.read_text())
    rec.write_text(json.dumps({**data, "fingerprint": "a" * 64}))
    assert StoreWriter(str(tmp_path / "s")).pending() == [] and len(calls) == 3
    # shards modified in the record's timestamp tick or after (00001, then 00002) may have
    # changed unseen: verified again
    rec.write_text(json.dumps(data))
    shard_mtime = os.stat(tmp_path / "s" / "feats.00001.h5").st_mtime_ns
    os.utime(rec, ns=(shard_mtime, shard_mtime))
    calls.clear()
    assert StoreWriter(str(tmp_path / "s")).pending() == []
    assert calls == ["feats.00001.h5", "feats.00002.h5"]
    rec.write_text("{damaged")
    calls.clear()
    assert StoreWriter(str(tmp_path / "s")).pending() == [] and len(calls) == 3


def test_store_meta_answers_for_this_release_and_earlier_ones():
    """StoreMeta reads the source chain, the frame rates, the backend options and the condition
    one way: for a pooled store of this release, and for the previous release's stores (the
    extract recorded only the options given, ``backend_opts``, and no ``source_frame_rate``)."""
    from lalmtool.store import StoreMeta

    extract = {"stage": "extract", "backend": "whisper", "model": "M", "trim": True,
               "backend_opts": {"language": "en"}, "frame_rate": 50.0}
    seg = {"stage": "segment", "method": "uniform", "params": {"k": 3}, "frame_rate": 50.0,
           "source_meta": extract}
    pooled = StoreMeta({"stage": "pool", "method": "uniform", "params": {"k": 3},
                        "reduce": "mean", "frame_rate": 16.8, "source_meta": seg})
    assert (pooled.stage, pooled.source.stage, pooled.extracted["model"]) == (
        "pool", "segment", "M")
    assert (pooled.frame_rate, pooled.source_frame_rate) == (16.8, 50.0)
    assert (pooled.backend, pooled.backend_options, pooled.trim) == (
        "whisper", {"language": "en"}, True)
    assert pooled.condition() == ("uniform", {"k": 3, "reduce": "mean"}, "uniform-mean-k3")
    assert pooled.compression_steps() == [
        {"method": "uniform", "params": {"k": 3}, "reduce": "mean"}]
    assert StoreMeta(seg).condition("learnt")[2] == "uniform-learnt-k3"
    assert StoreMeta(seg).compression_steps("learnt") == [
        {"method": "uniform", "params": {"k": 3}, "reduce": "learnt"}]
    now = StoreMeta({**extract, "trim": False, "backend_options": {"language": "en", "trim": False},
                     "source_frame_rate": 50.0})
    assert now.condition() == ("native", {}, "native") and now.backend_options["trim"] is False
    assert StoreMeta({"stage": "extract"}).frame_rate == 50.0  # the oldest: no rate recorded
    assert json.loads(json.dumps(pooled)) == dict(pooled)  # still the JSON that stages write
