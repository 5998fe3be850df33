"""The corpus recipes (recipes/librispeech, recipes/covost2), a smoke run of
recipes/mini_speechllm, and the shared recipe helpers
(recipes/utils): options, --config, --help from anywhere, stage gating, launchers, resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import HANG_GUARD_S, LIBRI, make_covost, make_librispeech, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(recipe: str, *args, cwd: str = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """The recipe run with this interpreter (PYTHON), whatever python3 and lalmtool on PATH are."""
    return subprocess.run(["bash", f"recipes/{recipe}/run.sh", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
                               **(env or {})})


def stages_run(exp) -> list[int]:
    with open(os.path.join(exp, "timings.tsv")) as fh:
        return [int(line.split("\t")[0]) for line in fh if line.strip()]


def store_info(store) -> dict:
    """`lalmtool info STORE`, run by this interpreter."""
    return json.loads(subprocess.run([sys.executable, "-m", "lalmtool", "info", str(store)],
                                     capture_output=True, text=True, check=True).stdout)


def shards_with_mtimes(top) -> dict[str, int]:
    """The HDF5 shards (the computed data) under ``top`` and their modification times."""
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, fs in os.walk(top) for f in fs if f.endswith(".h5")}


# ------------------------------------------------------------------------------ helpers

@pytest.mark.parametrize("recipe,first", [
    ("mini", "# recipes/mini: the paper's effect"),
    ("librispeech", "# recipes/librispeech: audio-token compression for ASR"),
    ("covost2", "# recipes/covost2: audio-token compression for speech translation"),
    ("mini_st", "# recipes/mini_st: speech translation"),
    ("mini_speechllm", "# recipes/mini_speechllm: audio-token compression for a composed"),
])
def test_help_works_from_the_repository_root(recipe, first):
    r = run(recipe, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(first)
    assert "awk" not in r.stderr


def test_config_file_sets_options_and_the_command_line_wins(tmp_path):
    root = make_librispeech(tmp_path / "LS", {"dev-clean": LIBRI["dev-clean"]})
    conf = tmp_path / "my.conf"
    conf.write_text(f"# options for this run\nlibrispeech_root={root}\n--text-case keep\n"
                    f"stop_stage=6   # overridden below\ntest_sets=\"dev-clean\"\n")
    exp, data = tmp_path / "exp", tmp_path / "data"
    r = run("librispeech", "--config", conf, "--stop_stage", 0, "--train_set", "dev-clean",
            "--dev-set=dev-clean", "--exp", exp, "--data", data)
    assert r.returncode == 0, r.stderr
    assert stages_run(exp) == [0]
    texts = [x["text"] for x in read_jsonl(data / "dev-clean" / "manifest.jsonl")]
    assert texts[1] == "GO DO YOU HEAR"  # text_case=keep from the file


def test_config_file_with_an_unknown_option_names_file_and_line(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("stage=0\n\nno_such_option=3\n")
    r = run("librispeech", "--config", conf, "--exp", tmp_path / "exp")
    assert r.returncode == 1
    assert r.stderr.strip() == f"unknown option --no_such_option in {conf} line 3 (see --help)"


def test_unknown_command_line_option_is_refused():
    r = run("covost2", "--no-such", "1")
    assert (r.returncode, r.stderr.strip()) == (1, "unknown option --no-such (see --help)")


def test_stage_0_without_corpus_root_says_what_it_needs(tmp_path):
    r = run("covost2", "--stop_stage", 0, "--exp", tmp_path / "exp")
    assert r.returncode == 1
    assert ("stage 0 needs --cv_root DIR (clips/*.mp3) and --covost_root DIR (covost_v2.*.tsv)"
            in r.stderr)


def test_recipe_stops_at_a_bad_corpus_with_its_named_error(tmp_path):
    root = make_librispeech(tmp_path / "LS", {"dev-clean": LIBRI["dev-clean"]})
    os.remove(os.path.join(root, "dev-clean", "84", "121123", "84-121123-0000.flac"))
    exp = tmp_path / "exp"
    args = ["--librispeech_root", root, "--train_set", "dev-clean", "--dev_set", "dev-clean",
            "--test_sets", "dev-clean", "--exp", exp, "--data", tmp_path / "data",
            "--stop_stage", 0]
    r = run("librispeech", *args)
    assert r.returncode == 1
    assert "84-121123.trans.txt:1: transcript of 84-121123-0000 but no audio" in r.stderr
    assert not os.path.exists(exp / "timings.tsv")
    r = run("librispeech", *args, "--on_error", "skip")
    assert r.returncode == 0, r.stderr
    assert "dev-clean: skipped 1 utterance(s)" in r.stderr


def test_librispeech_subset_missing_from_the_tree_names_the_option_listing_it(tmp_path):
    root = make_librispeech(tmp_path / "LS", {"dev-clean": LIBRI["dev-clean"]})
    r = run("librispeech", "--librispeech_root", root, "--train_set", "dev-clean", "--dev_set",
            "dev-clean", "--test_sets", "dev-clean test-other", "--exp", tmp_path / "exp",
            "--data", tmp_path / "data", "--stop_stage", 0)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == (
        f"stage 0: LibriSpeech subset test-other (from --test_sets) not found in {root}, which "
        "holds: dev-clean; give --train_set, --dev_set and --test_sets subsets that are there")
    assert not os.path.exists(tmp_path / "data")


def fake_path(tmp_path) -> str:
    """PATH whose python3 and lalmtool are not this environment's (as with a venv that is not
    activated): both fail, as a python3 without lalmtool's dependencies would."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name in ("python3", "lalmtool"):
        (fake / name).write_text("#!/bin/sh\necho \"No module named 'soundfile'\" >&2\nexit 1\n")
        os.chmod(fake / name, 0o755)
    return f"{fake}:{os.environ['PATH']}"


def test_recipes_run_python_and_lalmtool_with_the_interpreter_in_PYTHON(tmp_path):
    """R14: the recipes ran python3 and lalmtool from PATH, so `venv/bin/python -m pytest` with
    the venv not activated failed (No module named 'soundfile')."""
    root = make_librispeech(tmp_path / "LS", {"dev-clean": LIBRI["dev-clean"]})
    args = ["--librispeech_root", root, "--train_set", "dev-clean", "--dev_set", "dev-clean",
            "--test_sets", "dev-clean", "--exp", tmp_path / "exp", "--data", tmp_path / "data",
            "--stop_stage", 0]
    r = run("librispeech", *args, env={"PATH": fake_path(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert len(read_jsonl(tmp_path / "data" / "dev-clean" / "manifest.jsonl")) == 3
    r = run("librispeech", *args, env={"PATH": fake_path(tmp_path), "PYTHON": "python3"})
    assert (r.returncode, r.stderr) == (1, (
        f"[librispeech] {tmp_path}/bin/python3 cannot import lalmtool; set PYTHON to the python "
        "of the environment lalmtool is installed in (e.g. PYTHON=/path/to/venv/bin/python), "
        "or activate it\n"))


# ------------------------------------------------------------------------------ stages 0-3

@pytest.mark.slow
@pytest.mark.assets  # the recipe fetches whisper-tiny.en
def test_librispeech_recipe_stages_0_to_3_launcher_and_resume(tmp_path):
    """Fake LibriSpeech → manifests, tiny.en frames, boundaries, pooled tokens; every command
    goes through the --cmd/--gpu_cmd launchers; a partial rerun runs exactly its stages and
    redoes no finished work."""
    root = make_librispeech(tmp_path / "LibriSpeech")
    exp, data = tmp_path / "exp", tmp_path / "data"
    launcher = tmp_path / "launch.sh"  # stands in for srun: logs the command, then runs it
    launcher.write_text(f'#!/bin/bash\necho "$1 ${{*:2:4}}" >> {tmp_path}/launched\nshift\nexec "$@"\n')
    common = ["--librispeech_root", root, "--train_set", "train-clean-100", "--dev_set",
              "dev-clean", "--test_sets", "dev-clean", "--backend", "whisper", "--model",
              "whisper-tiny.en", "--conditions", "frames uniform-mean-k3", "--exp", exp,
              "--data", data, "--cmd", f"bash {launcher} cpu", "--gpu_cmd", f"bash {launcher} gpu"]
    r = run("librispeech", "--stage", 0, "--stop_stage", 3, *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert stages_run(exp) == [0, 1, 2, 3]
    with open(tmp_path / "launched") as fh:
        assert fh.read().splitlines() == [  # through the interpreter in PYTHON (see run)
            f"{where} {sys.executable} -m lalmtool {cmd}" for where, cmd in [
                ("cpu", "prepare"), ("gpu", "extract"), ("gpu", "extract"), ("cpu", "segment"),
                ("cpu", "segment"), ("cpu", "pool"), ("cpu", "pool")]]
    for store in ("feats/frames", "seg/uniform-k3", "pooled/uniform-mean-k3"):
        for s in ("train-clean-100", "dev-clean"):
            assert os.path.exists(exp / store / s / "store.json"), (store, s)
    assert len(read_jsonl(data / "train-clean-100" / "manifest.jsonl")) == 4
    info = store_info(exp / "pooled/uniform-mean-k3/dev-clean")
    # 1.0 + 1.25 + 1.5 s at 50 frames/s = 188 frames; k=3 → ceil per utterance: 17 + 21 + 25
    assert (info["utterances"], info["rows"]) == (3, 63)

    before = shards_with_mtimes(exp)
    assert len(before) == 6  # frames, boundaries and pooled tokens of two sets
    r = run("librispeech", "--stage", 2, "--stop_stage", 3, *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert stages_run(exp) == [0, 1, 2, 3, 2, 3]
    assert "stage 1" not in r.stdout and "stage 4" not in r.stdout
    assert shards_with_mtimes(exp) == before  # nothing recomputed

    # stages 4-6: two LoRA steps per condition, decodes with and without them, scores, report
    (tmp_path / "launched").unlink()
    r = run("librispeech", "--stage", 4, "--steps", 2, "--max_new_tokens", 4, *common)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "launched") as fh:
        assert fh.read().splitlines() == [
            f"{where} {sys.executable} -m lalmtool {cmd}" for where, cmd in
            [("gpu", "finetune")] * 2 + [("gpu", "decode")] * 4 + [("cpu", "score")] * 4
            + [("cpu", "report")]]
    for cond in ("frames", "uniform-mean-k3"):
        assert json.loads((exp / "lora" / cond / "summary.json").read_text())["steps"] == 2
        for name in (cond, f"{cond}-lora"):
            dec = json.loads((exp / "decode" / name / "dev-clean" / "decode.json").read_text())
            assert (dec["utterances"], dec["lora"], dec["set"]) == (3, name.endswith("-lora"),
                                                                    "dev-clean")
    assert (exp / "RESULTS.md").exists() and (exp / "results.png").exists()


@pytest.mark.slow
@pytest.mark.assets  # the recipe fetches whisper-tiny.en
def test_covost2_recipe_stages_0_to_3_on_mp3_clips(tmp_path):
    cv, covost = make_covost(tmp_path)
    exp, data = tmp_path / "exp", tmp_path / "data"
    r = run("covost2", "--stage", 0, "--stop_stage", 3, "--cv_root", cv, "--covost_root", covost,
            "--src_lang", "es", "--tgt_lang", "en", "--backend", "whisper", "--model",
            "whisper-tiny.en", "--conditions", "peaks", "--exp", exp, "--data", data)
    assert r.returncode == 0, r.stderr[-3000:]
    assert stages_run(exp) == [0, 1, 2, 3]
    test = read_jsonl(data / "test" / "manifest.jsonl")
    assert [(x["id"], x["target"], x["lang"], x["target_lang"]) for x in test] == [
        ("common_voice_es_5", "The dog sleeps.", "es", "en"),
        ("common_voice_es_6", "I like reading.", "es", "en")]
    for s in ("train", "dev", "test"):
        assert os.path.exists(exp / "pooled" / "peaks" / s / "store.json"), s
    info = store_info(exp / "feats/frames/train")
    assert info["utterances"] == 3

    # stages 4-6: per task (st: translate, asr: transcribe) two LoRA steps, decodes, scores
    r = run("covost2", "--stage", 4, "--steps", 2, "--max_new_tokens", 4, "--cv_root", cv,
            "--covost_root", covost, "--src_lang", "es", "--tgt_lang", "en", "--backend",
            "whisper", "--model", "whisper-tiny.en", "--conditions", "peaks", "--exp", exp,
            "--data", data)
    assert r.returncode == 0, r.stderr[-3000:]
    for task, metric in (("st", "bleu"), ("asr", "wer")):
        assert json.loads((exp / "lora" / f"{task}-peaks" / "summary.json").read_text())["steps"] == 2
        for name in (f"{task}-peaks", f"{task}-peaks-lora"):
            dec = json.loads((exp / "decode" / name / "test" / "decode.json").read_text())
            assert (dec["utterances"], dec["condition"], dec["lora"]) == (
                2, f"{task}-peaks", name.endswith("-lora"))
            assert dec["backend_opts"]["task"] == ("translate" if task == "st" else "transcribe")
            res = json.loads((exp / "decode" / name / "test" / "results.json").read_text())
            assert res["metric"] == metric, name


@pytest.mark.slow
@pytest.mark.assets  # the recipe fetches whisper-tiny.en and SmolLM2
def test_mini_speechllm_smoke_run_end_to_end(tmp_path):
    """Every stage of the decoder-only recipe on a few utterances (real tiny.en and SmolLM2):
    align, CTC re-alignment, LoRA, decode and report give one row per condition and set."""
    exp = tmp_path / "exp"
    r = run("mini_speechllm", "--exp", exp, "--data", tmp_path / "data", "--n_train", 16,
            "--n_dev", 2, "--n_test", 4, "--align_steps", 3, "--realign_ctc_steps", 2,
            "--frame_steps", 3, "--realign_steps", 2, "--batch_size", 4, "--max_new_tokens", 8,
            "--conditions", "frames peaks")
    assert r.returncode == 0, r.stderr[-3000:]
    assert stages_run(exp) == [0, 1, 2, 3, 4, 5, 6, 7]
    with open(exp / "results.json") as fh:
        rows = json.load(fh)
    assert sorted((row["set"], row["condition"], row["lora"], row["sentences"]) for row in rows) == [
        ("librivox", "frames", True, 5), ("librivox", "frames (CTC greedy)", False, 5),
        ("librivox", "peaks-mean", True, 5), ("librivox", "peaks-mean (CTC greedy)", False, 5),
        ("test", "frames", True, 4), ("test", "frames (CTC greedy)", False, 4),
        ("test", "peaks-mean", True, 4), ("test", "peaks-mean (CTC greedy)", False, 4)]
    frames = {row["set"]: row["tokens_per_s"] for row in rows if row["condition"] == "frames"}
    peaks = {row["set"]: row["tokens_per_s"] for row in rows if row["condition"] == "peaks-mean"}
    # stack 4: 12.5 positions/s, a little more for the last, zero-padded group of short clips
    assert all(12.4 < frames[s] < 13.5 and peaks[s] < frames[s] / 2 for s in frames)
    assert (exp / "RESULTS.md").exists()
    assert (exp / "speechllm" / "peaks" / "speechllm.json").exists()


def test_recipes_find_the_project_venv_that_install_sh_makes(tmp_path):
    """On an externally managed system Python, install.sh installs into the project's .venv: a
    recipe run without PYTHON, whose python3 cannot import lalmtool, takes that interpreter."""
    import shutil

    shutil.copytree(os.path.join(REPO, "recipes", "utils"), tmp_path / "recipes" / "utils")
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    # a script, not a link: a link to a venv's python outside that venv loses the venv
    (venv / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "python").chmod(0o755)
    script = 'recipe=t; source recipes/utils/stages.sh && echo "$python"'
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                       env={**env, "PATH": fake_path(tmp_path)})
    assert (r.returncode, r.stdout) == (0, f"{venv}/python\n"), r.stderr
    good = tmp_path / "good"  # a python3 that has lalmtool is used as before
    good.mkdir()
    (good / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (good / "python3").chmod(0o755)
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                       env={**env, "PATH": f"{good}:{env['PATH']}"})
    assert r.stdout == f"{good}/python3\n", r.stderr
