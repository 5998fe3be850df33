"""Report: one table and one plot over every scored run of an experiment directory.

``report(exp_dir)`` collects each ``results.json`` written by ``lalmtool score`` under
``exp_dir`` (recursively; the report's own top-level ``results.json`` is left out) into one row:
set, method, condition, parameters, LoRA yes/no, audio tokens/s fed to the decoder, compression
ratio, WER (%) or BLEU/chrF, decode speed (utt/s), and where the numbers come from (hyp file,
feature store, model, adapter). It writes

  * ``RESULTS.md``: markdown tables (sorted by set, then tokens/s descending), scoring noted;
  * ``results.json``: the rows as a list;
  * ``results.png``: error rate (WER %, or BLEU) against tokens/s, one subplot per set, one line
    per method (the same method at different rates joined), solid with LoRA, dashed without;
  * ``results_methods.png``: the same points the other way round: one subplot per method, one
    line per set, so each method's whole curve over its rates is seen on every set at once.

RESULTS.md also lists each method's curve as numbers ("per method"): for every set, one line
per method and LoRA with its points ``tokens/s: error`` from the highest rate to the lowest.
A condition that compresses another condition's tokens (``peaks+uniform-mean-k3``: the peaks
tokens pooled by 3) is its own method (``peaks+uniform-mean``), not the method of its last step.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import re
import subprocess

from .fileio import atomic_path, file_sha256, write_atomic
from .score import json_text, readable

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- collecting rows

def find_results(exp_dir: str, exclude: list[str] = ()) -> list[str]:
    """Every results.json under ``exp_dir`` (sorted), except the paths in ``exclude``."""
    skip = {os.path.abspath(p) for p in exclude}
    found = []
    for root, dirs, files in os.walk(exp_dir):
        dirs.sort()
        if "results.json" in files:
            path = os.path.abspath(os.path.join(root, "results.json"))
            if path not in skip:
                found.append(path)
    return sorted(found)


def load_result(path: str) -> tuple[dict | None, str | None]:
    """A score stage's results.json as ``(result, None)``, or ``(None, why it is not one)``."""
    try:
        with open(path, encoding="utf-8") as fh:
            res = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"not readable JSON: {e}"
    if not isinstance(res, dict):  # e.g. another report's list of rows
        return None, "not a score result (a JSON object is expected)"
    if res.get("wer") is None and res.get("bleu") is None:
        return None, "it has neither 'wer' nor 'bleu'"
    hyp, scored = res.get("hyp"), res.get("hyp_sha256")
    if scored and isinstance(hyp, str) and (not os.path.exists(hyp) or file_sha256(hyp) != scored):
        return None, (f"it scored other hypotheses than {hyp} holds now (decoded again since, "
                      "or removed)")
    return res, None


#: a condition's last parameter (uniform's k, a target rate, a threshold), dropped from a
#: chained condition's name to name its method
_LAST_PARAM = re.compile(r"-(k\d+|r\d+(\.\d+)?|t\d+(\.\d+)?)$")


def method_key(res: dict) -> str:
    """The method a result belongs to, for grouping: decode.json's ``method`` plus
    ``params.reduce`` when present (``uniform`` + ``mean`` → ``uniform-mean``); a chained
    condition (``SOURCE+STEP``, e.g. ``peaks+uniform-mean-k3``) is its name without the last
    step's parameter (``peaks+uniform-mean``)."""
    condition = res.get("condition")
    if isinstance(condition, str) and "+" in condition:
        return _LAST_PARAM.sub("", condition)
    method = res.get("method") or condition or "unknown"
    params = res.get("params") if isinstance(res.get("params"), dict) else {}
    reduce = params.get("reduce")
    if reduce and not str(method).endswith(f"-{reduce}"):
        method = f"{method}-{reduce}"
    return str(method)


def format_params(params) -> str:
    """``{"k": 3, "reduce": "mean"}`` → ``k=3, reduce=mean``."""
    if not params:
        return ""
    if not isinstance(params, dict):
        return str(params)
    return ", ".join(f"{k}={v if not isinstance(v, (dict, list)) else json.dumps(v)}"
                     for k, v in sorted(params.items()))


def make_row(path: str, res: dict) -> dict:
    """One report row from a results.json (``path``) and its content."""
    metric = res.get("metric") or ("wer" if res.get("wer") is not None else "bleu")
    wer_pct = res.get("wer_pct")
    if wer_pct is None and res.get("wer") is not None:
        wer_pct = 100 * res["wer"]
    return {
        "set": str(res.get("set") or os.path.basename(os.path.dirname(path))),
        "method": method_key(res),
        "condition": res.get("condition"),
        "params": format_params(res.get("params")),
        "lora": bool(res.get("lora") if res.get("lora") is not None else res.get("adapter")),
        "adapter_condition": res.get("adapter_condition"),
        "tokens_per_s": _num(res.get("tokens_per_s")),
        "compression_ratio": _num(res.get("compression_ratio")),
        "metric": metric,
        "wer_pct": _num(wer_pct) if metric == "wer" else None,
        "bleu": _num(res.get("bleu")) if metric == "bleu" else None,
        "chrf": _num(res.get("chrf")) if metric == "bleu" else None,
        "utt_per_s": _num(res.get("utt_per_s")),
        "sentences": res.get("sentences", res.get("utterances")),
        # references without a hypothesis, scored as empty ones (`score --missing empty`)
        "missing_hyps": res.get("missing_hyps") if isinstance(res.get("missing_hyps"), int)
        and not isinstance(res.get("missing_hyps"), bool) else 0,
        "normalizer": res.get("normalizer") if metric == "wer" else None,
        "bleu_signature": res.get("bleu_signature"),
        "chrf_signature": res.get("chrf_signature"),
        "model": res.get("model"),
        "backend": res.get("backend"),
        "feats": res.get("feats"),
        "adapter": res.get("adapter"),
        "hyp": res.get("hyp"),
        "results": path,
    }


def _num(v) -> float | None:
    """A finite number or None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def lora_text(row: dict) -> str:
    """``no``, ``yes`` (an adapter trained on these features' condition) or ``<condition>
    adapter`` (trained on another condition's features: not re-aligned to these)."""
    if not row["lora"]:
        return "no"
    return f"{row['adapter_condition']} adapter" if row.get("adapter_condition") else "yes"


def sort_rows(rows: list[dict]) -> list[dict]:
    """By set, then tokens/s descending (unknown last), then method, LoRA after no-LoRA."""
    return sorted(rows, key=lambda r: (r["set"], r["tokens_per_s"] is None,
                                       -(r["tokens_per_s"] or 0.0), r["method"], r["lora"]))


# --------------------------------------------------------------------------- markdown

def _fmt(v, digits: int = 2, suffix: str = "") -> str:
    """A number with ``digits`` decimals, or an en dash when unknown."""
    return "–" if v is None else f"{v:.{digits}f}{suffix}"


def _rel(path: str | None, base: str) -> str:
    """``path`` relative to ``base`` when it lies under it, else as recorded; '–' when None."""
    if not path:
        return "–"
    ab = os.path.abspath(path)
    if ab.startswith(os.path.abspath(base) + os.sep):
        return os.path.relpath(ab, base)
    return path


def _md_cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ") or "–"


def to_markdown(rows: list[dict], exp_dir: str) -> str:
    """RESULTS.md: a header saying what each column is, the results table, scoring notes, paths."""
    has_wer = any(r["metric"] == "wer" for r in rows)
    has_bleu = any(r["metric"] == "bleu" for r in rows)
    sigs: list[str] = []
    for r in rows:
        if r["metric"] == "bleu" and _signature(r) not in sigs:
            sigs.append(_signature(r))

    lines = [
        "# Results", "", *environment_lines(exp_dir), "",
        f"{len(rows)} scored run(s) under `{exp_dir}`, collected by `lalmtool report`; sorted by "
        "set, then tokens/s (descending).", "",
        "Columns: **#** row (paths in the second table); **set** evaluation set; **method** "
        "compression method (`frames` = uncompressed encoder frames, `uniform-mean` = average "
        "pooling, `uniform-pick` = downsampling, `uniform-learnt` = a pooling learnt with the "
        "LoRA, `peaks` = segmentation at cosine-distance peaks); "
        "**condition** the decode stage's label; **params** compression parameters; **LoRA** "
        "whether the decoder ran with a LoRA adapter (`<condition> adapter`: one trained on "
        "another condition's features, i.e. not re-aligned to these); **tokens/s** audio tokens "
        "per second of audio fed to the decoder; **ratio** compression ratio (encoder frame rate / tokens/s); "
        + ("**WER %** word error rate in percent, lower is better, after the normalizer named "
           "in **scoring**; " if has_wer else "")
        + ("**BLEU**, **chrF** sacrebleu corpus scores, higher is better, signatures below; "
           if has_bleu else "")
        + "**utt/s** decode speed in utterances per second; **utts** utterances scored "
        "(`N (M missing)`: M of them had no hypothesis and were scored as empty ones, see the "
        "note under the table).",
        "",
    ]
    head = ["#", "set", "method", "condition", "params", "LoRA", "tokens/s", "ratio"]
    head += ["WER %"] if has_wer else []
    head += ["BLEU", "chrF"] if has_bleu else []
    head += ["utt/s", "utts", "scoring"]
    lines += ["| " + " | ".join(head) + " |",
              "|" + "|".join("---:" if h in ("#", "tokens/s", "ratio", "WER %", "BLEU", "chrF",
                                              "utt/s", "utts") else "---" for h in head) + "|"]
    for i, r in enumerate(rows, 1):
        cells = [str(i), r["set"], r["method"], r["condition"] or "–", r["params"] or "–",
                 lora_text(r), _fmt(r["tokens_per_s"], 1),
                 _fmt(r["compression_ratio"], 2, "×")]
        if has_wer:
            cells.append(_fmt(r["wer_pct"]))
        if has_bleu:
            cells += [_fmt(r["bleu"]), _fmt(r["chrf"])]
        if r["metric"] == "wer":
            scoring = f"WER, normalizer `{r['normalizer'] or 'unknown'}`"
        else:
            scoring = f"sacrebleu [{_sig_index(r, sigs)}]"
        utts = str(r["sentences"] if r["sentences"] is not None else "–")
        if r.get("missing_hyps"):
            utts += f" ({r['missing_hyps']} missing)"
        cells += [_fmt(r["utt_per_s"], 3), utts, scoring]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    incomplete = [(i, r) for i, r in enumerate(rows, 1) if r.get("missing_hyps")]
    if incomplete:
        lines += ["", "**Incomplete decodes**: " + "; ".join(
            f"row {i}: {r['missing_hyps']} of {r['sentences']} utterances had no hypothesis"
            for i, r in incomplete) + ". They were scored as empty hypotheses (`lalmtool score "
            "--missing empty`), so these scores are not those of a complete "
            "decode; decode the missing utterances and score again."]
    if sigs:
        lines += ["", "Signatures:", ""] + [f"- [{k}] {s}" for k, s in enumerate(sigs, 1)]
    lines += ["", *method_curves_markdown(rows)]
    lines += ["", "## Where each row comes from", "",
              "| # | hyp | feature store | model | adapter |", "|---:|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        cells = [str(i), _rel(r["hyp"], exp_dir), _rel(r["feats"], exp_dir),
                 r["model"] or "–", _rel(r["adapter"], exp_dir)]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def method_curves(rows: list[dict]) -> dict[tuple[str, str], list[tuple[str, str, list[dict]]]]:
    """Each method's curve on each set: ``{(set, metric): [(method, LoRA text, rows), ...]}``,
    methods sorted by name (LoRA after no LoRA), each method's rows by tokens/s descending;
    rows without tokens/s or a score are left out."""
    curves: dict[tuple[str, str], dict[tuple[str, str], list[dict]]] = {}
    for r in rows:
        if r["tokens_per_s"] is None or _value(r) is None:
            continue
        curves.setdefault((r["set"], r["metric"]), {}).setdefault(
            (r["method"], lora_text(r)), []).append(r)
    return {key: [(m, lora, sorted(pts, key=lambda r: -r["tokens_per_s"]))
                  for (m, lora), pts in sorted(by.items(), key=lambda kv: (
                      kv[0][0], kv[0][1] != "no", kv[0][1]))]
            for key, by in sorted(curves.items())}


def method_curves_markdown(rows: list[dict]) -> list[str]:
    """RESULTS.md's "per method" section: one table per set, one line per method and LoRA, its
    points ``tokens/s: WER`` (or BLEU) from the highest rate to the lowest."""
    curves = method_curves(rows)
    if not curves:
        return []
    lines = ["## Error rate against tokens/s, per method", "",
             "Each method's points on each set, from the highest rate to the lowest, as "
             "`tokens/s: WER %` (or BLEU); the curves of results.png and results_methods.png."]
    for (set_name, metric), methods in curves.items():
        label = "WER %" if metric == "wer" else "BLEU"
        lines += ["", f"### {set_name} ({label})", "", "| method | LoRA | points (tokens/s: "
                  f"{label}) |", "|---|---|---|"]
        for method, lora, pts in methods:
            points = "; ".join(f"{_fmt(r['tokens_per_s'], 1)}: {_fmt(_value(r))}" for r in pts)
            lines.append("| " + " | ".join(_md_cell(c) for c in (method, lora, points)) + " |")
    return lines


def environment() -> dict:
    """What produced the results: versions, git commit of the code, date and machine."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for pkg in ("lalmtool", "torch", "transformers", "peft", "jiwer", "sacrebleu"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores"
    try:
        import torch

        if torch.cuda.is_available():
            machine += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return {"versions": versions, "git_commit": commit or "unknown",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine}


def environment_lines(exp_dir: str) -> list[str]:
    """RESULTS.md's environment block."""
    env = environment()
    return ["## Environment", "",
            "- date: " + env["date"],
            "- git commit: `" + env["git_commit"] + "`",
            "- machine: " + env["machine"],
            "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
            f"- experiment directory: `{exp_dir}`",
            "", "## Table"]


def _signature(row: dict) -> str:
    """A BLEU row's sacrebleu signatures, as noted under the table."""
    return f"BLEU `{row['bleu_signature']}`, chrF `{row['chrf_signature']}`"


def _sig_index(row: dict, sigs: list[str]) -> int:
    """1-based number of a BLEU row's signature pair in the notes under the table."""
    return sigs.index(_signature(row)) + 1


# --------------------------------------------------------------------------- plot

def plot_rows(rows: list[dict], path: str) -> bool:
    """Error rate (WER %, or BLEU) against tokens/s; one subplot per set (and metric), one line
    per method, solid with LoRA, dashed without. Returns False when no row can be plotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r["tokens_per_s"] is not None and _value(r) is not None]
    if not points:
        return False
    panels: dict[tuple[str, str], list[dict]] = {}
    for r in points:
        panels.setdefault((r["set"], r["metric"]), []).append(r)
    methods = sorted({r["method"] for r in points})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}

    _save_panels(path, sorted(panels.items()),
                 lambda ax, key, prs: _plot_panel(ax, *key, prs, colours))
    return True


def _save_panels(path: str, panels: list[tuple], draw) -> None:
    """A figure of ``panels`` (key, value), three per row, each drawn by ``draw(ax, key,
    value)``, written to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.5 * ncol, 4.2 * nrow), squeeze=False)
    for ax, (key, value) in zip(axes.flat, panels):
        draw(ax, key, value)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)


def _value(row: dict) -> float | None:
    """The plotted number: WER % or BLEU."""
    return row["wer_pct"] if row["metric"] == "wer" else row["bleu"]


# line style, marker and marker fill for LoRA ("yes"), no LoRA ("no"), another condition's adapter
LORA_STYLE = {"yes": ("-", "o", "full"), "no": ("--", "x", "full"), "other": (":", "s", "none")}


def _plot_panel(ax, set_name: str, metric: str, rows: list[dict], colours: dict) -> None:
    """One set's lines: a line per (method, LoRA) (per model too when the set has several)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    several_models = len({r["model"] for r in rows}) > 1
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["method"], lora_text(r), r["model"] if several_models else None)
        lines.setdefault(key, []).append(r)
    for (method, lora, model), pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
        pts = sorted(pts, key=lambda r: r["tokens_per_s"])
        kind = {"yes": "LoRA", "no": "no LoRA"}.get(lora, f"LoRA: {lora}")
        label = f"{method} ({kind})" + (f" {model}" if model else "")
        linestyle, marker, fill = LORA_STYLE.get(lora, LORA_STYLE["other"])
        ax.plot([r["tokens_per_s"] for r in pts], [_value(r) for r in pts],
                linestyle=linestyle, marker=marker, fillstyle=fill, markersize=7,
                color=colours[method], label=label)
    xs = [r["tokens_per_s"] for r in rows]
    if min(xs) > 0 and max(xs) / min(xs) > 8:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ys = [_value(r) for r in rows if _value(r) is not None and _value(r) > 0]
    if metric == "wer" and ys and max(ys) / min(ys) > 20:  # broken decoders next to good ones
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(f"{set_name} ({'WER' if metric == 'wer' else 'BLEU'})")
    ax.set_xlabel("audio tokens/s fed to the decoder")
    ax.set_ylabel("WER (%)" if metric == "wer" else "BLEU")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def plot_methods(rows: list[dict], path: str) -> bool:
    """One subplot per method (and metric), one line per set (per LoRA kind too), error rate
    against tokens/s: each method's curve over its rates on every set. Returns False when no
    row can be plotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = method_curves(rows)
    panels: dict[tuple[str, str], list[tuple[str, str, list[dict]]]] = {}
    for (set_name, metric), methods in curves.items():
        for method, lora, pts in methods:
            panels.setdefault((method, metric), []).append((set_name, lora, pts))
    if not panels:
        return False
    sets = sorted({set_name for set_name, _ in curves})
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(sets)}
    _save_panels(path, sorted(panels.items()),
                 lambda ax, key, lines: _plot_method_panel(ax, *key, lines, colours))
    return True


def _plot_method_panel(ax, method: str, metric: str, lines: list[tuple[str, str, list[dict]]],
                       colours: dict) -> None:
    """One method's lines: one per set and LoRA kind, points by tokens/s."""
    for set_name, lora, pts in lines:
        pts = sorted(pts, key=lambda r: r["tokens_per_s"])
        kind = {"yes": "LoRA", "no": "no LoRA"}.get(lora, f"LoRA: {lora}")
        linestyle, marker, fill = LORA_STYLE.get(lora, LORA_STYLE["other"])
        ax.plot([r["tokens_per_s"] for r in pts], [_value(r) for r in pts],
                linestyle=linestyle, marker=marker, fillstyle=fill, markersize=7,
                color=colours[set_name], label=f"{set_name} ({kind})")
    ax.set_title(f"{method} ({'WER' if metric == 'wer' else 'BLEU'})")
    ax.set_xlabel("audio tokens/s fed to the decoder")
    ax.set_ylabel("WER (%)" if metric == "wer" else "BLEU")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


# --------------------------------------------------------------------------- entry point

def report(exp_dir: str, out_md: str | None = None, out_json: str | None = None,
           plot: str | None = None) -> list[dict]:
    """Collects every results.json under ``exp_dir`` into RESULTS.md, results.json and a PNG plot
    (defaults: ``exp_dir/RESULTS.md``, ``exp_dir/results.json``, ``exp_dir/results.png``), and
    the per-method plot next to the plot (``results_methods.png`` beside ``results.png``).

    Returns the rows (sorted). A results.json that is damaged or not a score result is skipped
    with a warning naming it; with no usable one at all it is a ValueError saying so (naming
    the unusable files), and nothing is written.
    """
    if not os.path.isdir(exp_dir):
        raise FileNotFoundError(f"experiment directory not found: {exp_dir}")
    out_md = out_md or os.path.join(exp_dir, "RESULTS.md")
    out_json = out_json or os.path.join(exp_dir, "results.json")
    plot = plot or os.path.join(exp_dir, "results.png")

    rows, unusable = [], []
    for path in find_results(exp_dir, exclude=[os.path.join(exp_dir, "results.json"), out_json]):
        res, why = load_result(path)
        if why:
            log.warning("skipping %s: %s; run `lalmtool score` again for it", path, why)
            unusable.append(f"{path} ({why})")
        else:
            rows.append(make_row(path, res))
    if not rows:
        raise ValueError(_nothing_to_report(exp_dir, unusable))
    rows = sort_rows(rows)
    # paths that are not UTF-8 (a directory named with byte 0xff): escaped, not an error
    write_atomic(out_md, readable(to_markdown(rows, exp_dir)))
    write_atomic(out_json, json_text(rows, indent=2) + "\n")
    if not plot_rows(rows, plot):
        log.warning("no plot written: no run has both tokens/s and a score")
    else:
        plot_methods(rows, methods_plot_path(plot))
    return rows


def methods_plot_path(plot: str) -> str:
    """The per-method plot's path beside ``plot``: ``results.png`` → ``results_methods.png``."""
    root, ext = os.path.splitext(plot)
    return f"{root}_methods{ext or '.png'}"


def _nothing_to_report(exp_dir: str, unusable: list[str]) -> str:
    """The error of a report without a single usable results.json (``unusable``: those found,
    each with why it is not usable)."""
    if not unusable:
        return (f"nothing to report under {exp_dir}: no results.json from `lalmtool score` "
                "found; run the decode and score stages first")
    listed = "; ".join(unusable[:5]) + (f"; ... and {len(unusable) - 5} more"
                                         if len(unusable) > 5 else "")
    return (f"nothing to report under {exp_dir}: {len(unusable)} results.json found, none "
            f"usable: {listed}; run `lalmtool score` again for "
            f"{'it' if len(unusable) == 1 else 'them'}")
