"""A trained directory's record, lalmtool.json (``lalmtool.trained``): one file per finetune
adapter, alignment and export, chosen by its kind; directories of the previous release
(backend.json, compression.json, pooler.json, ../summary.json, ../config.yaml) are read from
those files and decode, transcribe, pool and export the same."""
import json
import os
import shutil

import pytest
import yaml
from test_align import data  # noqa: F401  (module fixture)
from test_align import run as align_run
from test_transcribe import stages, transcribed

from lalmtool import trained
from lalmtool.decode import _adapter_condition, decode
from lalmtool.export import export, read_export
from lalmtool.fileio import file_sha256
from lalmtool.models import base_weights, check_adapter_base, training_options
from lalmtool.pool import pool_store
from lalmtool.store import Store

OLD_FILES = {"backend.json", "compression.json", "pooler.json"}


def previous_release(adapter: str) -> dict:
    """``adapter`` rewritten as the previous release wrote it: backend.json, compression.json
    and (with a learnt pooler) pooler.json beside peft's files, no lalmtool.json; returns the
    record it held."""
    path = os.path.join(adapter, trained.RECORD_FILE)
    with open(path) as fh:
        record = json.load(fh)
    os.remove(path)
    files = {"backend.json": {k: record[k] for k in ("backend", "backend_options",
                                                     "base_weights")},
             "compression.json": record["compression"], "pooler.json": record["pooler"]}
    for name, held in files.items():
        if held is not None:
            with open(os.path.join(adapter, name), "w") as fh:
                json.dump(held, fh, indent=1)
    return record


def hyps_of(out) -> dict[str, str]:
    with open(os.path.join(out, "hyp.jsonl")) as fh:
        return {r["id"]: r["hyp"] for r in map(json.loads, fh)}


# -- what is written -------------------------------------------------------------------------
def test_a_finetune_adapter_holds_one_record(tiny_whisper_lm, tmp_path):
    adapter, _ = stages(tmp_path, tiny_whisper_lm, "whisper", "uniform", 3, learnt=True)
    names = set(os.listdir(adapter))
    assert {"lalmtool.json", "adapter_config.json", "adapter_model.safetensors",
            "pooler.safetensors", "README.md"} <= names and not names & OLD_FILES
    record = json.loads((tmp_path / "lora" / "adapter" / "lalmtool.json").read_text())
    summary = json.loads((tmp_path / "lora" / "summary.json").read_text())
    assert record == {
        "kind": "lora-adapter", "format_version": 1, "backend": "whisper",
        "backend_options": {}, "base_model": tiny_whisper_lm,
        "base_weights": base_weights(tiny_whisper_lm),
        "compression": {"condition": "uniform-learnt-k3",
                        "steps": [{"method": "uniform", "params": {"k": 3}, "reduce": "learnt"}],
                        "frame_rate": 50.0, "trim": True, "input_seconds": None},
        "pooler": {k: v for k, v in summary["pooler"].items() if k != "parameters"},
        "trained_on": {
            "condition": "uniform-learnt-k3",
            "feats": {"path": str(tmp_path / "feats"),
                      "fingerprint": Store(str(tmp_path / "feats")).fingerprint},
            "manifest": {"path": str(tmp_path / "m.jsonl"),
                         "sha256": file_sha256(str(tmp_path / "m.jsonl"))},
            "segments": {"path": str(tmp_path / "seg"),
                         "fingerprint": Store(str(tmp_path / "seg")).fingerprint}}}
    assert trained.read(adapter) == record
    # OUT/last is an adapter too: the same record
    assert json.loads((tmp_path / "lora" / "last" / "lalmtool.json").read_text()) == record
    assert _adapter_condition(adapter, "frames") == "uniform-learnt-k3"
    assert _adapter_condition(adapter, "uniform-learnt-k3") is None


def test_align_writes_a_ctc_aligner_record_that_load_aligner_reads(data, tiny_llm,  # noqa: F811
                                                                    tmp_path):
    import torch

    from lalmtool.ctc import check_alignment, load_aligner

    out = tmp_path / "al"
    align_run(data, out, tiny_llm, max_steps=2)
    record = trained.read(str(out))
    assert (record["kind"], record["format_version"]) == ("ctc-aligner", 1)
    assert (record["backend"], record["backend_options"]) == ("speechllm", data["extra"])
    assert (record["ctc_head"], record["pooler"]) == ({"hidden": 0}, None)
    assert record["compression"]["steps"] == [] and record["base_model"] == tiny_llm
    assert record["trained_on"]["feats"] == {"path": data["feats"],
                                             "fingerprint": Store(data["feats"]).fingerprint}
    assert record["trained_on"]["manifest"]["sha256"] == file_sha256(data["manifest"])
    al = load_aligner(str(out), tiny_llm)
    # an alignment of the previous release (config.yaml, no lalmtool.json): the same aligner
    old = tmp_path / "old"
    shutil.copytree(out, old)
    os.remove(old / "lalmtool.json")
    assert trained.read(str(old))["backend_options"] == data["extra"]
    again = load_aligner(str(old), tiny_llm)
    assert (again.backend, again.stack, again.vocab, again.head.scale) == \
        (al.backend, al.stack, al.vocab, al.head.scale)
    ours, theirs = al.weights(), again.weights()
    assert torch.equal(ours["blank"], theirs["blank"])
    assert all(torch.equal(v, theirs["projector"][k]) for k, v in ours["projector"].items())
    # a directory of another kind is refused by name
    trained.write(str(old), "lora-adapter")
    with pytest.raises(ValueError, match=rf"^--align {old} is not a ctc-aligner directory "
                                         r"\(its lalmtool.json says lora-adapter\)"):
        check_alignment(str(old))


# -- directories of the previous release ---------------------------------------------------
def test_an_adapter_of_the_previous_release_decodes_transcribes_pools_and_exports_the_same(
        tiny_whisper_lm, tmp_path):
    adapter, hyps = stages(tmp_path, tiny_whisper_lm, "whisper", "uniform", 3, learnt=True)
    new = previous_release(adapter)
    assert OLD_FILES <= set(os.listdir(adapter)) and "lalmtool.json" not in os.listdir(adapter)
    old = trained.read(adapter)
    assert old == {**new, "format_version": 0, "trained_on": {"condition": "uniform-learnt-k3"}}
    assert old.source("pooler") == os.path.join(adapter, "pooler.json")
    assert _adapter_condition(adapter, "frames") == "uniform-learnt-k3"
    # its pooler writes the same store, decode and transcribe give the same hypotheses
    feats, seg = str(tmp_path / "feats"), str(tmp_path / "seg")
    again = pool_store(feats, seg, "learnt", str(tmp_path / "pooled-old"), pooler=adapter)
    assert Store(again["store"]).fingerprint == Store(str(tmp_path / "pooled")).fingerprint
    decode(str(tmp_path / "pooled"), tiny_whisper_lm, str(tmp_path / "dec-old"), adapter=adapter,
           max_new_tokens=8, batch_size=4)
    assert hyps_of(tmp_path / "dec-old") == hyps
    assert transcribed(tiny_whisper_lm, adapter, tmp_path) == hyps
    # its export records what the adapter held
    out = str(tmp_path / "exported")
    record = export(adapter, out)
    assert (record["kind"], record["pooler"], record["compression"]) == \
        ("export", new["pooler"], new["compression"])
    assert read_export(out) == record and transcribed(out, None, tmp_path) == hyps
    # an export of the previous release (lalmtool.json without kind, pooler.json beside it)
    with open(os.path.join(out, "lalmtool.json"), "w") as fh:
        json.dump({k: record[k] for k in ("backend", "backend_options", "compression",
                                          "base_model", "adapter", "format")}, fh)
    with open(os.path.join(out, "pooler.json"), "w") as fh:
        json.dump(new["pooler"], fh)
    assert read_export(out)["pooler"] == new["pooler"]
    assert transcribed(out, None, tmp_path) == hyps


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
