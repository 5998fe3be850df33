#!/usr/bin/env python3
"""The equal-rate study's table (recipes/mini stage 7) from the scored decodes of an exp dir.

    python3 local/rates_table.py --exp exp --sets test librivox unseen \
        --conditions frames peaks uniform-mean-k3 uniform-mean-k10 prominence-mean-r5 ... \
        [--target-rate 5.5 --target-ratio 1.1 --reference uniform-mean-k10] --out exp/rates.md

Reads ``EXP/decode/native/<set>/results.json`` and ``EXP/decode/<condition>-lora/<set>/
results.json`` (written by ``lalmtool score``) and writes one markdown table: a line per
condition (native Whisper first, then by tokens/s on the first set, highest first) with its
tokens/s and WER % on every set, the ratio of its WER on the last set to native Whisper's
there, whether it meets the study's target (at most ``--target-rate`` tokens/s on every
set, WER on the last set within ``--target-ratio`` times native's, and on the first set not
above the ``--reference`` condition's), and what a learnt compressor costs to train (its
parameters and steps, from ``EXP/lora/<condition>/summary.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def read_json(path: str) -> dict | None:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def load(exp: str, name: str, set_name: str) -> dict | None:
    """A scored decode's results.json, or None when that decode was not scored."""
    return read_json(os.path.join(exp, "decode", name, set_name, "results.json"))


def collect(exp: str, sets: list[str], conditions: list[str]) -> list[dict]:
    """One row per condition with any scored set: name, decode dir, per set its results, and
    its training summary (None for native Whisper or an unfinished run)."""
    rows = []
    for cond, name in [("native", "native")] + [(c, f"{c}-lora") for c in conditions]:
        res = {s: load(exp, name, s) for s in sets}
        if any(res.values()):
            rows.append({"condition": cond, "decode": name, "results": res,
                         "training": read_json(os.path.join(exp, "lora", cond, "summary.json"))})
    return rows


def training_cost(row: dict) -> str:
    """A learnt compressor's parameters and the steps it trained with the LoRA, else –."""
    pooler = (row.get("training") or {}).get("pooler")
    if not pooler:
        return "–"
    return f"{pooler['parameters']:,} parameters, {row['training']['steps']} steps with the LoRA"


def _num(res: dict | None, key: str) -> float | None:
    v = None if res is None else res.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def verdict(row: dict, sets: list[str], native: dict | None, reference: dict | None,
            target_rate: float, target_ratio: float) -> str:
    """``yes`` when the row meets every part of the target, else what it misses."""
    first, last = sets[0], sets[-1]
    rates = [_num(row["results"][s], "tokens_per_s") for s in sets]
    if any(r is None for r in rates):
        return "–"
    misses = []
    if max(rates) > target_rate:
        misses.append(f"{max(rates):.1f} tokens/s")
    wer, base = _num(row["results"][last], "wer_pct"), _num(native and native["results"][last],
                                                            "wer_pct")
    if wer is not None and base is not None and wer > target_ratio * base:
        misses.append(f"{last} {wer / base:.2f}x native" if base else f"{last} WER > 0")
    ref = _num(reference and reference["results"][first], "wer_pct")
    mine = _num(row["results"][first], "wer_pct")
    if ref is not None and mine is not None and mine > ref:
        misses.append(f"{first} above {reference['condition']}")
    return "yes" if not misses else "no: " + ", ".join(misses)


def table(rows: list[dict], sets: list[str], target_rate: float, target_ratio: float,
          reference: str) -> str:
    """The markdown table, sorted: native first, then tokens/s on the first set descending."""
    native = next((r for r in rows if r["condition"] == "native"), None)
    ref = next((r for r in rows if r["condition"] == reference), None)
    first, last = sets[0], sets[-1]
    rows = sorted(rows, key=lambda r: (r["condition"] != "native",
                                       -(_num(r["results"][first], "tokens_per_s") or 0.0)))
    words = {s: next((int(r["results"][s]["ref_words"]) for r in rows if r["results"][s]
                      and r["results"][s].get("ref_words")), None) for s in sets}
    head = (["condition"] + [f"tokens/s {s}" for s in sets]
            + [f"WER % {s} ({words[s]} words)" if words[s] else f"WER % {s}" for s in sets]
            + [f"{last} WER / native's", f"target (<= {target_rate:g} tokens/s, {last} <= "
               f"{target_ratio:g}x native, {first} <= {reference})", "learnt compressor"])
    lines = ["| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (2 * len(sets) + 1) + "---|---|"]
    base = _num(native and native["results"][last], "wer_pct")
    for r in rows:
        lora = "" if r["condition"] == "native" else " + LoRA"
        cells = [f"{r['condition']}{lora}"]
        cells += [_fmt(_num(r["results"][s], "tokens_per_s"), 1) for s in sets]
        cells += [_fmt(_num(r["results"][s], "wer_pct"), 2) for s in sets]
        wer = _num(r["results"][last], "wer_pct")
        cells.append(_fmt(wer / base, 2) + "x" if wer is not None and base else "–")
        cells.append("–" if r["condition"] == "native" else
                     verdict(r, sets, native, ref, target_rate, target_ratio))
        cells.append(training_cost(r))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: float | None, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exp", required=True)
    ap.add_argument("--sets", nargs="+", required=True,
                    help="sets, in the table's order: the target reads the first and the last")
    ap.add_argument("--conditions", nargs="+", required=True)
    ap.add_argument("--target-rate", type=float, default=5.5)
    ap.add_argument("--target-ratio", type=float, default=1.1)
    ap.add_argument("--reference", default="uniform-mean-k10")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    conditions = list(dict.fromkeys(args.conditions))  # --conditions may repeat a name
    rows = collect(args.exp, args.sets, conditions)
    if not rows:
        print(f"rates_table: no scored decode of {conditions} under {args.exp}/decode",
              file=sys.stderr)
        return 1
    text = table(rows, args.sets, args.target_rate, args.target_ratio, args.reference)
    tmp = f"{args.out}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
