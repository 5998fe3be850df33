"""Nothing lost, nothing stale: kills, damaged shards, concurrent runs, full and read-only disks,
fuzzed manifests and audio. Every case ends in a complete store, a specific one-line error, or
a reported skip; never a traceback."""
from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from lalmtool.cli import main

from conftest import tone, write_frames_store

N_UTTS, PER_SHARD = 8, 2


def feats_store(path, n=N_UTTS, dim=16, frames=60) -> str:
    rng = np.random.default_rng(0)
    write_frames_store(path, {f"u{i}": (rng.standard_normal((frames + 7 * i, dim)).astype(
        np.float16), {"duration": (frames + 7 * i) / 50.0}) for i in range(n)},
        shard_size=PER_SHARD)
    return str(path)


def read_all(path) -> dict:
    """Every dataset (dtype, shape, bytes, attrs) and every shard's attributes, by file."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".h5"):
            with h5py.File(os.path.join(path, name), "r") as f:
                out[name] = {"attrs": dict(f.attrs), **{
                    u: (str(f[u].dtype), f[u].shape, f[u][()].tobytes(), dict(f[u].attrs))
                    for u in f}}
    with open(os.path.join(path, "skipped.jsonl")) as fh:
        out["skipped.jsonl"] = fh.read()
    return out


def cli(*args) -> tuple[int, str]:
    """(exit code, output), the output from the error line on when there is one (progress bars
    go to the same stream)."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
    return r.exit_code, r.output[r.output.find("Error: "):] if r.exit_code else r.output


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A feature store and the reference (uninterrupted) segment and pool stores made from it."""
    d = tmp_path_factory.mktemp("ref")
    feats = feats_store(d / "feats")
    assert cli("segment", "--feats", feats, "--method", "peaks", "--out", d / "seg")[0] == 0
    assert cli("pool", "--feats", feats, "--segments", d / "seg", "--out", d / "pooled")[0] == 0
    return {"feats": feats, "seg": str(d / "seg"), "pooled": str(d / "pooled")}


def stage_args(stage: str, stores: dict, out) -> list[str]:
    if stage == "segment":
        return ["segment", "--feats", stores["feats"], "--method", "peaks", "--out", str(out)]
    return ["pool", "--feats", stores["feats"], "--segments", stores["seg"], "--out", str(out)]


@pytest.mark.parametrize("stage", ["segment", "pool"])
def test_rerun_of_a_finished_stage_says_so_and_reads_no_shard(stores, tmp_path, stage,
                                                             monkeypatch):
    from lalmtool import store

    out = tmp_path / "out"
    code, text = cli(*stage_args(stage, stores, out))
    assert code == 0 and "utterances  frames  tokens" in text
    monkeypatch.setattr(store, "shard_problem", lambda *a: pytest.fail("a shard was read again"))
    assert cli(*stage_args(stage, stores, out)) == (
        0, f"{out}: complete for these inputs and settings, nothing to do\n")


# -- SIGKILL at several points, then rerun = an uninterrupted run ------------------------------
KILL = textwrap.dedent("""
    import os, signal, sys
    from lalmtool import store
    point, n = sys.argv[1], int(sys.argv[2])
    calls = {"shard": 0, "ds": 0, "rename": 0}
    write_shard, create_dataset, write_atomic = (store.StoreWriter.write_shard,
                                                 store._create_dataset, store.write_atomic)
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    def shard(self, name, result):
        calls["shard"] += 1
        if point == "before-shard" and calls["shard"] == n:
            die()
        if point == "hold":
            print("holding", flush=True)
            while not os.path.exists(sys.argv[3]):
                pass
        return write_shard(self, name, result)
    def dataset(f, utt, arr):
        calls["ds"] += 1
        if point == "mid-shard" and calls["ds"] == n:
            die()
        return create_dataset(f, utt, arr)
    replace = os.replace
    def rename(src, dst):
        if point == "before-rename" and dst.endswith(".h5"):
            calls["rename"] += 1
            if calls["rename"] == n:
                die()
        return replace(src, dst)
    os.replace = rename
    def atomic(path, text):
        if point == "finish" and path.endswith("skipped.jsonl"):
            die()
        return write_atomic(path, text)
    store.StoreWriter.write_shard, store._create_dataset, store.write_atomic = shard, dataset, atomic
    from lalmtool.cli import main
    main(sys.argv[4:], prog_name="lalmtool")
""")
KILL_POINTS = [("segment", "before-shard", 1), ("segment", "mid-shard", 6),
               ("segment", "before-rename", 2), ("segment", "finish", 0),
               ("pool", "before-shard", 3), ("pool", "before-rename", 1)]


def run_killable(point: str, n: int, args: list[str], go: str = "-", **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", KILL, point, str(n), go, *args],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


@pytest.mark.parametrize("stage,point,n", KILL_POINTS)
def test_sigkill_then_rerun_equals_an_uninterrupted_run(stores, tmp_path, stage, point, n):
    out = tmp_path / "out"
    p = run_killable(point, n, stage_args(stage, stores, out), stderr=subprocess.DEVNULL)
    assert p.wait(timeout=120) == -signal.SIGKILL
    assert (out / "store.json").exists() and (out / ".lock").exists()  # left by the killed run
    assert len(list(out.glob("*.h5.tmp.*"))) == (point == "before-rename")  # a whole .tmp
    assert cli(*stage_args(stage, stores, out))[0] == 0
    assert read_all(out) == read_all(stores["seg" if stage == "segment" else "pooled"])
    assert sorted(os.listdir(out)) == sorted(os.listdir(stores["seg" if stage == "segment"
                                                               else "pooled"]))


# -- damaged shards: detected, named, redone by the stage's rerun ------------------------------
def _flip(file: str) -> None:
    with h5py.File(file, "r") as f:
        utt = sorted(f)[0]
        offset = f[utt].id.get_chunk_info(0).byte_offset
    with open(file, "r+b") as fh:
        fh.seek(offset + 1)
        b = fh.read(1)
        fh.seek(offset + 1)
        fh.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
@pytest.mark.parametrize("stage", ["segment", "pool"])
def test_damaged_shard_detected_and_redone(stores, tmp_path, stage, damage):
    out = tmp_path / "out"
    assert cli(*stage_args(stage, stores, out))[0] == 0
    shard = sorted(out.glob("*.00001.h5"))[0]
    if damage == "truncate":
        os.truncate(shard, os.path.getsize(shard) - 100)
    else:
        _flip(str(shard))
    code, text = cli("info", "--verify", out)
    assert code == 1
    assert text.startswith(f"Error: {out}: 1 of 4 shard(s) fail verification:\n  {shard} is "
                           "damaged (")
    assert text.endswith(f"Rerun `lalmtool {stage}` with the same options and --out to redo them.\n")
    assert cli(*stage_args(stage, stores, out))[0] == 0  # the rerun redoes that shard only
    assert read_all(out) == read_all(stores["seg" if stage == "segment" else "pooled"])
    code, text = cli("info", "--verify", out)
    assert code == 0


def test_damaged_input_store_stops_the_next_stage_naming_the_shard(stores, tmp_path):
    import shutil

    feats = shutil.copytree(stores["feats"], tmp_path / "feats")
    _flip(str(feats / "feats.00002.h5"))
    code, text = cli("segment", "--feats", feats, "--method", "peaks", "--out", tmp_path / "seg")
    assert code == 1
    assert text.startswith(f"Error: {feats / 'feats.00002.h5'} is damaged (utterance 'u4'): OSError")
    assert text.endswith(f"rerun `lalmtool extract` with the same --out ({feats}) to redo it\n")


# -- two concurrent runs into one --out -------------------------------------------------------
def test_shard_replaced_by_a_copy_of_another_is_refused_by_every_reader(stores, tmp_path):
    """R1: a shard holding another shard's utterances (same fingerprint, valid checksums) is
    not whole: segment, pool and decode (all through Store) stop naming it."""
    import shutil

    from lalmtool.store import Store, StoreError

    feats = shutil.copytree(stores["feats"], tmp_path / "feats")
    shutil.copyfile(feats / "feats.00000.h5", feats / "feats.00001.h5")
    want = (f"{feats / 'feats.00001.h5'} holds other utterances than store.json plans for it "
            "(missing ['u2', 'u3'], unplanned ['u0', 'u1']); rerun `lalmtool extract` with the "
            f"same --out ({feats}) to redo it")
    with pytest.raises(StoreError) as e:
        Store(str(feats))
    assert str(e.value) == want
    assert cli("segment", "--feats", feats, "--method", "peaks", "--out", tmp_path / "seg") == (
        1, f"Error: {want}\n")
    assert not (tmp_path / "seg").exists()
    assert cli("decode", "--feats", feats, "--model", tmp_path / "no-model", "--out",
               tmp_path / "dec") == (1, f"Error: {want}\n")  # before the model is looked at
    seg = shutil.copytree(stores["seg"], tmp_path / "seg2")
    shutil.copyfile(seg / "seg.00002.h5", seg / "seg.00003.h5")
    code, text = cli("pool", "--feats", stores["feats"], "--segments", seg, "--out",
                     tmp_path / "pooled")
    assert (code, text) == (1, f"Error: {seg / 'seg.00003.h5'} holds other utterances than "
                            "store.json plans for it (missing ['u6', 'u7'], unplanned ['u4', "
                            f"'u5']); rerun `lalmtool segment` with the same --out ({seg}) to "
                            "redo it\n")


@pytest.mark.parametrize("stage", ["segment", "pool"])
def test_second_concurrent_run_is_refused_and_the_first_completes(stores, tmp_path, stage):
    out, go = tmp_path / "out", tmp_path / "go"
    p = run_killable("hold", 0, stage_args(stage, stores, out), go=str(go),
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert p.stdout.readline().strip() == "holding"
        for extra in ([], ["--force"]):  # with --force too: the lock comes first
            code, text = cli(*stage_args(stage, stores, out), *extra)
            assert code == 1
            assert text.startswith(f"Error: {out} is being written by pid {p.pid} on host ")
        go.touch()
        assert p.wait(timeout=120) == 0
    finally:
        p.kill()
        p.wait()
    assert read_all(out) == read_all(stores["seg" if stage == "segment" else "pooled"])


# -- full and read-only disks -------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path, size: str):
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                            str(path)], capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_full_disk_is_one_error_and_the_rerun_completes(tmp_path):
    big = {"feats": feats_store(tmp_path / "feats", dim=512, frames=200)}
    assert cli("segment", "--feats", big["feats"], "--method", "uniform", "--k", "1",
               "--out", tmp_path / "seg")[0] == 0
    big["seg"] = str(tmp_path / "seg")
    assert cli(*stage_args("pool", big, tmp_path / "ref"))[0] == 0
    with tmpfs(tmp_path / "disk", "800k") as disk:
        out = disk / "pooled"
        code, text = cli(*stage_args("pool", big, out))
        assert code == 1
        assert text.count("\n") == 1 and "Traceback" not in text
        assert text.startswith(f"Error: cannot write {out}/pooled.0000")
        assert "No space left on device" in text and "then rerun: finished shards are kept" in text
        assert list(out.glob("*.tmp*")) == [] and not (out / ".lock").exists()
        kept = sorted(p.name for p in out.glob("*.h5"))
        assert 0 < len(kept) < 4
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        assert cli(*stage_args("pool", big, out))[0] == 0
        assert read_all(out) == read_all(tmp_path / "ref")


def test_read_only_out_is_one_error(stores, tmp_path):
    with tmpfs(tmp_path / "ro", "1m") as ro:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        for stage in ("segment", "pool"):
            code, text = cli(*stage_args(stage, stores, ro / "out"))
            assert (code, text) == (1, f"Error: cannot write {ro / 'out'}: Read-only file system; "
                                       "choose a writable --out (or fix its permissions)\n")


def test_unwritable_out_without_root(stores, tmp_path, monkeypatch):
    import errno

    def refuse(path, *a, **k):
        raise OSError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "makedirs", refuse)
    code, text = cli(*stage_args("segment", stores, tmp_path / "x"))
    assert (code, text) == (1, f"Error: cannot write {tmp_path / 'x'}: Permission denied; "
                               "choose a writable --out (or fix its permissions)\n")


@pytest.mark.parametrize("stage", ["segment", "pool"])
def test_wrong_paths_are_one_line(stores, tmp_path, stage):
    (tmp_path / "a.jsonl").write_text("{}\n")
    code, text = cli(*stage_args(stage, stores, tmp_path / "a.jsonl"))
    assert (code, text) == (1, f"Error: --out {tmp_path / 'a.jsonl'} is a file; give a directory "
                               "for the store\n")
    snapshot = {k: read_all(stores[k]) for k in ("feats", "seg")}
    for inp in ("feats", "seg") if stage == "pool" else ("feats",):
        for extra in ([], ["--force"]):
            code, text = cli(*stage_args(stage, stores, stores[inp]), *extra)
            assert (code, text) == (1, f"Error: --out {stores[inp]} is the input store "
                                       f"{stores[inp]}; give another directory\n")
    assert {k: read_all(stores[k]) for k in ("feats", "seg")} == snapshot  # untouched
    args = stage_args(stage, stores, tmp_path / "out")
    args[args.index("--feats") + 1] = str(tmp_path / "a.jsonl")
    code, text = cli(*args)
    assert (code, text) == (1, f"Error: {tmp_path / 'a.jsonl'} is a file, not a store directory\n")
    args[args.index("--feats") + 1] = str(tmp_path / "nowhere")
    code, text = cli(*args)
    assert (code, text) == (1, f"Error: {tmp_path / 'nowhere'} is not a lalmtool store (no "
                               "store.json); make it with `lalmtool extract`, `segment` or "
                               "`pool`.\n")


# -- fuzzed manifests and audio -------------------------------------------------------------------
def _wav(d, name, data, sr=16000, **kw):
    sf.write(d / name, data, sr, **kw)
    return name


AUDIO = {  # name -> (make the file in d, expected problem (substring) or None if usable)
    "random bytes": (lambda d: (d.joinpath("r.wav").write_bytes(os.urandom(3000)), "r.wav")[1],
                     "unreadable audio"),
    "random bytes .flac": (lambda d: (d.joinpath("r.flac").write_bytes(os.urandom(3000)),
                                      "r.flac")[1], "unreadable audio"),
    "wrong header": (lambda d: (d.joinpath("h.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt "
                                                                + os.urandom(40)), "h.wav")[1],
                     "unreadable audio"),
    "mp3 named .wav": (lambda d: _wav(d, "m.wav", tone(0.5), format="MP3"), None),
    "0 samples": (lambda d: _wav(d, "z.wav", np.zeros(0, np.float32)), "zero-length audio"),
    "truncated wav": (lambda d: (_wav(d, "t.wav", tone(1.0), subtype="PCM_16"),
                                 os.truncate(d / "t.wav", 9000), "t.wav")[2], "truncated audio"),
    "directory": (lambda d: (d.joinpath("dir.wav").mkdir(), "dir.wav")[1],
                  "audio path is a directory"),
    "missing": (lambda d: "nowhere.wav", "audio file not found"),
    "6ch 96 kHz": (lambda d: _wav(d, "six.wav", np.stack([tone(0.5, 96000)] * 6, 1), 96000), None),
    "mp3": (lambda d: _wav(d, "a.mp3", tone(0.5)), None),
    "ogg": (lambda d: _wav(d, "a.ogg", tone(0.5)), None),
    "flac": (lambda d: _wav(d, "a.flac", tone(0.5)), None),
}


@pytest.mark.parametrize("case", sorted(AUDIO))
def test_fuzzed_audio_is_a_specific_problem_or_usable(tmp_path, case):
    from lalmtool.audio import load_audio
    from lalmtool.manifest import ManifestError, load_manifest

    make, problem = AUDIO[case]
    audio = make(tmp_path)
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": "x", "audio": audio, "text": "t"}) + "\n")
    if problem:
        with pytest.raises(ManifestError) as e:
            load_manifest(str(m))
        (utt, msg), = e.value.problems
        assert utt == "x" and msg.startswith(f"line 1: {problem}")
        assert load_manifest(str(m), on_error="skip")[1] == [{"id": "x", "error": msg}]
    else:
        (u,), _ = load_manifest(str(m))
        wav = load_audio(u.audio)
        assert wav.dtype == np.float32 and abs(len(wav) / 16000 - 0.5) < 0.06


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_samples_are_bad_input(tmp_path, bad):
    from lalmtool.audio import AudioError, load_audio

    x = tone(0.5)
    x[100] = bad
    _wav(tmp_path, "n.wav", x, subtype="FLOAT")
    with pytest.raises(AudioError, match=f"^audio contains NaN or Inf samples: {tmp_path / 'n.wav'}$"):
        load_audio(str(tmp_path / "n.wav"))


def test_truncated_mp3_is_bad_input(tmp_path):
    from lalmtool.audio import AudioError, load_audio

    _wav(tmp_path, "a.mp3", tone(3.0))
    os.truncate(tmp_path / "a.mp3", os.path.getsize(tmp_path / "a.mp3") * 6 // 10)
    with pytest.raises(AudioError, match=r"^truncated audio .*a\.mp3: its header declares 48000 "
                                         r"samples, \d+ could be read$"):
        load_audio(str(tmp_path / "a.mp3"))


LINES = {  # name -> (manifest bytes, expected problems, utterances kept under skip)
    "non-JSON line": (b'{"id": "a", "audio": "a.wav", "text": "t"}\nnot json\n',
                      [("line 2", "not valid JSON (Expecting value)")], ["a"]),
    "JSON array line": (b'["a", "a.wav"]\n', [("line 1", "must be a JSON object, got list")], []),
    "missing keys": (b'{"id": "a"}\n{"audio": "a.wav"}\n',
                     [("line 1", "missing 'audio'"), ("line 2", "missing 'id'")], []),
    "latin-1 bytes": (b'{"id": "a", "audio": "a.wav", "text": "caf\xe9"}\n',
                      [("line 1", "not valid UTF-8 (invalid continuation byte at byte 42)")], []),
    "BOM and CRLF": (b'\xef\xbb\xbf{"id": "a", "audio": "a.wav", "text": "t"}\r\n', [], ["a"]),
    "unicode id": ('{"id": "\u00e9t\u00e9-\u4e2d\u6587", "audio": "a.wav", "text": "t"}\n'.encode(),
                   [], ["\u00e9t\u00e9-\u4e2d\u6587"]),
    "path-like ids": (b'{"id": "a/b", "audio": "a.wav", "text": "t"}\n'
                      b'{"id": "..", "audio": "a.wav", "text": "t"}\n'
                      b'{"id": "", "audio": "a.wav", "text": "t"}\n',
                      [("'a/b'", "line 1: id unusable as a dataset name: contains a path "
                                 "separator ('/' or '\\')"),
                       ("'..'", "line 2: id unusable as a dataset name: reserved name"),
                       ("''", "line 3: id unusable as a dataset name: empty id")], []),
    "control char id": (b'{"id": "a\\u0007", "audio": "a.wav", "text": "t"}\n',
                        [("'a\\x07'", "line 1: id unusable as a dataset name: contains control "
                                      "characters")], []),
    "NaN duration": (b'{"id": "a", "audio": "a.wav", "text": "t", "duration": NaN}\n',
                     [("a", "line 1: 'duration' must be a finite number of seconds > 0, got nan")],
                     []),
}


@pytest.mark.parametrize("case", sorted(LINES))
def test_fuzzed_manifest_lines(tmp_path, case):
    from lalmtool.manifest import ManifestError, load_manifest

    _wav(tmp_path, "a.wav", tone(0.5))
    raw, problems, kept = LINES[case]
    (tmp_path / "m.jsonl").write_bytes(raw)
    if problems:
        with pytest.raises(ManifestError) as e:
            load_manifest(str(tmp_path / "m.jsonl"))
        assert e.value.problems == problems
    keep, skipped = load_manifest(str(tmp_path / "m.jsonl"), on_error="skip")
    assert [u.id for u in keep] == kept
    assert [(s["id"], s["error"]) for s in skipped] == [
        (ast.literal_eval(p[0]) if p[0].startswith("'") else p[0], p[1]) for p in problems]


@pytest.mark.slow
def test_extract_on_fuzzed_audio_fails_in_one_line_or_skips(tiny_en, tmp_path):
    """Through the CLI with real whisper tiny.en: one line per failure, a skip list under skip."""
    rows = [{"id": "good", "audio": _wav(tmp_path, "g.wav", tone(0.6)), "text": "t"},
            {"id": "six", "audio": AUDIO["6ch 96 kHz"][0](tmp_path), "text": "t"},
            {"id": "mp3", "audio": AUDIO["mp3"][0](tmp_path), "text": "t"}]
    x = tone(0.5)
    x[7] = np.nan
    bad = [{"id": "nan", "audio": _wav(tmp_path, "n.wav", x, subtype="FLOAT"), "text": "t"},
           {"id": "rand", "audio": AUDIO["random bytes"][0](tmp_path), "text": "t"},
           {"id": "trunc", "audio": AUDIO["truncated wav"][0](tmp_path), "text": "t"},
           {"id": "dur", "audio": "g.wav", "text": "t", "duration": "abc"},
           {"id": "txt", "audio": "g.wav", "text": ["a", "b"]}]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows + bad))
    args = ["extract", "--manifest", m, "--model", tiny_en, "--out", tmp_path / "f"]
    code, text = cli(*args)
    assert code == 1 and "Traceback" not in text
    for utt in ("rand", "trunc", "dur", "txt"):
        assert f"\n  {utt}: line " in text
    code, text = cli(*args, "--on-error", "skip")
    assert code == 0, text
    skipped = [json.loads(line) for line in open(tmp_path / "f" / "skipped.jsonl")]
    assert sorted(s["id"] for s in skipped) == ["dur", "nan", "rand", "trunc", "txt"]
    from lalmtool.store import Store

    st = Store(str(tmp_path / "f"))
    assert sorted(st.ids) == ["good", "mp3", "six"]
    assert st["six"].shape[0] == 25  # 0.5 s at 50 frames/s: 6 channels at 96 kHz, mixed down


# -- stale inputs: an audio file edited in place, same size and mtime --------------------------
def test_audio_identity_sees_a_same_size_same_mtime_edit(tmp_path):
    from lalmtool.audio import audio_identity

    sf.write(tmp_path / "a.wav", tone(1.0), 16000, subtype="PCM_16")
    size, digest = audio_identity(str(tmp_path / "a.wav"))
    st = os.stat(tmp_path / "a.wav")
    with open(tmp_path / "a.wav", "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x01\x02")
    os.utime(tmp_path / "a.wav", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(tmp_path / "a.wav").st_size == size == 32044
    after = audio_identity(str(tmp_path / "a.wav"))
    assert after[0] == size and after[1] != digest and len(after[1]) == 64


def test_extract_rerun_after_a_same_size_edit_refuses_stale_features(tiny_whisper, tmp_path):
    from lalmtool.store import Store

    for i in range(2):
        sf.write(tmp_path / f"{i}.wav", tone(1.0, seed=i), 16000, subtype="PCM_16")
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps({"id": f"u{i}", "audio": f"{i}.wav", "text": "t"}) + "\n"
                         for i in range(2)))
    args = ["extract", "--manifest", m, "--model", tiny_whisper, "--out", tmp_path / "f"]
    assert cli(*args)[0] == 0
    before = Store(str(tmp_path / "f"))["u1"].copy()
    sf.write(tmp_path / "1.wav", tone(1.0, freq=440.0, seed=9), 16000, subtype="PCM_16")
    code, text = cli(*args)
    assert code == 1 and "made with different inputs or settings" in text
    assert cli(*args, "--force")[0] == 0
    assert not np.array_equal(Store(str(tmp_path / "f"))["u1"], before)


# -- stale inputs: model weights edited in place, same size ----------------------------------
def _weights_dir(path, size: int = 3 << 20) -> str:
    path.mkdir()
    (path / "config.json").write_text('{"d_model": 16}')
    (path / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(size))
    return str(path)


def test_model_identity_sees_a_same_size_edit_in_the_middle_of_the_weights(tmp_path,
                                                                           monkeypatch):
    """R2: the weights were identified by their size and first and last MiB."""
    from lalmtool.fileio import model_identity

    monkeypatch.setenv("LALMTOOL_CACHE", str(tmp_path / "cache"))
    model = _weights_dir(tmp_path / "m")
    before = model_identity(model)
    weights = tmp_path / "m" / "model.safetensors"
    st = os.stat(weights)
    with open(weights, "r+b") as fh:  # inside the middle MiB, neither first nor last
        fh.seek(3 << 19)
        b = fh.read(1)
        fh.seek(3 << 19)
        fh.write(bytes([b[0] ^ 0xFF]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # even keeping its mtime
    assert os.path.getsize(weights) == st.st_size
    after = model_identity(model)
    assert after["dir"] == before["dir"] == "m" and after["sha256"] != before["sha256"]
