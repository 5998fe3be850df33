#!/usr/bin/env python3
"""WER and decode time side by side for every decode of EXP/decode/*/<set>.

Prints a markdown table (and writes it to EXP/longform.md): decode, LoRA, audio tokens/s,
the largest memory (audio positions) one utterance gave the decoder, WER %, decode seconds
and real-time factor. Reads decode.json (lalmtool decode) and results.json (lalmtool score).

    python3 local/table.py exp longform
"""
from __future__ import annotations

import glob
import json
import os
import sys


def main(exp: str, set_name: str) -> None:
    rows = []
    for info_path in sorted(glob.glob(os.path.join(exp, "decode", "*", set_name, "decode.json"))):
        d = os.path.dirname(info_path)
        info = json.load(open(info_path, encoding="utf-8"))
        res_path = os.path.join(d, "results.json")
        res = json.load(open(res_path, encoding="utf-8")) if os.path.exists(res_path) else {}
        wer = res.get("wer")
        rows.append([os.path.basename(os.path.dirname(d)), "yes" if info["lora"] else "no",
                     f"{info['tokens_per_s']:.1f}", str(info["max_audio_tokens"]),
                     f"{100 * wer:.1f}" if wer is not None else "-",
                     f"{info['decode_seconds']:.1f}",
                     f"{info['decode_seconds'] / info['audio_seconds']:.3f}"])
    head = ["decode", "LoRA", "tokens/s", "max positions", "WER %", "decode s", "RTF"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(exp, "longform.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text, end="")


if __name__ == "__main__":
    main(*sys.argv[1:3])
