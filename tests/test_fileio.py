"""Tests of lalmtool.fileio: atomic writes and the one JSON Lines reader."""
import os

import pytest

from lalmtool.fileio import atomic_path, iter_jsonl, write_atomic


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
