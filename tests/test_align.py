"""lalmtool align: CTC pre-alignment of the speechllm projector onto frozen token embeddings.

Mechanics on the tiny random Llama (SmolLM2's tokenizer) of test_speechllm and the tiny random
Whisper of conftest; tones stand in for speech, each with its own transcript.
"""
import json
import os
import shutil

import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import random_feats_store, tone, write_manifest
from lalmtool import trained
from lalmtool.align import AlignConfig, align, train_vocab
from lalmtool.cli import main
from lalmtool.ctc import ctc_boundaries, ctc_greedy, ctc_positions_needed
from lalmtool.fileio import file_sha256
from lalmtool.store import Store

TEXTS = {"a": "the cat sat", "b": "hello world", "short": "a much longer sentence than its audio"}
EXTRA = {"stack": 2, "hidden": 24}


@pytest.fixture(scope="module")
def data(tiny_whisper, tmp_path_factory):
    d = tmp_path_factory.mktemp("align-data")
    frames = {"a": 40, "b": 30, "short": 5}  # stack 2: 20, 15 and 3 positions
    rows = []
    for uid in frames:
        sf.write(d / f"{uid}.wav", tone(frames[uid] / 50), 16000)
        rows.append({"id": uid, "audio": f"{uid}.wav", "text": TEXTS[uid]})
    m = write_manifest(d / "m.jsonl", rows)
    valid = write_manifest(d / "valid.jsonl", rows[:2])
    return {"dir": d, "manifest": m, "feats": random_feats_store(d / "feats", frames),
            "valid": valid, "valid_feats": random_feats_store(d / "valid-feats", {"a": 40, "b": 30}),
            "extra": {"encoder": tiny_whisper, **EXTRA}}


def cfg(data, **kw):
    base = dict(max_steps=40, batch_size=2, lr=1e-2, warmup_steps=0, scale=16.0, log_every=1,
                valid_every=20, save_every=20, extra=data["extra"])
    return AlignConfig(**{**base, **kw})


def run(data, out, tiny_llm, **kw):  # noqa: F811
    return align(data["feats"], data["manifest"], tiny_llm, str(out), cfg(data, **kw),
                 valid_feats=data["valid_feats"], valid_manifest=data["valid"])


def losses(out):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out, "log.jsonl")))
            if "loss" in r]


def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    path = [0, 3, 3, 0, 3, 5, 5, 0, 0, 2, 2]
    log_probs = torch.nn.functional.one_hot(torch.tensor(path), 6).float().log_softmax(-1)
    assert ctc_greedy(log_probs) == [3, 3, 5, 2]
    assert ctc_greedy(log_probs[:1]) == []
    assert ctc_positions_needed([3, 3, 5, 2]) == 5  # a blank must separate the two 3s
    assert ctc_positions_needed([1, 2, 2, 2]) == 6


def test_ctc_boundaries_cut_at_runs_of_the_best_class():
    def lp(path):
        return torch.nn.functional.one_hot(torch.tensor(path), 6).float().log_softmax(-1)

    path = [0, 3, 3, 0, 3, 5, 5, 0, 0, 2, 2]  # runs start at positions 0 1 3 4 5 7 9
    assert ctc_boundaries(lp(path), stack=2, blank="keep").tolist() == [0, 2, 6, 8, 10, 14, 18]
    # one segment per emitted token ([3, 3, 5, 2]); blanks join the token before them
    assert ctc_boundaries(lp(path), stack=2).tolist() == [0, 8, 10, 18]
    assert ctc_boundaries(lp([3, 0, 4, 4]), stack=3).tolist() == [0, 6]
    assert ctc_boundaries(lp([0, 0, 0]), stack=4).tolist() == [0]  # nothing emitted: one segment
    with pytest.raises(ValueError, match="blank must be one of"):
        ctc_boundaries(lp(path), stack=2, blank="drop")


def test_ctc_segment_writes_a_boundary_store_that_pool_reads(data, tiny_llm,  # noqa: F811
                                                             tmp_path):
    from lalmtool.ctc import ctc_segment, load_aligner
    from lalmtool.pool import pool_store
    from lalmtool.store import Store

    run(data, tmp_path / "al", tiny_llm)  # learns "the cat sat" and "hello world" exactly
    al = load_aligner(str(tmp_path / "al"), tiny_llm)
    al.train(False)
    feats = Store(data["valid_feats"])
    summaries = {}
    for blank in ("join", "keep"):
        s = summaries[blank] = ctc_segment(str(tmp_path / "al"), data["valid_feats"], tiny_llm,
                        str(tmp_path / blank), blank=blank)
        seg = Store(str(tmp_path / blank))
        with torch.no_grad():
            for u in ("a", "b"):
                lp = al.log_probs([torch.from_numpy(feats[u].astype("float32"))])[0]
                assert seg[u].tolist() == ctc_boundaries(lp, 2, blank).tolist(), (blank, u)
        assert s["tokens"] == sum(len(seg[u]) for u in ("a", "b"))
    # joined: one segment per token of the (exactly learnt) transcripts
    tok = al.be.tokenizer
    assert [len(Store(str(tmp_path / "join"))[u]) for u in ("a", "b")] == [
        len(tok.encode(TEXTS[u], add_special_tokens=False)) for u in ("a", "b")]
    pooled = pool_store(data["valid_feats"], str(tmp_path / "join"), "mean",
                        str(tmp_path / "pooled"))
    assert Store(str(tmp_path / "pooled")).meta.condition()[2] == "ctc-mean-blankjoin"
    assert pooled["tokens"] == summaries["join"]["tokens"] < summaries["keep"]["tokens"]
    # the CLI: a rerun says so; a pooled store is refused in one line
    r = CliRunner().invoke(main, ["ctc", "segment", "--align", str(tmp_path / "al"), "--feats",
                                  data["valid_feats"], "--model", tiny_llm, "--out",
                                  str(tmp_path / "join")])
    assert r.exit_code == 0 and "Loading weights" not in r.output  # no model for a rerun
    assert r.output.strip().endswith("complete for these inputs and settings, nothing to do")
    r = CliRunner().invoke(main, ["ctc", "segment", "--align", str(tmp_path / "al"), "--feats",
                                  str(tmp_path / "pooled"), "--model", tiny_llm, "--out",
                                  str(tmp_path / "x")])
    assert r.exit_code == 1 and r.output.startswith(f"Error: {tmp_path / 'pooled'} is already "
                                                    "compressed; give --feats the frame-level")


def test_loss_falls_short_utterance_skipped_and_transcripts_learnt(data, tiny_llm,  # noqa: F811
                                                                   tmp_path):
    s = run(data, tmp_path / "al", tiny_llm)
    assert s["skipped"] == 1 and s["skipped_ids"] == ["short"] and s["utterances"] == 2
    assert "label positions needed" in s["skipped_why"][0]["why"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm)
    vocab = train_vocab(tok, list(TEXTS.values()))
    assert s["vocab_size"] == len(vocab)
    ctc = load_file(tmp_path / "al" / "ctc.safetensors")
    assert ctc["vocab"].tolist() == vocab and ctc["blank"].shape == (32,)
    curve = losses(tmp_path / "al")
    assert len(curve) == 40 and curve[0] > 10 and curve[-1] < 1.0
    # the validation WER (CTC-greedy on the two training utterances) reaches zero
    assert s["initial_valid_wer"] > 0.5 and s["best_valid_wer"] == 0.0
    records = [json.loads(l) for l in open(tmp_path / "al" / "log.jsonl")]
    assert [r["step"] for r in records if "valid_wer" in r] == [0, 20, 40]
    # the aligned projector alone transcribes (CTC greedy), in decode's format, scored by score
    from lalmtool.ctc import ctc_decode
    from lalmtool.score import score

    info = ctc_decode(str(tmp_path / "al"), data["valid_feats"], tiny_llm,
                      str(tmp_path / "ctc"), manifest=data["valid"])
    hyps = {r["id"]: r for r in map(json.loads, open(tmp_path / "ctc" / "hyp.jsonl"))}
    assert {u: r["hyp"] for u, r in hyps.items()} == {"a": TEXTS["a"], "b": TEXTS["b"]}
    assert [hyps[u]["tokens"] for u in ("a", "b")] == [20, 15]  # 40 and 30 frames, stack 2
    assert info["condition"] == "frames (CTC greedy)" and info["audio_tokens"] == 35
    assert score(str(tmp_path / "ctc" / "hyp.jsonl"), data["valid"])["wer"] == 0.0


def test_resume_gives_the_same_projector_bit_for_bit(data, tiny_llm, tmp_path):  # noqa: F811
    run(data, tmp_path / "whole", tiny_llm, max_steps=12, save_every=4, valid_every=6)
    cut = tmp_path / "cut"
    run(data, cut, tiny_llm, max_steps=12, save_every=4, valid_every=6)
    # as if killed after step 8's checkpoint: the later checkpoint and outputs never written
    shutil.rmtree(cut / "checkpoints" / "step-12")
    for name in ("projector.safetensors", "ctc.safetensors", "summary.json"):
        os.remove(cut / name)
    shutil.rmtree(cut / "last")
    s = run(data, cut, tiny_llm, max_steps=12, save_every=4, valid_every=6)
    assert s["steps"] == 12
    for name in ("projector.safetensors", "ctc.safetensors"):
        a, b = load_file(tmp_path / "whole" / name), load_file(cut / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(cut) == losses(tmp_path / "whole")


def test_other_options_or_inputs_refuse_and_force_starts_over(data, tiny_llm,  # noqa: F811
                                                               tmp_path):
    run(data, tmp_path / "al", tiny_llm, max_steps=2)
    with pytest.raises(ValueError, match=r"an align run with another configuration or other "
                                         r"inputs \(lr: 0\.01 there, 0\.001 now; max_steps: 2 "
                                         r"there, 3 now\); use another --out, or --force"):
        run(data, tmp_path / "al", tiny_llm, max_steps=3, lr=1e-3)
    with pytest.raises(ValueError, match=r"\(--valid-texts: [0-9a-f]{12} there, [0-9a-f]{12} "
                                         r"now\)"):
        align(data["feats"], data["manifest"], tiny_llm, str(tmp_path / "al"),
              cfg(data, max_steps=2), valid_feats=data["valid_feats"],
              valid_manifest=data["manifest"])
    s = align(data["feats"], data["manifest"], tiny_llm, str(tmp_path / "al"),
              cfg(data, max_steps=3, lr=1e-3), force=True)
    assert s["steps"] == 3 and len(losses(tmp_path / "al")) == 3


def test_cli_reports_skips_and_fails_in_one_line(data, tiny_llm, tmp_path):  # noqa: F811
    common = ["align", "--feats", data["feats"], "--model", tiny_llm,
              "--backend-opt", f"encoder={data['extra']['encoder']}", "--backend-opt", "stack=2",
              "--backend-opt", "hidden=24"]
    r = CliRunner().invoke(main, common + ["--manifest", data["manifest"], "--out",
                                           str(tmp_path / "al"), "--max_steps=2"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["skipped_ids"] == ["short"]
    only_short = write_manifest(tmp_path / "short.jsonl", [
        {"id": u, "audio": str(data["dir"] / f"{u}.wav"), "text": TEXTS["short"] * 3}
        for u in TEXTS])
    r = CliRunner().invoke(main, common + ["--manifest", only_short, "--out",
                                           str(tmp_path / "none")])
    errors = [l for l in r.output.splitlines() if "Error" in l or "Traceback" in l]
    assert r.exit_code == 1 and len(errors) == 1
    assert errors[0].startswith("Error: align: none of the 3 utterances")
    r = CliRunner().invoke(main, common + ["--manifest", data["manifest"], "--out",
                                           str(tmp_path / "x"), "--valid-feats", data["feats"]])
    assert r.exit_code == 2 and "go together" in r.output
    r = CliRunner().invoke(main, common + ["--manifest", data["manifest"], "--out",
                                           str(tmp_path / "x"), "--vocab=all"])
    assert r.exit_code == 1 and "vocab must be one of" in r.output
    r = CliRunner().invoke(main, common + ["--manifest", data["manifest"], "--out",
                                           str(tmp_path / "x"), "--max_steps=0"])
    assert r.exit_code == 1 and "Error: align option max_steps must be >= 1 (no steps would " \
                                "write untrained weights), not 0" in r.output
    r = CliRunner().invoke(main, common + ["--manifest", data["manifest"], "--out",
                                           str(tmp_path / "x"), "--max_step=3"])
    assert r.exit_code == 2 and "No such option '--max_step'" in r.output
    assert not (tmp_path / "x").exists()  # every option error before anything is written


def test_finetune_starts_from_the_aligned_projector(data, tiny_llm, tmp_path):  # noqa: F811
    run(data, tmp_path / "al", tiny_llm, max_steps=5)
    aligned = load_file(tmp_path / "al" / "projector.safetensors")
    conf = tmp_path / "ft.yaml"
    conf.write_text(json.dumps({"backend": "speechllm", "extra": data["extra"]}))
    # lr 1e-30: one step moves no float32 weight, so the adapter holds where the LoRA stage began
    r = CliRunner().invoke(main, [
        "finetune", "--feats", data["feats"], "--manifest", data["manifest"], "--model",
        tiny_llm, "--out", str(tmp_path / "ft"), "--config", str(conf), "--init-projector",
        str(tmp_path / "al"), "--max_steps=1", "--lr=1e-30", "--warmup_steps=0", "--batch_size=3"])
    assert r.exit_code == 0, r.output
    adapter = load_file(tmp_path / "ft" / "adapter" / "adapter_model.safetensors")
    prefix = "base_model.model.projector."
    started = {k[len(prefix):]: v for k, v in adapter.items() if k.startswith(prefix)}
    assert started.keys() == aligned.keys()
    assert all(torch.equal(started[k], aligned[k]) for k in aligned)
    from lalmtool.models import load_backend, training_options

    fresh = load_backend("speechllm", tiny_llm, **data["extra"]).model.projector.state_dict()
    assert not torch.equal(fresh["net.0.weight"], aligned["net.0.weight"])  # a real hand-over
    # decode (options from the run's config.yaml) reloads the same projector

    opts = training_options(str(tmp_path / "ft" / "adapter"), "speechllm")
    assert opts["init_projector"] == str(tmp_path / "al")
    be = load_backend("speechllm", tiny_llm, **opts)
    assert all(torch.equal(be.model.projector.state_dict()[k], aligned[k]) for k in aligned)


@pytest.fixture(scope="module")
def aligned(data, tiny_llm, tmp_path_factory):  # noqa: F811
    """A short alignment: its cuts need not be good, only the same under either command name."""
    out = tmp_path_factory.mktemp("aligned") / "al"
    run(data, out, tiny_llm, max_steps=2)
    return str(out)


def ctc_cli(*args: str):
    """``lalmtool ARGS``, stdout and stderr apart."""
    return CliRunner().invoke(main, list(args))


def renamed_line(old: str) -> str:
    new = old.replace("-", " ")
    return f"`lalmtool {old}` is now `lalmtool {new}`; the old name goes in a future release"


def store_files(path) -> dict[str, bytes]:
    """Every file of a store by its path inside it, but verified.json (inodes and mtimes)."""
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files if f != "verified.json"}


def test_ctc_segment_writes_the_store_of_its_old_name_byte_for_byte(data, tiny_llm,  # noqa: F811
                                                                    aligned, tmp_path):
    stores = {}
    for command in (("ctc", "segment"), ("ctc-segment",)):
        out = tmp_path / "-".join(command)
        r = ctc_cli(*command, "--align", aligned, "--feats", data["valid_feats"], "--model",
                    tiny_llm, "--out", str(out), "--blank", "keep")
        assert r.exit_code == 0, r.output
        stores[command] = store_files(out)
    assert stores[("ctc", "segment")].keys() >= {"store.json", "seg.00000.h5"}
    assert stores[("ctc", "segment")] == stores[("ctc-segment",)]


@pytest.mark.parametrize("old", ["ctc-segment", "ctc-decode"])
def test_the_old_names_still_run_and_say_the_new_one(data, tiny_llm, aligned,  # noqa: F811
                                                     tmp_path, old):
    args = ["--align", aligned, "--feats", data["valid_feats"], "--model", tiny_llm]
    for command in ([old], old.split("-")):
        r = ctc_cli(*command, *args, "--out", str(tmp_path / "-".join(command)))
        assert r.exit_code == 0, r.output
        said = [line for line in r.stderr.splitlines() if "is now `lalmtool" in line]
        assert said == ([renamed_line(old)] if command == [old] else [])
    usage = ctc_cli("--help").output
    assert old not in usage and "ctc " in usage  # the old names are out of the way in --help


def test_ctc_does_not_import_align():
    import ast

    import lalmtool.ctc

    tree = ast.parse(open(lalmtool.ctc.__file__, encoding="utf-8").read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(filter(None, ["lalmtool" if node.level else "", node.module]))
            imported |= {module} | {f"{module}.{a.name}" for a in node.names}
    assert "lalmtool.segment" in imported  # relative imports are read as the package's
    assert not [m for m in imported if m == "lalmtool.align" or m.startswith("lalmtool.align.")]


def test_align_writes_a_ctc_aligner_record_that_load_aligner_reads(data, tiny_llm, tmp_path):
    import torch

    from lalmtool.ctc import check_alignment, load_aligner

    out = tmp_path / "al"
    run(data, out, tiny_llm, max_steps=2)
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
