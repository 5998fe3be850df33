"""Manifest parsing and validation: every bad entry a specific problem naming line and id."""
from __future__ import annotations

import json
import os

import pytest
import soundfile as sf
from click.testing import CliRunner

from lalmtool.cli import main
from lalmtool.manifest import HINT, ManifestError, load_manifest, read_manifest

from conftest import tone


@pytest.fixture
def wav(tmp_path):
    sf.write(tmp_path / "a.wav", tone(1.0), 16000)
    return "a.wav"


def write_lines(path, lines: list) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


@pytest.mark.parametrize("fields,key,message", [
    ({"text": 123}, "x", "line 2: 'text' must be a string, got 123"),
    ({"text": ["a", "b"]}, "x", "line 2: 'text' must be a string, got a list"),
    ({"target": {"de": "hallo"}}, "x", "line 2: 'target' must be a string, got an object"),
    ({"duration": "abc"}, "x", "line 2: 'duration' must be a number of seconds, got 'abc'"),
    ({"duration": -5}, "x", "line 2: 'duration' must be a finite number of seconds > 0, got -5"),
    ({"duration": 0}, "x", "line 2: 'duration' must be a finite number of seconds > 0, got 0"),
    ({"duration": True}, "x", "line 2: 'duration' must be a number of seconds, got True"),
    ({"audio": None}, "x", "line 2: 'audio' must be a file path, got null"),
    ({"id": None}, "line 2", "'id' must be a string, got null"),
    ({"id": ["x"]}, "line 2", "'id' must be a string, got a list"),
])
def test_bad_field_is_a_specific_problem_and_skip_skips_it(tmp_path, wav, fields, key, message):
    good = {"id": "ok", "audio": wav, "text": "fine"}
    m = write_lines(tmp_path / "m.jsonl", [good, {"id": "x", "audio": wav, "text": "t", **fields}])
    with pytest.raises(ManifestError) as e:
        load_manifest(m)
    assert e.value.problems == [(key, message)]
    assert str(e.value).endswith(f"  {key}: {message}\n{HINT}")
    keep, skipped = load_manifest(m, on_error="skip")
    assert [u.id for u in keep] == ["ok"]
    assert skipped == [{"id": key, "error": message}]


def test_numeric_string_duration_and_integer_id_are_accepted(tmp_path, wav):
    m = write_lines(tmp_path / "m.jsonl", [{"id": 17, "audio": wav, "text": "t", "duration": "1.5"}])
    (u,), skipped = load_manifest(m)
    assert (u.id, u.duration, skipped) == ("17", 1.5, [])


def test_duplicate_under_skip_keeps_the_first_and_reports_the_second(tmp_path, wav):
    m = write_lines(tmp_path / "m.jsonl", [{"id": "a", "audio": wav, "text": "first"},
                                           {"id": "b", "audio": wav, "text": "b"},
                                           {"id": "a", "audio": wav, "text": "second"}])
    keep, skipped = load_manifest(m, on_error="skip")
    assert [(u.id, u.text) for u in keep] == [("a", "first"), ("b", "b")]
    assert skipped == [{"id": "a", "error": "line 3: duplicate id (first on line 1)"}]


def test_skipped_ids_are_plain_strings(tmp_path, wav):
    m = write_lines(tmp_path / "m.jsonl", [{"id": " pad ", "audio": wav, "text": "t"},
                                           {"id": "ok", "audio": wav, "text": "t"}])
    with pytest.raises(ManifestError) as e:
        load_manifest(m)
    assert e.value.problems == [("' pad '", "line 1: id unusable as a dataset name: leading "
                                            "or trailing whitespace")]
    _, skipped = load_manifest(m, on_error="skip")
    assert skipped == [{"id": " pad ", "error": "line 1: id unusable as a dataset name: "
                                                "leading or trailing whitespace"}]


def test_bom_and_crlf_are_read(tmp_path, wav):
    (tmp_path / "m.jsonl").write_bytes(
        b'\xef\xbb\xbf{"id": "a", "audio": "a.wav", "text": "x"}\r\n'
        b'{"id": "b", "audio": "a.wav", "text": "y"}\r\n')
    utts, problems = read_manifest(str(tmp_path / "m.jsonl"))
    assert ([u.id for u in utts], problems) == (["a", "b"], [])


def test_empty_manifest_and_directory_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ManifestError) as e:
        load_manifest(str(tmp_path / "empty.jsonl"), on_error="skip")
    assert str(e.value) == (f"{tmp_path / 'empty.jsonl'}: 1 problem(s):\n  manifest: has no "
                            "utterances (the file is empty)\nGive a manifest with one JSON "
                            "object per line.")
    with pytest.raises(ManifestError, match="manifest: is a directory; give a .jsonl file$"):
        load_manifest(str(tmp_path))


def test_truncated_wav_is_a_problem(tmp_path):
    sf.write(tmp_path / "t.wav", tone(1.0), 16000, subtype="PCM_16")
    with open(tmp_path / "t.wav", "r+b") as fh:
        fh.truncate(20044)
    m = write_lines(tmp_path / "m.jsonl", [{"id": "t", "audio": "t.wav", "text": "x"}])
    with pytest.raises(ManifestError) as e:
        load_manifest(m)
    assert e.value.problems == [("t", f"line 1: truncated audio {tmp_path / 't.wav'}: its header "
                                      "declares 32000 bytes of samples, the file holds 20000")]


def test_validate_command_names_an_option_that_exists(tmp_path, wav):
    m = write_lines(tmp_path / "m.jsonl", [{"id": "a", "audio": wav, "text": 5}])
    r = CliRunner().invoke(main, ["manifest", "validate", m])
    assert r.exit_code == 1
    assert r.output == (f"Error: {m}: 1 problem(s):\n  a: line 1: 'text' must be a string, got 5\n"
                        f"{HINT}\n")
    assert "--on-error" in HINT
    help_text = CliRunner().invoke(main, ["extract", "--help"]).output
    assert "--on-error [fail|skip]" in help_text


def test_from_kaldi_into_an_unwritable_place_is_one_line(tmp_path, wav, monkeypatch):
    import errno

    from lalmtool import fileio

    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "wav.scp").write_text(f"a {tmp_path / wav}\n")
    (tmp_path / "k" / "text").write_text("a hello\n")
    real_open = open

    def full(path, mode="r", *a, **k):
        if "w" in mode and str(path).startswith(str(tmp_path / "out.jsonl")):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(fileio, "open", full, raising=False)
    r = CliRunner().invoke(main, ["manifest", "from-kaldi", str(tmp_path / "k"),
                                  str(tmp_path / "out.jsonl")])
    assert (r.exit_code, r.output) == (1, f"Error: cannot write {tmp_path / 'out.jsonl'}: No "
                                          "space left on device; "
                                          "free some space and rerun (finished work is kept)\n")
    assert sorted(os.listdir(tmp_path)) == ["a.wav", "k"]
