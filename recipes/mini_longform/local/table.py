#!/usr/bin/env python3
"""The long-form study's table and plot, from every decode of EXP/decode/*/<set>.

EXP/longform.md: per decode, the adapter, audio tokens/s, the decoder's memory per pass (audio
positions: the whole recording, or one chunk), WER % (Whisper's English normaliser, pooled
over the recordings), decode seconds and their ratio to the anchor's (native-longform:
transformers' long-form generation), the decode process's peak memory. EXP/longform.png: WER
and decode seconds per recording against its length. Reads hyp.jsonl and decode.json.

    python3 local/table.py exp longform
"""
from __future__ import annotations

import glob
import json
import os
import sys

from lalmtool.score import get_normalizer, wer_counts

ANCHOR = "native-longform"


def read_decodes(exp: str, set_name: str) -> dict[str, tuple[dict, list[dict]]]:
    """Decode name → (decode.json, hyp.jsonl records)."""
    out = {}
    for info_path in sorted(glob.glob(os.path.join(exp, "decode", "*", set_name, "decode.json"))):
        d = os.path.dirname(info_path)
        with open(info_path, encoding="utf-8") as fh:
            info = json.load(fh)
        with open(os.path.join(d, "hyp.jsonl"), encoding="utf-8") as fh:
            recs = [json.loads(line) for line in fh if line.strip()]
        out[os.path.basename(os.path.dirname(d))] = (info, recs)
    return out


def wer(recs: list[dict]) -> float:
    norm = get_normalizer("whisper_english")
    counts, _ = wer_counts([norm(r["ref"]) for r in recs], [norm(r["hyp"]) for r in recs])
    return 100 * counts["wer"]


def adapter_of(name: str, info: dict) -> str:
    """Which adapter a decode of run.sh used, from its name."""
    if not info.get("lora"):
        return "none"
    if name.endswith("-short"):
        return "short utterances (recipes/mini)"
    if name.endswith("-packed"):
        return "joined to 5-30 s, packed windows"
    return "joined to 5-30 s" if name.endswith("-chunk30s") else "joined to 10-120 s"


def main(exp: str, set_name: str) -> None:
    decodes = read_decodes(exp, set_name)
    anchor_s = decodes[ANCHOR][0]["decode_seconds"] if ANCHOR in decodes else None
    head = ["decode", "LoRA", "tokens/s", "positions per pass", "WER %", "decode s",
            "x anchor time", "peak MB", "cut"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, (info, recs) in decodes.items():
        chunk = info.get("chunk") or (info.get("backend_opts") or {}).get("chunk")
        positions = min(chunk, info["max_audio_tokens"]) if chunk else info["max_audio_tokens"]
        secs = info["decode_seconds"]
        lines.append("| " + " | ".join([
            name, adapter_of(name, info), f"{info['tokens_per_s']:.1f}", str(positions),
            f"{wer(recs):.2f}", f"{secs:.1f}", f"{secs / anchor_s:.2f}" if anchor_s else "-",
            f"{info['peak_rss_mb']:.0f}" if info.get("peak_rss_mb") else "-",
            str(len(info.get("cut") or []))]) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(exp, "longform.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text, end="")
    plot(decodes, os.path.join(exp, "longform.png"))


def plot(decodes: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_wer, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (_, recs) in decodes.items():
        recs = sorted(recs, key=lambda r: r["duration"])
        x = [r["duration"] for r in recs]
        style = "k--" if name == ANCHOR else "-o"
        ax_wer.plot(x, [wer([r]) for r in recs], style, label=name)
        ax_time.plot(x, [r["seconds"] for r in recs], style, label=name)
    ax_wer.set(xlabel="recording length (s)", ylabel="WER %", title="WER per recording")
    ax_time.set(xlabel="recording length (s)", ylabel="decode seconds",
                title="decode time per recording")
    ax_time.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
