"""extract → segment → pool mechanics on a tiny random Whisper and synthetic audio."""
import json
import os

import h5py
import numpy as np
import pytest
import soundfile as sf

from conftest import tone, write_manifest
from lalmtool.extract import extract
from lalmtool.manifest import ManifestError
from lalmtool.pool import pool_store
from lalmtool.segment import segment
from lalmtool.store import Store, StoreError


def read_all(path):
    st = Store(path)
    return {u: st[u] for u in st.ids}


def test_extract_layout_and_frames(tiny_whisper, audio_set, tmp_path):
    out = str(tmp_path / "feats")
    s = extract(audio_set, tiny_whisper, out, shard_size=2, batch_size=3)
    assert s["utterances"] == 5 and s["skipped"] == 0
    files = sorted(os.listdir(out))
    assert files == ["feats.00000.h5", "feats.00001.h5", "feats.00002.h5", "skipped.jsonl",
                     "store.json", "verified.json"]
    with h5py.File(os.path.join(out, "feats.00000.h5")) as f:
        assert sorted(f.keys()) == ["utt0", "utt1"]
        meta = json.loads(f.attrs["meta"])
        assert meta["frame_rate"] == 50 and f.attrs["fingerprint"]
        ds = f["utt1"]
        assert ds.dtype == np.float16 and ds.shape == (125, 16)  # 2.5 s at 50 Hz
        assert ds.attrs["duration"] == pytest.approx(2.5)
    st = Store(out)
    assert st.ids == [f"utt{i}" for i in range(5)]
    assert st["utt2"].shape[0] == 35  # ceil(0.7 * 50)


def test_batching_does_not_change_features(tiny_whisper, audio_set, tmp_path):
    a = read_all(extract(audio_set, tiny_whisper, str(tmp_path / "a"), batch_size=1)["store"])
    b = read_all(extract(audio_set, tiny_whisper, str(tmp_path / "b"), batch_size=5)["store"])
    for u in a:
        np.testing.assert_allclose(a[u].astype(np.float32), b[u].astype(np.float32), atol=2e-3)


def test_long_audio_is_encoded_window_by_window(tiny_whisper, tmp_path):
    sf.write(tmp_path / "long.wav", tone(65.0), 16000)
    m = write_manifest(tmp_path / "m.jsonl", [{"id": "long", "audio": "long.wav", "text": "x"}])
    st = Store(extract(m, tiny_whisper, str(tmp_path / "f"))["store"])
    assert st["long"].shape[0] == 3250  # 1500 + 1500 + 250


def test_no_trim_keeps_whole_windows(tiny_whisper, audio_set, tmp_path):
    st = Store(extract(audio_set, tiny_whisper, str(tmp_path / "f"), trim=False)["store"])
    assert all(st[u].shape[0] == 1500 for u in st.ids)


def test_rerun_skips_and_fingerprint_mismatch_refuses(tiny_whisper, audio_set, tmp_path):
    out = str(tmp_path / "feats")
    extract(audio_set, tiny_whisper, out, shard_size=2)
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".h5")}
    assert extract(audio_set, tiny_whisper, out, shard_size=2)["utterances"] == 0
    assert mtimes == {f: os.path.getmtime(os.path.join(out, f)) for f in mtimes}
    with pytest.raises(StoreError, match="--force"):
        extract(audio_set, tiny_whisper, out, shard_size=2, trim=False)
    assert extract(audio_set, tiny_whisper, out, shard_size=2, trim=False, force=True)["utterances"] == 5


def test_missing_shard_is_redone_identically(tiny_whisper, audio_set, tmp_path):
    out = str(tmp_path / "feats")
    extract(audio_set, tiny_whisper, out, shard_size=2)
    before = read_all(out)
    os.remove(os.path.join(out, "feats.00001.h5"))
    with open(os.path.join(out, "feats.00002.h5.tmp.999"), "w") as fh:
        fh.write("half-written")
    with pytest.raises(StoreError, match="incomplete"):
        Store(out)
    assert extract(audio_set, tiny_whisper, out, shard_size=2)["utterances"] == 2
    after = read_all(out)
    assert before.keys() == after.keys()
    for u in before:
        np.testing.assert_array_equal(before[u], after[u])
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def _no_model_here(*args, **kwargs):
    raise AssertionError("this process must not load a model")


def test_parallel_workers_write_the_same_store(tiny_whisper, audio_set, tmp_path, monkeypatch):
    a = read_all(extract(audio_set, tiny_whisper, str(tmp_path / "a"), shard_size=2)["store"])
    monkeypatch.setattr("lalmtool.extract.load_backend", _no_model_here)  # only workers load
    b = read_all(extract(audio_set, tiny_whisper, str(tmp_path / "b"), shard_size=2, nj=2)["store"])
    assert a.keys() == b.keys()
    for u in a:
        np.testing.assert_array_equal(a[u], b[u])


def test_segment_and_pool_stores(tiny_whisper, audio_set, tmp_path):
    feats = extract(audio_set, tiny_whisper, str(tmp_path / "feats"), shard_size=2)["store"]
    s = segment(feats, "uniform", str(tmp_path / "seg"), k=3)
    assert s["tokens"] == sum(-(-Store(feats)[u].shape[0] // 3) for u in Store(feats).ids)
    p = pool_store(feats, str(tmp_path / "seg"), "mean", str(tmp_path / "pooled"))
    assert p["tokens"] == s["tokens"] and p["compression"] == pytest.approx(s["compression"])
    pooled, seg = Store(str(tmp_path / "pooled")), Store(str(tmp_path / "seg"))
    assert pooled.meta["method"] == "uniform" and pooled.meta["params"] == {"k": 3}
    assert pooled.meta["frame_rate"] == pytest.approx(s["tokens_per_s"])
    assert seg["utt1"].dtype == np.int32 and seg["utt1"].tolist() == list(range(0, 125, 3))
    z = Store(feats)["utt1"].astype(np.float32)
    np.testing.assert_allclose(pooled["utt1"][0].astype(np.float32), z[:3].mean(0), atol=1e-3)
    # pooling with boundaries of another store is refused
    other = extract(audio_set, tiny_whisper, str(tmp_path / "other"), trim=False)["store"]
    with pytest.raises(StoreError, match="segmented from"):
        pool_store(other, str(tmp_path / "seg"), "mean", str(tmp_path / "p2"))


def test_target_rate_hits_the_requested_rate(tiny_whisper, audio_set, tmp_path):
    feats = extract(audio_set, tiny_whisper, str(tmp_path / "feats"))["store"]
    for method in ("scpc", "prominence"):
        s = segment(feats, method, str(tmp_path / method), target_rate=10.0)
        assert s["tokens_per_s"] == pytest.approx(10.0, abs=0.2), method
    with pytest.raises(ValueError, match="threshold"):
        segment(feats, "peaks", str(tmp_path / "p"), target_rate=10.0)
    s = segment(feats, "uniform", str(tmp_path / "u"), target_rate=25.0)
    assert Store(str(tmp_path / "u")).meta["params"]["k"] == 2


BAD = {
    "missing": lambda d: "nowhere.wav",
    "corrupt": lambda d: (open(d / "bad.wav", "wb").write(b"RIFF\x00\x00garbage"), "bad.wav")[1],
    "empty": lambda d: (sf.write(d / "empty.wav", np.zeros(0, np.float32), 16000), "empty.wav")[1],
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_audio_fails_naming_the_utterance_or_is_skipped(kind, tiny_whisper, audio_set, tmp_path):
    rows = [json.loads(l) for l in open(audio_set)]
    rows.append({"id": "bad1", "audio": BAD[kind](tmp_path), "text": "oops"})
    m = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "feats"
    with pytest.raises(ManifestError, match="bad1"):
        extract(m, tiny_whisper, str(out))
    assert not out.exists() or not list(out.glob("*.h5"))
    s = extract(m, tiny_whisper, str(out), on_error="skip")
    assert s["utterances"] == 5 and s["skipped"] == 1
    skipped = [json.loads(l) for l in open(out / "skipped.jsonl")]
    assert [x["id"] for x in skipped] == ["bad1"]
    assert "bad1" not in Store(str(out))


def test_manifest_problems_reported_all_at_once(tiny_whisper, tmp_path):
    sf.write(tmp_path / "a.wav", tone(1.0), 16000)
    lines = [json.dumps({"id": "a", "audio": "a.wav", "text": "ok"}),
             json.dumps({"id": "a", "audio": "a.wav", "text": "dup"}),
             json.dumps({"id": "b", "audio": "a.wav", "text": "  "}),
             json.dumps({"id": "c/d", "audio": "a.wav", "text": "slash"})]
    with open(tmp_path / "m.jsonl", "wb") as fh:
        fh.write(("\n".join(lines) + "\n").encode())
        fh.write(b'{"id": "e", "audio": "a.wav", "text": "caf\xe9"}\n')
    with pytest.raises(ManifestError) as e:
        extract(str(tmp_path / "m.jsonl"), tiny_whisper, str(tmp_path / "f"))
    msg = str(e.value)
    for needle in ("duplicate id", "empty text", "path separator", "line 5", "UTF-8"):
        assert needle in msg


def test_stereo_44k_and_8k_are_resampled(tiny_whisper, tmp_path):
    sf.write(tmp_path / "st.wav", np.stack([tone(2.0, 44100), tone(2.0, 44100, 330)], 1), 44100)
    sf.write(tmp_path / "n8.flac", tone(1.5, 8000), 8000)
    m = write_manifest(tmp_path / "m.jsonl", [{"id": "st", "audio": "st.wav", "text": "a"},
                                              {"id": "n8", "audio": "n8.flac", "text": "b"}])
    st = Store(extract(m, tiny_whisper, str(tmp_path / "f"))["store"])
    assert st["st"].shape[0] == 100 and st["n8"].shape[0] == 75
    assert st.attrs("st")["duration"] == pytest.approx(2.0)


def test_sigkill_during_extract_then_rerun_gives_the_same_store(tiny_whisper, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    rows = []
    for i in range(16):
        sf.write(tmp_path / f"{i}.wav", tone(1.0 + 0.2 * i, seed=i), 16000)
        rows.append({"id": f"k{i:02d}", "audio": f"{i}.wav", "text": "t"})
    m = write_manifest(tmp_path / "m.jsonl", rows)
    ref = read_all(extract(m, tiny_whisper, str(tmp_path / "ref"), shard_size=1)["store"])
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lalmtool.cli", "extract", "--manifest", m, "--model",
           tiny_whisper, "--out", str(out), "--shard-size", "1", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(list(out.glob("feats.*.h5"))) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "finished before it could be killed"
    assert len(list(out.glob("feats.*.h5"))) < 16
    subprocess.run(cmd, check=True, capture_output=True)
    again = read_all(str(out))
    assert again.keys() == ref.keys()
    for u in ref:
        np.testing.assert_array_equal(again[u], ref[u])
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "ref"))


def test_cli_pipeline_and_clear_errors(tiny_whisper, audio_set, tmp_path):
    from click.testing import CliRunner

    from lalmtool.cli import main

    r = CliRunner()
    feats, seg, pooled = (str(tmp_path / n) for n in ("feats", "seg", "pooled"))
    res = r.invoke(main, ["extract", "--manifest", audio_set, "--model", tiny_whisper, "--out", feats])
    assert res.exit_code == 0, res.output
    assert "utterances" in res.output
    res = r.invoke(main, ["segment", "--feats", feats, "--method", "peaks", "--out", seg])
    assert res.exit_code == 0 and "tokens_per_s" in res.output
    res = r.invoke(main, ["pool", "--feats", feats, "--segments", seg, "--out", pooled])
    assert res.exit_code == 0 and "compression" in res.output
    res = r.invoke(main, ["info", pooled])
    assert json.loads(res.output)["kind"] == "pooled"
    res = r.invoke(main, ["segment", "--feats", str(tmp_path / "nope"), "--method", "peaks",
                          "--out", seg])
    assert res.exit_code == 1 and "not a lalmtool store" in res.output
    res = r.invoke(main, ["segment", "--feats", feats, "--method", "uniform", "--out", seg])
    assert res.exit_code == 1 and "--k" in res.output


@pytest.mark.parametrize("device,local_rank,expected", [
    ("cuda", "3", "cuda:3"), ("cuda", None, "cuda"), ("cuda:1", "3", "cuda:1"),
    ("cpu", "3", "cpu")])
def test_resolve_device_maps_cuda_to_the_local_rank(device, local_rank, expected, monkeypatch):
    from lalmtool.parallel import resolve_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert resolve_device(device) == expected


def test_batch_size_is_windows_per_forward(tiny_whisper, tmp_path, monkeypatch):
    from lalmtool.models.whisper import WhisperBackend

    rows = []
    for i in range(10):
        sf.write(tmp_path / f"s{i}.wav", tone(0.5, seed=i), 16000)
        rows.append({"id": f"s{i}", "audio": f"s{i}.wav", "text": "x"})
    sf.write(tmp_path / "long.wav", tone(65.0), 16000)  # three windows
    short = write_manifest(tmp_path / "short.jsonl", rows)
    long = write_manifest(tmp_path / "long.jsonl", [{"id": "l", "audio": "long.wav", "text": "x"}])
    sizes, real = [], WhisperBackend._encode_windows

    def counted(self, pieces):
        sizes.append(len(pieces))
        return real(self, pieces)

    monkeypatch.setattr(WhisperBackend, "_encode_windows", counted)
    extract(short, tiny_whisper, str(tmp_path / "a"), batch_size=10)
    assert sizes == [10]
    sizes.clear()
    extract(long, tiny_whisper, str(tmp_path / "b"), batch_size=1)
    assert sizes == [1, 1, 1]


def test_finished_rerun_loads_no_model(tiny_whisper, audio_set, tmp_path, monkeypatch):
    out = str(tmp_path / "feats")
    assert extract(audio_set, tiny_whisper, out, shard_size=2)["utterances"] == 5
    monkeypatch.setattr("lalmtool.extract.load_backend", _no_model_here)
    s = extract(audio_set, tiny_whisper, out, shard_size=2)
    assert (s["utterances"], s["frames"], s["skipped"]) == (0, 0, 0)
    assert s["reused"]  # nothing was encoded (a timing would be a speed test)
    os.remove(os.path.join(out, "feats.00001.h5"))  # unfinished: the model is needed again
    with pytest.raises(AssertionError, match="must not load a model"):
        extract(audio_set, tiny_whisper, out, shard_size=2)


def test_workers_die_with_a_killed_parent(tmp_path):
    """FAULTS #11: kill -9 of an `extract --nj 2` parent must not leave its workers running."""
    import signal
    import subprocess
    import sys
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    (tmp_path / "slow_worker.py").write_text(
        "import os, time\n"
        "def factory():\n"
        "    return work\n"
        "def work(name, ids, tick):\n"
        f"    open(os.path.join({str(tmp_path)!r}, 'pid.%d' % os.getpid()), 'w').close()\n"
        "    time.sleep(600)\n")
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from slow_worker import factory\n"
        "from lalmtool.parallel import run_sharded\n"
        f"run_sharded({str(tmp_path / 'store')!r}, 'feats', 'fp', {{}},\n"
        "            {'a.h5': ['a'], 'b.h5': ['b']}, factory, nj=2)\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tmp_path.glob("pid.*"))) < 2:
        assert parent.poll() is None, "the parent ended early"
        time.sleep(0.1)
    workers = sorted(int(p.suffix[1:]) for p in tmp_path.glob("pid.*"))
    assert len(workers) == 2
    parent.send_signal(signal.SIGKILL)
    parent.wait()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in workers):
        time.sleep(0.1)
    still = [p for p in workers if alive(p)]
    for p in still:
        os.kill(p, signal.SIGKILL)
    assert still == []


def test_failing_worker_ends_the_run_and_keeps_finished_shards(tmp_path, monkeypatch):
    import multiprocessing

    from lalmtool.parallel import run_sharded

    (tmp_path / "flaky_worker.py").write_text(
        "import time\n"
        "import numpy as np\n"
        "from lalmtool.store import ShardResult\n"
        "def factory():\n"
        "    return work\n"
        "def work(name, ids, tick):\n"
        "    if name == 'b.h5':\n"
        "        raise ValueError('shard b failed')\n"
        "    time.sleep(1.0)\n"
        "    return ShardResult(items=[(ids[0], np.zeros((2, 3), np.float16), {})]), {'n': 1}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from flaky_worker import factory

    out = str(tmp_path / "store")
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="shard b failed"):
        run_sharded(out, "feats", "fp", {}, {"a.h5": ["a"], "b.h5": ["b"], "c.h5": ["c"]},
                    factory, nj=2)
    assert set(multiprocessing.active_children()) - before == set()  # its workers are gone
    done = sorted(f for f in os.listdir(out) if f.endswith(".h5"))
    assert done in (["a.h5"], ["a.h5", "c.h5"])  # c may have been queued to a worker already


def test_cuda_out_of_memory_says_what_to_lower(tiny_whisper, audio_set, tmp_path, monkeypatch,
                                               caplog):
    import logging

    import torch
    from click.testing import CliRunner

    from lalmtool.cli import main
    from lalmtool.models.whisper import WhisperBackend

    def oom(self, pieces):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(WhisperBackend, "_encode_windows", oom)
    caplog.set_level(logging.DEBUG, logger="lalmtool")
    res = CliRunner().invoke(main, ["-v", "extract", "--manifest", audio_set, "--model",
                                    tiny_whisper, "--out", str(tmp_path / "f"),
                                    "--batch-size", "3"])
    assert res.exit_code == 1
    assert ("out of memory while encoding shard feats.00000.h5. Lower --batch-size (now 3 "
            "windows per forward) or --nj") in res.output
    assert "Traceback" not in res.output
    logged = [r for r in caplog.records if r.exc_info]
    assert [type(r.exc_info[1].__cause__) for r in logged] == [torch.OutOfMemoryError]


@pytest.mark.parametrize("args,code,message", [
    (["--backend-opt", "foo=1"], 1,
     "backend 'whisper' has no option foo (from --backend-opt); it takes dtype, language"),
    (["--nj", "0"], 2, "0 is not in the range x>=1"),
    (["--nj", "-3"], 2, "-3 is not in the range x>=1"),
    (["--batch-size", "0"], 2, "0 is not in the range x>=1"),
    (["--model", "/nonexistent"], 1, "--model /nonexistent: no such directory"),
    (["--model", "{manifest}"], 1, "is a file, not a model"),
    (["--manifest", "{dir}"], 2, "is a directory"),
    (["--out", "{manifest}"], 2, "is a file"),
])
def test_extract_bad_values_give_one_clear_line(args, code, message, tiny_whisper, audio_set,
                                                tmp_path):
    from click.testing import CliRunner

    from lalmtool.cli import main

    opts = {"--manifest": audio_set, "--model": tiny_whisper, "--out": str(tmp_path / "f")}
    names = {"manifest": audio_set, "dir": str(tmp_path)}
    extra = [a.format(**names) for a in args]
    for i in range(0, len(extra) - 1, 2):
        opts.pop(extra[i], None)
    cmd = ["extract"] + [x for kv in opts.items() for x in kv] + extra
    res = CliRunner().invoke(main, cmd)
    assert res.exit_code == code, res.output
    assert message in " ".join(res.output.split()), res.output
    assert not isinstance(res.exception, (TypeError, OSError, AssertionError))
    assert not os.path.exists(tmp_path / "f")


def test_ranks_wait_for_slow_ranks_longer_than_the_gloo_default(monkeypatch):
    import datetime

    import torch.distributed as dist

    from lalmtool.parallel import barrier

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    barrier(2)
    assert calls == [(("gloo",), {"timeout": datetime.timedelta(hours=24)}), "barrier"]


def test_a_model_that_does_not_load_in_workers_is_one_clear_error(audio_set, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"--model .*empty-model: cannot load it with the "
                                         r"whisper backend"):
        extract(audio_set, str(empty), str(tmp_path / "f"), nj=2)


@pytest.mark.parametrize("stage", ["segment", "pool"])
def test_nj_below_one_is_refused_by_every_stage(stage, tmp_path):
    from click.testing import CliRunner

    from lalmtool.cli import main

    args = {"segment": ["--method", "peaks"], "pool": ["--segments", str(tmp_path / "s")]}
    res = CliRunner().invoke(main, [stage, "--nj", "0", "--feats", str(tmp_path / "f"),
                                    "--out", str(tmp_path / "o")] + args[stage])
    assert res.exit_code == 2
    assert "Invalid value for '--nj': 0 is not in the range x>=1." in res.output
