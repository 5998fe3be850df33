"""recipes/mini's equal-rate study: condition names → the segment/pool commands they run
(recipes/utils/stages.sh), rate control with --target-rate, the study's conditions and table,
the unseen-voices set's plan, and the report's per-method curves."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from conftest import frames_store
from lalmtool import segment as S  # noqa: E402
from lalmtool.pool import pool_store  # noqa: E402
from lalmtool.report import (_plot_method_panel, make_row, method_curves_markdown,  # noqa: E402
                             method_key, methods_plot_path, report)
from lalmtool.store import Store  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(REPO, "recipes", "mini")
sys.path.insert(0, os.path.join(MINI, "local"))
import rates_table  # noqa: E402


def stages(script: str, exp: str = "E", cpu_cmd: str = "echo") -> subprocess.CompletedProcess:
    """``script`` run after sourcing recipes/utils/stages.sh (commands echoed by default);
    the interpreter's path in the output reads PY, the experiment directory E."""
    src = (f'recipe=t stage=0 stop_stage=0 exp={exp} data=D; source recipes/utils/stages.sh; '
           f'cpu_cmd="{cpu_cmd}"; {script}')
    r = subprocess.run(["bash", "-c", src], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                            "PYTHONPATH": REPO})
    r.stdout = r.stdout.replace(sys.executable, "PY").replace(exp, "E")
    r.stderr = r.stderr.replace(exp, "E")
    return r


def seg_store_json(exp, seg: str, set_: str, threshold: float) -> None:
    """A boundary store's store.json as `lalmtool segment --target-rate` leaves it."""
    d = exp / "seg" / seg / set_
    d.mkdir(parents=True)
    (d / "store.json").write_text(json.dumps({"kind": "seg", "meta": {
        "method": seg.split("+")[-1].split("-")[0],
        "params": {"threshold": threshold, "target_rate": 5.0}}}))


# ------------------------------------------------------------- condition names → commands

def test_condition_names_give_these_segment_and_pool_commands(tmp_path):
    exp = tmp_path / "exp"  # thresholds that --target-rate picked on train
    seg_store_json(exp, "prominence-r5", "train", 0.11643573641777039)
    seg_store_json(exp, "scpc-r10", "train", 0.047195494174957275)
    seg_store_json(exp, "peaks+prominence-r10", "train", 0.0)
    conds = ("frames peaks uniform-mean-k3 uniform-pick-k3 prominence-mean-r5 scpc-mean-r10 "
             "scpc-pick-t0.1 uniform-mean-r5 peaks+uniform-mean-k3 peaks+prominence-mean-r10")
    r = stages(f'conditions="{conds}"; segment_sets test; echo ---; pool_sets test', exp=str(exp))
    assert r.returncode == 0, r.stderr
    seg, pool = (part.strip().splitlines() for part in r.stdout.split("---"))
    cmd = "PY -m lalmtool "
    assert seg == [
        cmd + "segment --feats E/feats/frames/test --method peaks --out E/seg/peaks/test",
        cmd + "segment --feats E/feats/frames/test --method uniform --k 3 --out E/seg/uniform-k3/test",
        # a rate's threshold: the one picked on train, applied to every other set
        cmd + "segment --feats E/feats/frames/test --method prominence "
              "--threshold 0.11643573641777039 --out E/seg/prominence-r5/test",
        cmd + "segment --feats E/feats/frames/test --method scpc "
              "--threshold 0.047195494174957275 --out E/seg/scpc-r10/test",
        cmd + "segment --feats E/feats/frames/test --method scpc --threshold 0.1 "
              "--out E/seg/scpc-t0.1/test",
        cmd + "segment --feats E/feats/frames/test --method uniform --target-rate 5 "
              "--out E/seg/uniform-r5/test",
    ]
    p = cmd + "pool --feats E/feats/frames/test --segments E/seg/"
    assert pool == [
        p + "peaks/test --reduce mean --out E/pooled/peaks/test",
        p + "uniform-k3/test --reduce mean --out E/pooled/uniform-mean-k3/test",
        p + "uniform-k3/test --reduce pick --out E/pooled/uniform-pick-k3/test",
        p + "prominence-r5/test --reduce mean --out E/pooled/prominence-mean-r5/test",
        p + "scpc-r10/test --reduce mean --out E/pooled/scpc-mean-r10/test",
        p + "scpc-t0.1/test --reduce pick --out E/pooled/scpc-pick-t0.1/test",
        p + "uniform-r5/test --reduce mean --out E/pooled/uniform-mean-r5/test",
        # a chained condition: its source pooled once, its own step over the source's tokens
        cmd + "segment --feats E/pooled/peaks/test --method uniform --k 3 "
              "--out E/seg/peaks+uniform-k3/test",
        cmd + "pool --feats E/pooled/peaks/test --segments E/seg/peaks+uniform-k3/test "
              "--reduce mean --out E/pooled/peaks+uniform-mean-k3/test",
        cmd + "segment --feats E/pooled/peaks/test --method prominence --threshold 0.0 "
              "--out E/seg/peaks+prominence-r10/test",
        cmd + "pool --feats E/pooled/peaks/test --segments E/seg/peaks+prominence-r10/test "
              "--reduce mean --out E/pooled/peaks+prominence-mean-r10/test",
    ]


def test_a_rate_is_picked_on_train_then_its_threshold_read_for_the_other_sets(tmp_path):
    exp = tmp_path / "exp"
    r = stages('conditions="prominence-mean-r5"; segment_sets train dev', exp=str(exp))
    assert r.stdout.splitlines() == [
        "PY -m lalmtool segment --feats E/feats/frames/train --method prominence "
        "--target-rate 5 --out E/seg/prominence-r5/train"]
    assert r.stderr == ("condition prominence-mean-r5: segment train first: its threshold for 5 "
                        "tokens/s (in E/seg/prominence-r5/train) is used for dev\n")
    seg_store_json(exp, "prominence-r5", "dev", 0.25)  # rate_set names the set that picks it
    r = stages('rate_set=dev conditions="prominence-mean-r5"; segment_sets dev test', exp=str(exp))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "PY -m lalmtool segment --feats E/feats/frames/dev --method prominence "
        "--target-rate 5 --out E/seg/prominence-r5/dev",
        "PY -m lalmtool segment --feats E/feats/frames/test --method prominence "
        "--threshold 0.25 --out E/seg/prominence-r5/test"]


def test_a_chained_condition_alone_segments_and_pools_its_source_first():
    r = stages('conditions="uniform-pick-k2+scpc-mean-r4"; segment_sets train; echo ---; '
               'pool_sets train')
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "PY -m lalmtool segment --feats E/feats/frames/train --method uniform --k 2 "
        "--out E/seg/uniform-k2/train",
        "---",
        "PY -m lalmtool pool --feats E/feats/frames/train --segments E/seg/uniform-k2/train "
        "--reduce pick --out E/pooled/uniform-pick-k2/train",
        "PY -m lalmtool segment --feats E/pooled/uniform-pick-k2/train --method scpc "
        "--target-rate 4 --out E/seg/uniform-pick-k2+scpc-r4/train",
        "PY -m lalmtool pool --feats E/pooled/uniform-pick-k2/train "
        "--segments E/seg/uniform-pick-k2+scpc-r4/train --reduce mean "
        "--out E/pooled/uniform-pick-k2+scpc-mean-r4/train",
    ]


def test_feature_store_and_segmentation_of_each_name():
    r = stages('for c in frames native peaks uniform-pick-k2 prominence-mean-r5 '
               'peaks+uniform-mean-k3 ctc-mean-blankjoin uniform-learnt-k10-kd; do '
               'echo "$c|$(feats_of $c test)|$(seg_of $c)|$(reduce_of $c)|$(cond_src $c)"; done')
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "frames|E/feats/frames/test|frames|mean|frames",
        "native|E/feats/native/test|native|mean|frames",
        "peaks|E/pooled/peaks/test|peaks|mean|frames",
        "uniform-pick-k2|E/pooled/uniform-pick-k2/test|uniform-k2|pick|frames",
        "prominence-mean-r5|E/pooled/prominence-mean-r5/test|prominence-r5|mean|frames",
        "peaks+uniform-mean-k3|E/pooled/peaks+uniform-mean-k3/test|peaks+uniform-k3|mean|peaks",
        "ctc-mean-blankjoin|E/pooled/ctc-mean-blankjoin/test|ctc-blankjoin|mean|frames",
        "uniform-learnt-k10-kd|E/pooled/uniform-learnt-k10-kd/test|uniform-k10|learnt|frames",
    ]


@pytest.mark.parametrize("name,message", [
    ("bogus", "condition bogus: not a condition name"),
    ("uniform-mean", "condition uniform-mean: uniform needs a parameter"),
    ("peaks-k3", "condition peaks-k3: peaks does not take k3"),
    ("prominence-mean-k3", "condition prominence-mean-k3: prominence does not take k3"),
    ("uniform-mean-t0.1", "condition uniform-mean-t0.1: uniform does not take t0.1"),
    ("uniform-mean-k0", "condition uniform-mean-k0: k must be >= 1"),
    ("peaks+ctc-mean-blankjoin", "condition peaks+ctc-mean-blankjoin: ctc cannot follow another"),
    ("bogus+uniform-mean-k3", "condition bogus: not a condition name"),
    ("uniform-mean-k10-kd", "condition uniform-mean-k10-kd: -kd (distillation) is for a learnt"),
])
def test_bad_condition_names_stop_the_stage_naming_them(name, message):
    r = stages(f'conditions="peaks {name}"; segment_sets test || echo "rc=$?"')
    assert r.stdout == "rc=1\n"  # nothing run, not even peaks
    assert r.stderr.startswith(message), r.stderr


def test_a_ctc_condition_trains_its_head_once_then_cuts_each_set_by_it():
    show = 'show() { echo "$@" >&2; }; cpu_cmd=show; model=M train_set=train dev_set=dev; '
    r = stages(show + 'conditions="ctc-mean-blankkeep"; segment_sets train test')
    assert r.returncode == 0, r.stderr
    align = ("PY -m lalmtool align --backend whisper --feats E/feats/frames/train --manifest "
             "D/train/manifest.jsonl --valid-feats E/feats/frames/dev --valid-manifest "
             "D/dev/manifest.jsonl --model M --out E/align/whisper")
    cut = ("PY -m lalmtool ctc segment --align E/align/whisper --feats E/feats/frames/{} "
           "--model M --blank keep --out E/seg/ctc-blankkeep/{}")
    # the head is trained by the first set's align; the next set's align finds it finished
    defaults = " --max-steps=400 --lr=3e-3 --valid-every=100 --save-every=100"
    assert r.stderr.replace(sys.executable, "PY").splitlines() == [
        align + defaults, cut.format("train", "train"), align + defaults,
        cut.format("test", "test")]
    r = stages(show + 'conditions="ctc-mean-blankjoin"; align_opts=(--max-steps=5 --patience=2); '
                      'ctc_backend=speechllm; segment_sets test')
    assert r.returncode == 0, r.stderr
    assert r.stderr.replace(sys.executable, "PY").splitlines()[0] == align.replace(
        "whisper", "speechllm") + " --max-steps=5 --patience=2"


def test_study_conditions_derived_from_the_rates():
    script = (f'source <(sed -n "/^rate_conditions_for()/,/^}}/p" {MINI}/run.sh); '
              'rate_conditions_for 5 10; echo; rate_conditions_for 3')
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "uniform-mean-k10 uniform-learnt-k10-kd prominence-mean-r5 scpc-mean-r5 "
        "peaks+prominence-mean-r5 peaks+uniform-mean-k3 uniform-mean-k5 uniform-learnt-k5-kd "
        "prominence-mean-r10 scpc-mean-r10",
        "uniform-mean-k17 uniform-learnt-k17-kd prominence-mean-r3 scpc-mean-r3 "
        "peaks+prominence-mean-r3 peaks+uniform-mean-k5",
    ]


def test_a_learnt_condition_trains_its_pooler_with_its_lora_then_pools_each_set_by_it(
        tmp_path):
    exp = tmp_path / "exp"
    run = ('gpu_cmd=echo model=M train_set=train dev_set=dev; '
           'conditions="uniform-learnt-k10-kd"; segment_sets test; echo ---; pool_sets test; '
           'echo ---; finetune_condition uniform-learnt-k10-kd uniform-learnt-k10-kd --config C '
           '|| echo "rc=$?"; echo ---; decode_condition uniform-learnt-k10-kd test L || '
           'echo "rc=$?"')
    r = stages(run, exp=str(exp))
    seg, pool, tune, dec = (part.strip() for part in r.stdout.split("---"))
    assert seg == ("PY -m lalmtool segment --feats E/feats/frames/test --method uniform --k 10 "
                   "--out E/seg/uniform-k10/test")
    assert pool == ""  # no pooler before its finetune
    assert (tune, dec) == ("rc=1", "rc=1")
    assert r.stderr.splitlines() == [
        "condition uniform-learnt-k10-kd distils from the adapter of frames: finetune frames "
        "first (list it before uniform-learnt-k10-kd in --conditions)",
        "condition uniform-learnt-k10-kd: finetune it first (stage 4 trains its pooler)"]
    for path in ("frames/adapter/adapter_config.json",
                 "uniform-learnt-k10-kd/adapter/pooler.safetensors"):
        (exp / "lora" / path).parent.mkdir(parents=True, exist_ok=True)
        (exp / "lora" / path).write_text("")
    r = stages(run, exp=str(exp))
    assert r.returncode == 0, r.stderr
    seg, pool, tune, dec = (part.strip().splitlines() for part in r.stdout.split("---"))
    learnt = "PY -m lalmtool pool --feats E/feats/frames/test --segments E/seg/uniform-k10/test " \
             "--reduce learnt --pooler E/lora/uniform-learnt-k10-kd/adapter " \
             "--out E/pooled/uniform-learnt-k10-kd/test"
    assert pool == [learnt]
    assert tune == [
        "PY -m lalmtool finetune --feats E/feats/frames/train --manifest D/train/manifest.jsonl "
        "--valid-feats E/feats/frames/dev --valid-manifest D/dev/manifest.jsonl "
        "--out E/lora/uniform-learnt-k10-kd --segments E/seg/uniform-k10/train "
        "--valid-segments E/seg/uniform-k10/dev --teacher E/lora/frames/adapter --distill 0.5 "
        "--config C"]
    assert dec == [learnt, "PY -m lalmtool decode --feats E/pooled/uniform-learnt-k10-kd/test "
                           "--set test --manifest D/test/manifest.jsonl --out E/decode/L/test"]
    # a store written by this pooler is pooled as before (the tool skips it); one written by
    # the pooler of an earlier run of the adapter is replaced (--force)
    store = exp / "pooled" / "uniform-learnt-k10-kd" / "test"
    store.mkdir(parents=True)
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256 of b""
    for sha, force in ((empty, ""), ("0" * 64, " --force")):
        (store / "store.json").write_text(json.dumps(
            {"kind": "pooled", "meta": {"pooler": {"identity": {"sha256": sha}}}}))
        r = stages('conditions="uniform-learnt-k10-kd"; pool_sets test', exp=str(exp))
        assert r.stdout.splitlines() == [learnt.replace(" --out", force + " --out")]


def test_a_chained_learnt_condition_cuts_its_source_tokens_then_trains_on_them(tmp_path):
    exp = tmp_path / "exp"
    (exp / "lora" / "peaks" / "adapter").mkdir(parents=True)
    (exp / "lora" / "peaks" / "adapter" / "adapter_config.json").write_text("")
    r = stages('gpu_cmd=echo model=M train_set=train dev_set=dev; '
               'finetune_condition peaks+uniform-learnt-k3-kd N', exp=str(exp))
    assert r.returncode == 0, r.stderr
    pool = "PY -m lalmtool pool --feats E/feats/frames/{0} --segments E/seg/peaks/{0} " \
           "--reduce mean --out E/pooled/peaks/{0}"
    cut = "PY -m lalmtool segment --feats E/pooled/peaks/{0} --method uniform --k 3 " \
          "--out E/seg/peaks+uniform-k3/{0}"
    assert r.stdout.splitlines() == [
        pool.format("train"), cut.format("train"), pool.format("dev"), cut.format("dev"),
        "PY -m lalmtool finetune --feats E/pooled/peaks/train --manifest D/train/manifest.jsonl "
        "--valid-feats E/pooled/peaks/dev --valid-manifest D/dev/manifest.jsonl --out E/lora/N "
        "--segments E/seg/peaks+uniform-k3/train --valid-segments E/seg/peaks+uniform-k3/dev "
        "--teacher E/lora/peaks/adapter --distill 0.5"]


def test_a_failed_pool_stops_the_stage():
    r = stages('conditions="uniform-mean-k3 peaks"; pool_sets test || echo "rc=$?"',
               cpu_cmd="false")
    assert r.stdout == "rc=1\n"


# ------------------------------------------------------------- rate control

def tokens_per_s(store: str) -> float:
    st = Store(store)
    tokens = sum(len(st.dataset(u)) for u in st.ids)
    return tokens / sum(float(st.attrs(u)["duration"]) for u in st.ids)


@pytest.mark.parametrize("method", ["prominence", "scpc"])
@pytest.mark.parametrize("rate", [5.0, 10.0])
def test_target_rate_reaches_the_rate_within_5_percent(tmp_path, method, rate):
    feats = frames_store(tmp_path / "frames")
    assert tokens_per_s(feats) == 50.0
    seg = str(tmp_path / "seg")
    S.segment(feats, method, seg, target_rate=rate)
    pool_store(feats, seg, "mean", str(tmp_path / "pooled"))
    got = tokens_per_s(str(tmp_path / "pooled"))
    assert abs(got - rate) <= 0.05 * rate, got
    assert Store(seg).meta["params"]["target_rate"] == rate


def test_a_rate_condition_of_the_recipe_makes_stores_at_its_rate(tmp_path):
    exp = tmp_path / "exp"
    frames_store(exp / "feats" / "frames" / "train", seed=0)
    frames_store(exp / "feats" / "frames" / "test", seed=1)
    r = stages('conditions="prominence-mean-r5"; segment_sets train test > /dev/null && '
               'pool_sets train test > /dev/null && echo done', exp=str(exp), cpu_cmd="")
    assert r.returncode == 0 and r.stdout == "done\n", r.stderr
    train, test = (exp / "pooled" / "prominence-mean-r5" / s for s in ("train", "test"))
    assert abs(tokens_per_s(str(train)) - 5.0) <= 0.25
    seg_train, seg_test = (Store(str(exp / "seg" / "prominence-r5" / s)) for s in ("train", "test"))
    threshold = seg_train.meta["params"]["threshold"]
    assert seg_test.meta["params"] == {"threshold": threshold}  # train's, not test's own
    frames = Store(str(exp / "feats" / "frames" / "test"))
    assert sum(len(Store(str(test)).dataset(u)) for u in frames.ids) == sum(
        len(S.prominence(frames[u].astype(np.float32), threshold)) for u in frames.ids)
    assert Store(str(test)).meta["method"] == "prominence"


def test_peaks_tokens_pooled_by_3_are_a_third_of_the_peaks_tokens(tmp_path):
    feats = frames_store(tmp_path / "frames")
    S.segment(feats, "peaks", str(tmp_path / "seg_peaks"))
    pool_store(feats, str(tmp_path / "seg_peaks"), "mean", str(tmp_path / "peaks"))
    S.segment(str(tmp_path / "peaks"), "uniform", str(tmp_path / "seg_k3"), k=3)
    pool_store(str(tmp_path / "peaks"), str(tmp_path / "seg_k3"), "mean", str(tmp_path / "chain"))
    src, out = Store(feats), Store(str(tmp_path / "chain"))
    expected = sum(math.ceil(len(S.peaks(src[u].astype(np.float32))) / 3) for u in src.ids)
    assert sum(len(out.dataset(u)) for u in out.ids) == expected
    assert out.meta["source_frame_rate"] == 50.0


# ------------------------------------------------------------- report

def wer_res(set_, method, params, condition, tps, wer, lora=True):
    return {"set": set_, "method": method, "params": params, "condition": condition,
            "tokens_per_s": tps, "compression_ratio": 50.0 / tps, "lora": lora,
            "adapter": "exp/lora/a" if lora else None, "metric": "wer", "wer": wer,
            "normalizer": "whisper_english", "sentences": 10, "hyp": "/x/hyp.jsonl"}


def test_chained_condition_is_its_own_method():
    assert method_key({"method": "uniform", "params": {"k": 3, "reduce": "mean"},
                       "condition": "peaks+uniform-mean-k3"}) == "peaks+uniform-mean"
    assert method_key({"method": "prominence", "params": {"threshold": 0.2, "target_rate": 10,
                                                          "reduce": "mean"},
                       "condition": "peaks+prominence-mean-r10"}) == "peaks+prominence-mean"
    # not chained: the store's method and reducer, whatever the label
    assert method_key({"method": "prominence", "params": {"threshold": 0.2, "target_rate": 5,
                                                          "reduce": "mean"},
                       "condition": "prominence-mean-r5"}) == "prominence-mean"


def curve_rows():
    k = {"reduce": "mean"}
    return [make_row("/r.json", res) for res in (
        wer_res("test", "uniform", {**k, "k": 3}, "uniform-mean-k3", 16.8, 0.1711),
        wer_res("test", "uniform", {**k, "k": 10}, "uniform-mean-k10", 5.2, 0.2440),
        wer_res("test", "uniform", {**k, "k": 5}, "uniform-mean-k5", 10.2, 0.1893),
        wer_res("test", "uniform", {**k, "k": 3}, "uniform-mean-k3", 16.8, 4.801, lora=False),
        wer_res("test", "prominence", {**k, "threshold": 0.3, "target_rate": 5},
                "prominence-mean-r5", 5.0, 0.25),
        wer_res("test", "uniform", {**k, "k": 3}, "peaks+uniform-mean-k3", 5.05, 0.30),
        wer_res("unseen", "uniform", {**k, "k": 10}, "uniform-mean-k10", 5.1, 0.0431),
    )]


def test_results_md_lists_each_methods_curve():
    assert method_curves_markdown(curve_rows()) == [
        "## Error rate against tokens/s, per method", "",
        "Each method's points on each set, from the highest rate to the lowest, as "
        "`tokens/s: WER %` (or BLEU); the curves of results.png and results_methods.png.",
        "", "### test (WER %)", "", "| method | LoRA | points (tokens/s: WER %) |", "|---|---|---|",
        "| peaks+uniform-mean | yes | 5.0: 30.00 |",
        "| prominence-mean | yes | 5.0: 25.00 |",
        "| uniform-mean | no | 16.8: 480.10 |",
        "| uniform-mean | yes | 16.8: 17.11; 10.2: 18.93; 5.2: 24.40 |",
        "", "### unseen (WER %)", "", "| method | LoRA | points (tokens/s: WER %) |", "|---|---|---|",
        "| uniform-mean | yes | 5.1: 4.31 |",
    ]


def test_methods_plot_has_one_line_per_set_in_each_method_panel():
    rows = [r for r in curve_rows() if r["method"] == "uniform-mean"]
    fig, ax = plt.subplots()
    lines = [("test", "no", [rows[3]]), ("test", "yes", rows[:3]), ("unseen", "yes", [rows[4]])]
    _plot_method_panel(ax, "uniform-mean", "wer", lines, {"test": "C0", "unseen": "C1"})
    got = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()),
                              line.get_linestyle()) for line in ax.get_lines()}
    plt.close(fig)
    assert got == {"test (no LoRA)": ([16.8], [pytest.approx(480.1)], "--"),
                   "test (LoRA)": ([5.2, 10.2, 16.8], [pytest.approx(24.4), pytest.approx(18.93),
                                                      pytest.approx(17.11)], "-"),
                   "unseen (LoRA)": ([5.1], [pytest.approx(4.31)], "-")}


def test_report_writes_the_methods_plot_and_section(tmp_path):
    exp = tmp_path / "exp"
    for i, res in enumerate((
            wer_res("test", "uniform", {"k": 5, "reduce": "mean"}, "uniform-mean-k5", 10.2, 0.19),
            wer_res("test", "uniform", {"k": 3, "reduce": "mean"}, "peaks+uniform-mean-k3", 5.0,
                    0.3))):
        (exp / f"d{i}").mkdir(parents=True)
        (exp / f"d{i}" / "results.json").write_text(json.dumps(res))
    rows = report(str(exp))
    assert [r["method"] for r in rows] == ["uniform-mean", "peaks+uniform-mean"]
    assert (exp / "results_methods.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    md = (exp / "RESULTS.md").read_text()
    assert "| peaks+uniform-mean | yes | 5.0: 30.00 |\n| uniform-mean | yes | 10.2: 19.00 |" in md
    assert methods_plot_path("/a/results.png") == "/a/results_methods.png"


# ------------------------------------------------------------- the study's table

def put_decode(exp, name, set_, tps, wer_pct, words):
    d = exp / "decode" / name / set_
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"tokens_per_s": tps, "wer_pct": wer_pct,
                                                "ref_words": words}))


def test_rates_table_checks_the_target(tmp_path):
    exp = tmp_path / "exp"
    for name, test, unseen in [("native", (544.0, 30.15), (544.0, 10.0)),
                               ("uniform-mean-k10-lora", (5.2, 24.40), (5.2, 12.0)),
                               ("prominence-mean-r5-lora", (5.0, 20.0), (5.0, 10.9)),
                               ("scpc-mean-r5-lora", (5.6, 20.0), (5.0, 11.5)),
                               ("uniform-learnt-k10-kd-lora", (5.2, 21.0), (5.2, 9.5)),
                               ("frames-lora", (50.1, 18.79), (50.2, 9.0))]:
        put_decode(exp, name, "test", *test, 1000)
        put_decode(exp, name, "unseen", *unseen, 316)
    (exp / "lora" / "uniform-learnt-k10-kd").mkdir(parents=True)
    (exp / "lora" / "uniform-learnt-k10-kd" / "summary.json").write_text(json.dumps(
        {"steps": 300, "pooler": {"dim": 384, "heads": 8, "rank": 64, "width": 10,
                                  "parameters": 273496}}))
    out = tmp_path / "rates.md"
    assert rates_table.main(["--exp", str(exp), "--sets", "test", "unseen", "--conditions",
                             "frames", "uniform-mean-k10", "prominence-mean-r5", "scpc-mean-r5",
                             "uniform-learnt-k10-kd", "peaks", "--out", str(out)]) == 0
    assert out.read_text().splitlines() == [
        "| condition | tokens/s test | tokens/s unseen | WER % test (1000 words) | "
        "WER % unseen (316 words) | unseen WER / native's | target (<= 5.5 tokens/s, "
        "unseen <= 1.1x native, test <= uniform-mean-k10) | learnt compressor |",
        "|---|---:|---:|---:|---:|---:|---|---|",
        "| native | 544.0 | 544.0 | 30.15 | 10.00 | 1.00x | – | – |",
        "| frames + LoRA | 50.1 | 50.2 | 18.79 | 9.00 | 0.90x | no: 50.2 tokens/s | – |",
        "| scpc-mean-r5 + LoRA | 5.6 | 5.0 | 20.00 | 11.50 | 1.15x | "
        "no: 5.6 tokens/s, unseen 1.15x native | – |",
        "| uniform-mean-k10 + LoRA | 5.2 | 5.2 | 24.40 | 12.00 | 1.20x | no: unseen 1.20x native "
        "| – |",
        "| uniform-learnt-k10-kd + LoRA | 5.2 | 5.2 | 21.00 | 9.50 | 0.95x | yes | 273,496 "
        "parameters, 300 steps with the LoRA |",
        "| prominence-mean-r5 + LoRA | 5.0 | 5.0 | 20.00 | 10.90 | 1.09x | yes | – |",
    ]


# ------------------------------------------------------------- the unseen-voices set

def test_unseen_set_voices_and_sentences_are_in_no_training_set():
    import prepare_data
    import tts

    args = argparse.Namespace(n_train=1000, n_dev=100, n_test=100, n_unseen=36, seed=0,
                              flite_share=tts.FLITE_SHARE)
    plans = prepare_data.plan_sets(args, list(tts.FLITE_VOICES))
    unseen = plans["unseen"]
    assert len(unseen) == 36 and unseen[0]["id"] == "mini-unseen-00000"
    trained = {it["voice"].speaker for it in plans["train"]}
    assert {it["voice"].speaker for it in unseen} == {
        "espeak:en-us+f4", "espeak:en-gb+david", "espeak:en-us+belinda", "espeak:en-gb+f1",
        "espeak:en-gb-x-rp+anika", "espeak:en-us-nyc+m3", "flite:kal"}
    assert not trained & {it["voice"].speaker for it in unseen}
    for v in prepare_data.UNSEEN_VOICES:  # tts.random_voice can never draw them
        if v.engine == "flite":
            assert v.name not in tts.FLITE_VOICES
        else:
            accent, variant = v.name.split("+")
            assert accent not in tts.ESPEAK_ACCENTS or variant not in tts.ESPEAK_VARIANTS
    held = {it["text"] for name in ("train", "dev", "test") for it in plans[name]}
    assert not held & {it["text"] for it in unseen}
    assert all(7 <= len(it["text"].split()) <= 20 for it in unseen)
    # the sentences do not depend on the training size (they follow room for 5000)
    small = prepare_data.plan_sets(argparse.Namespace(**{**vars(args), "n_train": 20}),
                                   list(tts.FLITE_VOICES))["unseen"]
    assert [it["text"] for it in small] == [it["text"] for it in unseen]
