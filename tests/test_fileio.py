"""Tests of lalmtool.fileio: atomic writes, the one JSON Lines reader, weight digests."""
import hashlib
import json
import os

import pytest

from lalmtool import fileio
from lalmtool.fileio import atomic_dir, atomic_path, iter_jsonl, restore_dir, write_atomic


def test_iter_jsonl_yields_records_and_named_problems(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"id": "a"}\r\n\n[1, 2]\n{bad\n\xff\xfe\n{"id": "b", "x": 1}\n')
    assert list(iter_jsonl(str(p))) == [
        (1, {"id": "a"}, None),
        (3, None, "must be a JSON object, got list"),
        (4, None, "not valid JSON (Expecting property name enclosed in double quotes)"),
        (5, None, "not valid UTF-8 (invalid start byte at byte 0)"),
        (6, {"id": "b", "x": 1}, None),
    ]


def test_write_atomic_text_and_bytes(tmp_path):
    write_atomic(str(tmp_path / "d" / "t.txt"), "é\n")
    write_atomic(str(tmp_path / "b.bin"), b"\x00\x01")
    assert (tmp_path / "d" / "t.txt").read_bytes() == "é\n".encode()
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="renderer"):
        with atomic_path(str(target)) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("renderer failed")
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["plot.png"]


def test_an_os_error_names_the_file_not_its_temporary(tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        if os.access(tmp_path / "ro", os.W_OK):  # root ignores the mode
            pytest.skip("directory permissions are not enforced for this user")
        with pytest.raises(OSError) as e:
            write_atomic(str(tmp_path / "ro" / "x.json"), "{}")
        assert e.value.filename == str(tmp_path / "ro" / "x.json")
    finally:
        os.chmod(tmp_path / "ro", 0o700)


def _model(path, content: bytes) -> str:
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(content)
    return str(path)


def test_weights_digest_is_cached_beside_the_assets_not_in_a_read_only_model(tmp_path,
                                                                            monkeypatch):
    from lalmtool import fileio

    monkeypatch.setenv("LALMTOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fileio, "RACY_NS", 0)
    model = _model(tmp_path / "m", b"w" * 1000)
    weights = os.path.join(model, "model.safetensors")
    os.chmod(weights, 0o444)
    os.chmod(model, 0o555)
    try:
        ident = fileio.model_identity(model)
        st = os.stat(weights)
        sha = hashlib.sha256(b"w" * 1000).hexdigest()
        assert json.loads((tmp_path / "cache" / "weights-sha256.json").read_text()) == {
            os.path.realpath(weights): [st.st_ino, 1000, st.st_mtime_ns, st.st_ctime_ns, sha]}
        monkeypatch.setattr(fileio, "file_sha256", lambda p: pytest.fail(f"{p} read again"))
        assert fileio.model_identity(model) == ident
        assert sorted(os.listdir(model)) == ["config.json", "model.safetensors"]
    finally:
        os.chmod(model, 0o755)


def test_weights_changed_just_before_hashing_are_not_cached(tmp_path, monkeypatch):
    from lalmtool import fileio

    monkeypatch.setenv("LALMTOOL_CACHE", str(tmp_path / "cache"))
    model = _model(tmp_path / "m", b"w" * 1000)  # modified now: within RACY_NS (2 s)
    fileio.model_identity(model)
    assert not (tmp_path / "cache" / "weights-sha256.json").exists()


def test_an_unwritable_weights_cache_is_a_warning_and_rehashing(tmp_path, monkeypatch, caplog):
    from lalmtool import fileio

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LALMTOOL_CACHE", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(fileio, "RACY_NS", 0)
    model = _model(tmp_path / "m", b"w" * 1000)
    with caplog.at_level("WARNING", logger="lalmtool"):
        assert fileio.weights_sha256(os.path.join(model, "model.safetensors")) == (
            hashlib.sha256(b"w" * 1000).hexdigest())
    assert caplog.messages == [
        f"cannot cache the sha256 of {os.path.realpath(model)}/model.safetensors in "
        f"{tmp_path}/file/cache/weights-sha256.json ([Errno 20] Not a directory: "
        f"'{tmp_path}/file/cache'): weights are hashed again on every run; set LALMTOOL_CACHE "
        "to a writable folder"]


def _tree(path) -> dict:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def test_atomic_dir_replaces_a_directory_whole_or_not_at_all(tmp_path):
    out = tmp_path / "adapter"
    with atomic_dir(str(out)) as tmp:
        (tmp_path / "adapter.tmp" / "w").write_text("old")
        assert tmp == str(tmp_path / "adapter.tmp")
    assert _tree(out) == {"w": "old"}
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_dir(str(out)) as tmp:
            open(os.path.join(tmp, "w"), "w").write("half")
            raise RuntimeError("killed")
    assert _tree(out) == {"w": "old"}  # the failed write left the old directory as it was
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    with atomic_dir(str(out)) as tmp:
        open(os.path.join(tmp, "x"), "w").write("new")
    assert _tree(out) == {"x": "new"} and sorted(os.listdir(tmp_path)) == ["adapter"]


def test_a_kill_between_the_renames_loses_neither_directory(tmp_path, monkeypatch):
    """The old way (remove the old directory, then rename the new one in) lost the old one
    when killed in between; now it waits beside as ``.old`` and comes back."""
    out = tmp_path / "best"
    out.mkdir()
    (out / "w").write_text("old")
    real, calls = os.replace, []

    def killed_at_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", killed_at_second)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(str(out)) as tmp:
            open(os.path.join(tmp, "w"), "w").write("new")
    monkeypatch.setattr(fileio.os, "replace", real)
    assert not out.exists() and _tree(tmp_path / "best.old") == {"w": "old"}
    restore_dir(str(out))
    assert _tree(out) == {"w": "old"} and not (tmp_path / "best.old").exists()
