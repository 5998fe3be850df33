"""Tests of lalmtool.report: rows, sorting, RESULTS.md, results.json, the plot, empty exp dirs."""
import json

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lalmtool.report import _plot_panel, lora_text, make_row, method_key, report  # noqa: E402
from lalmtool.score import score  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(*args) -> tuple[int, str]:
    """(exit code, output) of the command line, the output from its error line on."""
    from click.testing import CliRunner

    from lalmtool.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
    return r.exit_code, r.output[r.output.find("Error: "):] if r.exit_code else r.output


def put(exp, rel, res):
    d = exp / rel
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(res))


def wer_result(set_, method, params, tps, lora, wer, condition=None):
    return {"set": set_, "method": method, "params": params, "condition": condition or method,
            "tokens_per_s": tps, "compression_ratio": 50.0 / tps, "lora": lora,
            "adapter": "exp/lora/a" if lora else None, "feats": f"exp/feats/{method}",
            "model": "tiny.en", "utt_per_s": 3.0, "metric": "wer", "wer": wer,
            "normalizer": "whisper_english", "sentences": 20, "hyp": "/x/hyp.jsonl"}


@pytest.fixture
def exp(tmp_path):
    """An exp dir with WER runs on two sets and a BLEU run, plus a stale top-level report."""
    e = tmp_path / "exp"
    put(e, "decode/frames/test", wer_result("test", "frames", {}, 50.0, False, 2.63))
    put(e, "decode/frames_lora/test", wer_result("test", "frames", {}, 50.0, True, 0.047))
    put(e, "decode/mean2_lora/test",
        wer_result("test", "uniform", {"k": 2, "reduce": "mean"}, 25.0, True, 0.045, "uniform-mean-k2"))
    put(e, "decode/mean3_lora/test",
        wer_result("test", "uniform", {"k": 3, "reduce": "mean"}, 16.8, True, 0.047, "uniform-mean-k3"))
    put(e, "decode/pick3_lora/test",
        wer_result("test", "uniform", {"k": 3, "reduce": "pick"}, 16.8, True, 0.103, "uniform-pick-k3"))
    put(e, "decode/peaks/test", wer_result("test", "peaks", {}, 14.9, False, 2.63))
    put(e, "decode/mean3_lora/dev",
        wer_result("dev", "uniform", {"k": 3, "reduce": "mean"}, 16.5, True, 0.05, "uniform-mean-k3"))
    put(e, "decode/mean3_lora/covost", {
        "set": "covost", "method": "uniform", "params": {"k": 3, "reduce": "mean"},
        "tokens_per_s": 16.0, "compression_ratio": 3.1, "lora": True, "metric": "bleu",
        "bleu": 21.5, "chrf": 48.2,
        "bleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
        "chrf_signature": "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0"})
    (e / "results.json").write_text("[]")  # an earlier report's own output: not a run
    return e


def test_report_rows_table_and_plot(exp):
    rows = report(str(exp))
    assert len(rows) == 8
    keys = [(r["set"], r["tokens_per_s"]) for r in rows]
    assert keys == sorted(keys, key=lambda k: (k[0], -k[1]))
    assert [r["set"] for r in rows] == ["covost", "dev"] + ["test"] * 6
    test_rows = [r for r in rows if r["set"] == "test"]
    assert [r["method"] for r in test_rows] == [
        "frames", "frames", "uniform-mean", "uniform-mean", "uniform-pick", "peaks"]
    assert [r["lora"] for r in test_rows[:2]] == [False, True]
    assert test_rows[0]["wer_pct"] == pytest.approx(263.0)
    assert rows[0]["bleu"] == 21.5 and rows[0]["wer_pct"] is None

    on_disk = json.loads((exp / "results.json").read_text())
    assert on_disk == rows

    md = (exp / "RESULTS.md").read_text()
    assert "| # | set | method | condition | params | LoRA | tokens/s | ratio | WER % | BLEU | chrF |" in md
    assert "Columns:" in md
    assert "normalizer `whisper_english`" in md
    assert "tok:13a" in md and "nc:6" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and "| test |" in line]
    assert len(table) == 6
    assert "| 50.0 | 1.00× | 263.00 |" in table[0]
    assert "k=2, reduce=mean" in table[2]
    assert "## Where each row comes from" in md and "exp/feats/frames" in md

    png = (exp / "results.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_rerun_excludes_own_results_json(exp):
    first = report(str(exp))
    assert (exp / "results.json").exists()
    assert report(str(exp)) == first


def test_report_includes_results_written_by_score(tmp_path):
    exp = tmp_path / "exp"
    dec = exp / "decode" / "frames" / "test"
    dec.mkdir(parents=True)
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "u1", "audio": "a.wav", "text": "a b c d"}) + "\n")
    (dec / "hyp.jsonl").write_text(json.dumps({"id": "u1", "hyp": "a b c", "tokens": 100,
                                               "duration": 2.0, "seconds": 0.5}) + "\n")
    (dec / "decode.json").write_text(json.dumps({"set": "test", "method": "frames", "params": {},
                                                 "lora": False, "source_frame_rate": 50.0}))
    score(str(dec / "hyp.jsonl"), str(tmp_path / "m.jsonl"))
    rows = report(str(exp), plot=str(tmp_path / "plot.png"))
    assert len(rows) == 1
    r = rows[0]
    assert (r["set"], r["method"], r["lora"]) == ("test", "frames", False)
    assert r["wer_pct"] == pytest.approx(25.0)
    assert r["tokens_per_s"] == pytest.approx(50.0) and r["compression_ratio"] == pytest.approx(1.0)
    assert r["utt_per_s"] == pytest.approx(2.0)
    assert (tmp_path / "plot.png").read_bytes().startswith(PNG_MAGIC)


def test_report_on_empty_dir_is_an_error_and_writes_nothing(tmp_path):
    """R12: an empty experiment directory was reported (exit 0) as an empty table."""
    with pytest.raises(ValueError) as e:
        report(str(tmp_path))
    assert str(e.value) == (f"nothing to report under {tmp_path}: no results.json from "
                            "`lalmtool score` found; run the decode and score stages first")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_report_whose_only_result_is_damaged_names_it(tmp_path):
    """R12: a directory whose only results.json is damaged was reported as empty (exit 0)."""
    (tmp_path / "dec").mkdir()
    (tmp_path / "dec" / "results.json").write_text('{"wer": 0.1')
    (tmp_path / "results.json").write_text("[]")  # an earlier report's own output: not a run
    code, text = cli("report", tmp_path)
    assert (code, text) == (
        1, f"Error: nothing to report under {tmp_path}: 1 results.json found, none usable: "
           f"{tmp_path / 'dec' / 'results.json'} (not readable JSON: Expecting ',' delimiter: "
           "line 1 column 12 (char 11)); run `lalmtool score` again for it\n")


def test_report_on_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="experiment directory not found"):
        report(str(tmp_path / "nope"))


def test_report_skips_files_that_are_not_results(tmp_path):
    put(tmp_path, "a", {"set": "x", "note": "no metric here"})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text("{broken")
    put(tmp_path, "c", wer_result("x", "frames", {}, 50.0, False, 0.1))
    assert len(report(str(tmp_path))) == 1


def test_method_key():
    assert method_key({"method": "uniform", "params": {"k": 3, "reduce": "mean"}}) == "uniform-mean"
    assert method_key({"method": "uniform", "params": {"k": 3, "reduce": "pick"}}) == "uniform-pick"
    assert method_key({"method": "uniform-mean", "params": {"reduce": "mean"}}) == "uniform-mean"
    assert method_key({"method": "frames"}) == "frames"
    assert method_key({"condition": "peaks"}) == "peaks"
    assert method_key({}) == "unknown"


def test_row_tolerates_sparse_results():
    r = make_row("/e/decode/t/clean/results.json", {"wer": 0.1})
    assert r["set"] == "clean" and r["wer_pct"] == pytest.approx(10.0)
    assert r["tokens_per_s"] is None and r["lora"] is False


def test_plot_lines_solid_with_lora_dashed_without():
    rows = [make_row("/r.json", wer_result("t", "uniform", {"k": k, "reduce": "mean"}, 50.0 / k, lora, w))
            for k, lora, w in [(2, True, 0.05), (3, True, 0.06), (3, False, 2.8), (3, True, 0.9)]]
    rows[-1]["adapter_condition"] = "frames"  # the frame-level adapter, not re-aligned
    fig, ax = plt.subplots()
    _plot_panel(ax, "t", "wer", rows, {"uniform-mean": "C0"})
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"uniform-mean (LoRA)", "uniform-mean (no LoRA)",
                          "uniform-mean (LoRA: frames adapter)"}
    assert lines["uniform-mean (LoRA)"].get_linestyle() == "-"
    assert lines["uniform-mean (no LoRA)"].get_linestyle() == "--"
    assert lines["uniform-mean (LoRA: frames adapter)"].get_linestyle() == ":"
    # a single point is told apart by its marker too, not only by the line style
    assert [(lines[k].get_marker(), lines[k].get_fillstyle()) for k in
            ("uniform-mean (LoRA)", "uniform-mean (no LoRA)", "uniform-mean (LoRA: frames adapter)")
            ] == [("o", "full"), ("x", "full"), ("s", "none")]
    assert [lora_text(r) for r in rows] == ["yes", "yes", "no", "frames adapter"]
    assert list(lines["uniform-mean (LoRA)"].get_xdata()) == pytest.approx([50 / 3, 25.0])
    assert ax.get_xlabel() and ax.get_ylabel() == "WER (%)"
    plt.close(fig)


def test_results_md_starts_with_the_environment(exp):
    import platform
    import subprocess

    from importlib import metadata

    report(str(exp))
    md = (exp / "RESULTS.md").read_text()
    head = md.split("## Table")[0]
    assert f"torch {metadata.version('torch')}," in head
    assert f"python {platform.python_version()}" in head
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                            text=True, cwd=str(__import__("pathlib").Path(__file__).parent)).stdout.strip()
    assert f"- git commit: `{commit}`" in head
    assert "- date: 20" in head and " CPU cores" in head
