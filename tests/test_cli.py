"""Tests of the command line's own presentation (tables, messages)."""
from click.testing import CliRunner

from lalmtool.cli import _fmt, main


def test_table_cells_say_yes_no_and_round_floats():
    assert [_fmt(True), _fmt(False), _fmt(0.123456789), _fmt(None), _fmt(3)] == \
        ["yes", "no", "0.1235", "", "3"]


def test_assets_list_says_yes_or_no(monkeypatch):
    import lalmtool.assets as assets

    monkeypatch.setattr(assets, "list_assets", lambda: [
        {"name": "a", "fetched": True, "path": "/p/a", "description": "A"},
        {"name": "b", "fetched": False, "path": "/p/b", "description": "B"}])
    out = CliRunner().invoke(main, ["assets", "list"]).output.splitlines()
    assert [line.split()[:2] for line in out] == [["name", "fetched"], ["a", "yes"], ["b", "no"]]


def test_verbose_after_the_subcommand_opens_only_lalmtool_debug_lines(tmp_path):
    import logging

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "audio": "/nonexistent.wav", "duration": 1.0, "text": "x"}\n')
    for args in (["manifest", "validate", str(manifest), "-v"], ["-v", "manifest", "validate", str(manifest)]):
        logging.getLogger("lalmtool").setLevel(logging.NOTSET)
        CliRunner().invoke(main, args)
        assert logging.getLogger("lalmtool").level == logging.DEBUG, args
        assert logging.getLogger("matplotlib").getEffectiveLevel() >= logging.INFO
    CliRunner().invoke(main, ["manifest", "validate", str(manifest)])
    assert logging.getLogger("lalmtool").level == logging.INFO


def test_score_choices_come_from_the_registries(monkeypatch):
    from lalmtool import score

    params = {p.name: p for p in main.commands["score"].params}
    assert tuple(params["normalizer"].type.choices) == score.NORMALIZERS
    assert tuple(params["metric"].type.choices) == score.METRICS


def test_backend_method_and_reducer_choices_match_the_registries():
    from lalmtool import pool, segment
    from lalmtool.models import BACKENDS

    def choices(command, param):
        return sorted(next(p for p in main.commands[command].params if p.name == param).type.choices)

    assert choices("extract", "backend") == choices("decode", "backend") == sorted(BACKENDS)
    assert choices("segment", "method") == sorted(segment.METHODS)
    assert choices("pool", "reduce") == sorted(pool.REDUCERS)


def test_unknown_backend_is_refused_before_anything_runs(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text("")
    r = CliRunner().invoke(main, ["extract", "--manifest", str(m), "--model", "x",
                                  "--out", str(tmp_path / "o"), "--backend", "wisper"])
    assert r.exit_code == 2 and "'wisper' is not one of 'audio-llm', 'audioflamingo3', " \
        "'glm-asr', 'granite-speech', 'qwen2-audio', 'qwen2-audio-chat', 'qwen2.5-omni', " \
        "'qwen3-asr', 'speechllm', 'voxtral', 'whisper'" in r.output
    assert not (tmp_path / "o").exists()


def test_decode_dtype_reaches_the_backend_and_a_contradiction_is_refused(tmp_path, monkeypatch):
    import lalmtool.decode

    seen = {}
    monkeypatch.setattr(lalmtool.decode, "decode",
                        lambda *a, **kw: seen.update(kw["backend_opts"] or {}) or {})
    base = ["decode", "--feats", str(tmp_path), "--model", "m", "--out", str(tmp_path / "o"),
            "--backend", "qwen2-audio"]
    r = CliRunner().invoke(main, base + ["--dtype", "bfloat16", "--backend-opt", "task=translate"])
    assert r.exit_code == 0, r.output
    assert seen == {"dtype": "bfloat16", "task": "translate"}
    r = CliRunner().invoke(main, base + ["--dtype", "bfloat16", "--backend-opt", "dtype=float32"])
    assert r.exit_code == 2 and "--dtype bfloat16 and --backend-opt dtype=float32 disagree" in r.output
