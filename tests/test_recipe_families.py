"""The corpus recipes (recipes/librispeech, recipes/covost2) with an audio LLM family as
--backend, on tiny random checkpoints of the families (lalmtool.testing) and fake corpora
(test_corpora): the family's audio tokens at its own rate, compressed as the condition says;
covost2's translation options where the family's prompt takes them (task=translate,
target_language), a transcription prompt where it does not (qwen3-asr), the family's main
checkpoint when no --model is given."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from lalmtool.models.audio_llm import FAMILIES
from lalmtool.store import Store
from lalmtool.testing import write_random_audio_llm
from conftest import HANG_GUARD_S, LIBRI, make_covost, make_librispeech, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(recipe: str, *args) -> subprocess.CompletedProcess:
    """The recipe run with this interpreter and this checkout's lalmtool."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(["bash", f"recipes/{recipe}/run.sh", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
                               "PYTHONPATH": path})


def stages_run(exp) -> list[int]:
    with open(os.path.join(exp, "timings.tsv")) as fh:
        return [int(line.split("\t")[0]) for line in fh if line.strip()]


def rows(store) -> dict[str, int]:
    """Rows per utterance of a feature store."""
    s = Store(str(store))
    return {u: s.dataset(u).shape[0] for u in s.ids}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(family): the path of the family's tiny random checkpoint (written once)."""
    made: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in made:
            made[family] = write_random_audio_llm(
                family, str(tmp_path_factory.mktemp(family.replace(".", "_"))))
        return made[family]
    return get


# uniform-mean-r4 asks for 4 tokens/s: k = round(rate / 4), 3 at voxtral's 12.5/s, 2 at granite's
@pytest.mark.slow
@pytest.mark.parametrize("family,k_r4", [("voxtral", 3), ("granite-speech", 2)])
def test_librispeech_stages_0_to_3_pool_the_familys_audio_tokens(family, k_r4, checkpoint,
                                                                  tmp_path):
    root = make_librispeech(tmp_path / "LS", {"dev-clean": LIBRI["dev-clean"]})
    exp = tmp_path / "exp"
    r = run("librispeech", "--stage", 0, "--stop_stage", 3, "--librispeech_root", root,
            "--train_set", "dev-clean", "--dev_set", "dev-clean", "--test_sets", "dev-clean",
            "--backend", family, "--model", checkpoint(family), "--device", "cpu",
            "--conditions", "frames uniform-mean-k3 uniform-mean-r4", "--exp", exp,
            "--data", tmp_path / "data")
    assert r.returncode == 0, r.stderr[-3000:]
    assert stages_run(exp) == [0, 1, 2, 3]
    frames = exp / "feats/frames/dev-clean"
    meta = Store(str(frames)).meta
    assert (meta["backend"], meta["frame_rate"]) == (family, FAMILIES[family].rate)
    n = rows(frames)
    assert sorted(n) == sorted(LIBRI["dev-clean"]) and min(n.values()) > 0
    for cond, k in (("uniform-mean-k3", 3), ("uniform-mean-r4", k_r4)):
        pooled = exp / "pooled" / cond / "dev-clean"
        assert Store(str(pooled)).meta["params"]["k"] == k, cond
        assert rows(pooled) == {u: math.ceil(m / k) for u, m in n.items()}, cond


@pytest.mark.slow
def test_covost2_en_de_with_a_family_translates_through_stage_5(checkpoint, tmp_path):
    """st only, on one set: the family's prompt asks for the German translation (task=translate,
    target_language=de) in training and in decoding; granite-speech trains with gradient
    checkpointing (of its LLM: its model class as a whole has none), as the config asks."""
    family = "granite-speech"
    cv, covost = make_covost(tmp_path, src="en", tgt="de")
    exp, data = tmp_path / "exp", tmp_path / "data"
    r = run("covost2", "--stage", 0, "--stop_stage", 5, "--cv_root", cv, "--covost_root", covost,
            "--src_lang", "en", "--tgt_lang", "de", "--tasks", "st", "--train_set", "train",
            "--dev_set", "train", "--test_sets", "train", "--backend", family, "--model",
            checkpoint(family), "--device", "cpu", "--conditions", "uniform-mean-k3",
            "--steps", 1, "--max_new_tokens", 2, "--exp", exp, "--data", data)
    assert r.returncode == 0, r.stderr[-3000:]
    assert stages_run(exp) == [0, 1, 2, 3, 4, 5]
    n = rows(exp / "feats/frames/train")
    assert rows(exp / "pooled/uniform-mean-k3/train") == {u: math.ceil(m / 3) for u, m in n.items()}
    prompt = {"task": "translate", "language": "en", "target_language": "de"}
    conf = yaml.safe_load((exp / "conf" / "st.yaml").read_text())
    assert conf["text_field"] == "target" and conf["extra"].items() >= prompt.items()
    lora = exp / "lora" / "st-uniform-mean-k3"
    assert json.loads((lora / "summary.json").read_text())["steps"] == 1
    trained = json.loads((lora / "adapter" / "lalmtool.json").read_text())
    assert (trained["kind"], trained["backend"]) == ("lora-adapter", family)
    assert trained["backend_options"]["gradient_checkpointing"] is True
    for name in ("st-uniform-mean-k3", "st-uniform-mean-k3-lora"):
        dec = json.loads((exp / "decode" / name / "train" / "decode.json").read_text())
        assert (dec["backend"], dec["utterances"]) == (family, 3), name
        assert dec["backend_opts"].items() >= prompt.items(), name
        assert len(read_jsonl(exp / "decode" / name / "train" / "hyp.jsonl")) == 3


def test_covost2_defaults_and_a_family_that_cannot_be_asked_to_translate(tmp_path):
    """Stages 4-5 launched through --gpu_cmd echo (the commands are printed, not run): without
    --model the family's main checkpoint, on cuda; qwen3-asr's prompt takes no instruction, so
    st is prompted as asr (task=transcribe in the source language) and its LoRA learns the
    translation."""
    family = "qwen3-asr"
    exp = tmp_path / "exp"
    r = run("covost2", "--stage", 4, "--stop_stage", 5, "--backend", family, "--src_lang", "es",
            "--tgt_lang", "en", "--conditions", "peaks", "--exp", exp, "--data",
            tmp_path / "data", "--gpu_cmd", "echo")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"backend {family}'s prompt cannot ask for a translation" in r.stdout
    launched = [line for line in r.stdout.splitlines() if " -m lalmtool " in line]
    assert len(launched) == 6  # finetune st and asr; decode each without and with its LoRA
    for line in launched:
        assert f"--backend {family} --model {FAMILIES[family].checkpoint}" in line, line
    for task in ("st", "asr"):
        conf = yaml.safe_load((exp / "conf" / f"{task}.yaml").read_text())
        assert conf["extra"]["task"] == "transcribe" and conf["extra"]["language"] == "es"
        assert "target_language" not in conf["extra"]
        assert conf["text_field"] == ("target" if task == "st" else "text")
        plain = next(line for line in launched
                     if f"/decode/{task}-peaks/" in line)
        assert "--device cuda" in plain
        assert plain.endswith("--backend-opt task=transcribe --backend-opt language=es"), plain


def test_the_families_training_config_is_refused_for_another_backend(tmp_path):
    r = run("librispeech", "--stage", 4, "--stop_stage", 4, "--backend", "speechllm", "--model",
            "some-llm", "--exp", tmp_path / "exp")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "stage 4: no conf/speechllm.yaml for backend speechllm (conf/audio-llm.yaml is for the "
        "audio LLM families): give --train_config FILE")
