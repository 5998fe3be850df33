#!/usr/bin/env python3
"""Markdown table of the CTC alignment runs: does the frame-level projector carry over?

    python3 local/align_summary.py EXP frames uniform-mean-k3 ...

Reads EXP/align/<condition>/summary.json (written by `lalmtool align`). For a compressed
condition, ``initial_valid_wer`` is the frame-level projector's CTC-greedy dev WER on that
condition's features (its run starts from it), ``best_valid_wer`` what its own alignment reaches.
"""
import json
import os
import sys


def main(exp: str, conditions: list[str]) -> str:
    lines = ["## CTC alignment of the projector (dev set, CTC-greedy WER, no LLM)", "",
             "| condition | frame-level projector | own alignment | best step | skipped train utts |",
             "|---|---:|---:|---:|---:|"]
    for cond in conditions:
        path = os.path.join(exp, "align", cond, "summary.json")
        if not os.path.exists(path):
            raise SystemExit(f"{path} not found: run stage 4 (align) first")
        with open(path, encoding="utf-8") as fh:
            s = json.load(fh)
        best = 100 * s["best_valid_wer"]
        carried = best if cond == "frames" else 100 * s["initial_valid_wer"]
        own = "(same)" if cond == "frames" else f"{best:.1f}"
        lines.append(f"| {cond} | {carried:.1f} | {own} | {s['best_step']} | {s['skipped']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    print(main(sys.argv[1], sys.argv[2:]))
