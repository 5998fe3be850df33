"""Each backend's options as one typed dataclass (lalmtool.options.Options): declared with
default, help and allowed values, checked by one rule on every command, listed by
`lalmtool backends`, and recorded whole in the stores extract writes."""
import dataclasses
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from lalmtool.cli import main
from lalmtool.models import backend_default, backend_options, check_backend_options, check_tap
from lalmtool.store import StoreMeta


def test_each_backend_declares_its_options_with_defaults():
    assert backend_options("whisper").defaults() == {
        "dtype": "float32", "trim": True, "language": "en", "task": "transcribe",
        "positions": "window"}
    qwen = backend_options("qwen2-audio").defaults()
    assert (qwen["tap"], qwen["task"], qwen["prompt_style"], qwen["dtype"]) == (
        "pooled", "transcribe", "auto", None)
    assert backend_default("qwen2-audio", "tap") == "pooled"
    assert backend_default("whisper", "tap") is None  # whisper has no tap
    assert [f.name for f in dataclasses.fields(backend_options("speechllm"))] == [
        "dtype", "encoder", "projector", "stack", "hidden", "prompt", "seed", "train_projector",
        "trim", "llm", "norm", "init_projector", "compile"]


@pytest.mark.parametrize("name,opts,message", [
    ("whisper", {"positions": "absolute"},
     "whisper backend option positions must be one of window, global, not 'absolute' (from X)"),
    ("whisper", {"trim": "yes"}, "whisper backend option trim must be true or false, not 'yes' "
                                 "(from X)"),
    ("qwen2-audio", {"task": "translate"}, "task 'translate' needs target_language (e.g. 'de') "
                                           "or an instruction (from X)"),
    ("qwen2-audio", {"tap": "middle"}, "qwen2-audio backend option tap must be one of pooled, "
                                       "prepool, not 'middle' (from X)"),
    ("speechllm", {"stack": 0}, "speechllm backend option stack must be >= 1, not 0 (from X)"),
    ("speechllm", {"stacks": 2}, "backend 'speechllm' has no option stacks (from X); it takes "
                                 "compile, dtype, encoder, hidden, init_projector, llm, norm, "
                                 "projector, prompt, seed, stack, train_projector, trim"),
])
def test_one_rule_checks_names_types_and_values(name, opts, message):
    with pytest.raises(ValueError) as e:
        check_backend_options(name, opts, "from X")
    assert str(e.value) == message
    check_backend_options(name, {}, "from X")  # the defaults are valid


def test_lalmtool_backends_lists_each_option():
    r = CliRunner().invoke(main, ["backends", "qwen2-audio"])
    assert r.exit_code == 0, r.output
    tap = next(line.split(None, 4) for line in r.output.splitlines()
               if line.startswith("qwen2-audio  tap "))
    assert tap[:4] == ["qwen2-audio", "tap", "pooled", "pooled,"]
    assert len([l for l in r.output.splitlines()[1:] if l.strip()]) == len(
        backend_options("qwen2-audio").defaults())


def test_extract_records_every_backend_option_and_the_tap_check_reads_them(audio_set,
                                                                           tiny_whisper,
                                                                           tmp_path):
    from lalmtool.extract import extract
    from lalmtool.store import Store

    extract(audio_set, tiny_whisper, str(tmp_path / "f"),
            backend_opts={"positions": "global"})
    meta = Store(str(tmp_path / "f")).meta
    assert meta["backend_options"] == {"dtype": "float32", "trim": True, "language": "en",
                                       "task": "transcribe", "positions": "global"}
    store = SimpleNamespace(path="P", meta=StoreMeta({"stage": "pool", "source_meta": {
        "backend": "qwen2-audio", "backend_options": {"tap": "prepool"}}}))
    with pytest.raises(ValueError, match=r"^tap mismatch: store 'prepool', decode 'pooled' "
                                         r"\(P\); fix it$"):
        check_tap(store, "qwen2-audio", {"decode": None}, "fix it")
    check_tap(store, "qwen2-audio", {"decode": "prepool"}, "fix it")
