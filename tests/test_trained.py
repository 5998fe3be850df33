"""A trained directory's record, lalmtool.json (``lalmtool.trained``): one file per finetune
adapter, alignment and export, chosen by its kind; directories of the previous release
(backend.json, compression.json, pooler.json, ../summary.json, ../config.yaml) are read from
those files and decode, transcribe, pool and export the same."""
import json

import pytest
import yaml

from lalmtool import trained
from lalmtool.decode import _adapter_condition
from lalmtool.models import check_adapter_base, training_options



# -- what is written -------------------------------------------------------------------------

# -- directories of the previous release ---------------------------------------------------
def test_a_directory_of_the_previous_release_is_read_from_its_files(tmp_path):
    run = tmp_path / "run"
    adapter = run / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "whisper-tiny.en", "r": 4}))
    # the oldest adapters: the options in the finetune run's config.yaml around them
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"backend": "whisper", "extra": {"positions": "global", "chunk": 500}}))
    (run / "summary.json").write_text(json.dumps({"condition": "uniform-mean-k3"}))
    record = trained.read(str(adapter))
    assert record == {"kind": "lora-adapter", "format_version": 0, "backend": "whisper",
                      "backend_options": {"positions": "global", "chunk": 500},
                      "base_model": "whisper-tiny.en", "base_weights": None,
                      "compression": None, "pooler": None,
                      "trained_on": {"condition": "uniform-mean-k3"}}
    assert record.source("backend") == str(run / "config.yaml")
    assert training_options(str(adapter), "whisper") == {"positions": "global"}  # chunk moved
    with pytest.raises(ValueError, match=r"was trained with the whisper backend \(.*/run/"
                                         r"config.yaml\); decode it with --backend whisper"):
        training_options(str(adapter), "qwen2-audio")
    assert _adapter_condition(str(adapter), "frames") == "uniform-mean-k3"
    # backend.json beside the weights comes first; compression.json and pooler.json beside it
    (adapter / "backend.json").write_text(json.dumps(
        {"backend": "whisper", "backend_options": {}, "base_weights": "0" * 64}))
    (adapter / "compression.json").write_text(json.dumps({"condition": "frames", "steps": []}))
    (adapter / "pooler.json").write_text(json.dumps({"dim": 8, "heads": 2, "rank": 0,
                                                     "width": 3}))
    record = trained.read(str(adapter))
    assert (record["backend_options"], record["base_weights"]) == ({}, "0" * 64)
    assert record["compression"]["condition"] == "frames" and record["pooler"]["width"] == 3
    assert record.source("compression") == str(adapter / "compression.json")
    (tmp_path / "base").mkdir()
    with pytest.raises(ValueError, match=r"was trained on another base model than B \(their "
                                         r"weights differ; it names whisper-tiny.en\)"):
        check_adapter_base(str(adapter), "B", str(tmp_path / "base"))


def test_a_record_that_cannot_be_read_is_named(tmp_path):
    assert trained.read(str(tmp_path)) is None and trained.read(None) is None
    with pytest.raises(ValueError, match=r"^--adapter .* is not a lora-adapter directory \(no "
                                         r"lalmtool.json there\); pass OUT/adapter"):
        trained.read_kind(str(tmp_path), "lora-adapter", "--adapter", "pass OUT/adapter")
    with pytest.raises(ValueError, match="kind is one of lora-adapter, ctc-aligner, export"):
        trained.write(str(tmp_path), "checkpoint")
    path = tmp_path / "lalmtool.json"
    for text, said in (("{kind: ", "is damaged"), ("[1]", r"is damaged \(not a JSON object\)"),
                       ('{"kind": "lora-adapter", "format_version": 2}',
                        r"has format_version 2, newer than this lalmtool reads \(1\): upgrade"),
                       ('{"kind": "model", "format_version": 1}',
                        r"is damaged \(kind 'model', not one of")):
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"^{path} {said}"):
            trained.read(str(tmp_path))
    record = trained.write(str(tmp_path), "export", backend="whisper", format="ct2")
    assert trained.read(str(tmp_path)) == record == {
        "kind": "export", "format_version": 1, "backend": "whisper", "backend_options": None,
        "base_model": None, "base_weights": None, "compression": None, "pooler": None,
        "trained_on": None, "format": "ct2"}
