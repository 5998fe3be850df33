"""benchmarks/bench_generate.py: the step's lower bound (weight and KV-cache bytes) for known
architectures, and the rows it produces on a tiny Qwen2-Audio architecture on the CPU."""
import json
import os

import pytest
import torch

from conftest import ROOT, TINY_QWEN2_AUDIO

#: TINY_QWEN2_AUDIO's decoder as one step reads it: per layer q (32x32 + 32), k and v
#: (16x32 + 16 each: 2 KV heads of 8), o (32x32), gate/up/down (3 x 32x64), two norms
#: (2 x 32) = 9,344; two layers, the final norm (32) and the head (512x32): 35,104 float32
#: parameters.
TINY_STEP_WEIGHT_BYTES = 35_104 * 4


@pytest.fixture
def bench(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_generate

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY_QWEN2_AUDIO))
    return bench_generate, str(cfg)


def test_kv_cache_bytes_per_position(bench):
    bench_generate, _ = bench
    from archs import arch_config

    text = arch_config("qwen2-audio-7b").text_config
    # keys + values x 32 layers x 32 KV heads x 128 dims x 2 bytes: 0.5 MiB per position
    assert bench_generate.kv_bytes_per_token(text, torch.bfloat16) == 524_288
    tiny = arch_config(None, bench[1]).text_config
    assert bench_generate.kv_bytes_per_token(tiny, torch.float32) == 2 * 2 * 2 * 8 * 4


def test_step_weight_bytes_of_the_7b_leave_the_input_embedding_out(bench):
    from transformers import Qwen2AudioForConditionalGeneration

    bench_generate, _ = bench
    from archs import arch_config

    with torch.device("meta"):
        model = Qwen2AudioForConditionalGeneration._from_config(
            arch_config("qwen2-audio-7b"), dtype=torch.bfloat16)
    weights = bench_generate.step_weight_bytes(model.model.language_model, model.lm_head)
    # 32 layers x 202,395,648 + final norm 4,096 + head 156,032 x 4,096, in bf16: 14.2 GB
    assert weights == 2 * (32 * 202_395_648 + 4_096 + 156_032 * 4_096) == 14_231_543_808
    assert bench_generate.step_bytes(weights, 524_288, 8, 1_000, 48) == (
        weights, 524_288 * 8 * 1_024)


def test_generate_benchmark_on_a_tiny_arch(bench, tmp_path, capsys):
    bench_generate, cfg = bench
    out = tmp_path / "generate.json"
    result = bench_generate.main([
        "--arch-config", cfg, "--seconds", "4", "--conditions", "frames", "uniform-k3",
        "--batch", "1", "2", "--new-tokens", "3", "--repeats", "1", "--bandwidth", "10",
        "--profile", "--json", str(out)])
    rows = result["rows"]
    assert result["bandwidth_gbs"] == 10.0
    assert [(r["condition"], r["batch"], r["compile"]) for r in rows] == [
        ("frames", 1, False), ("frames", 2, False), ("uniform-k3", 1, False),
        ("uniform-k3", 2, False)]
    assert [r["audio_tokens"] for r in rows] == [100, 100, 34, 34]  # 4 s at 25 Hz, ceil(/3)
    prompt = rows[0]["positions"] - 100
    assert [r["positions"] for r in rows] == [100 + prompt] * 2 + [34 + prompt] * 2
    for r in rows:
        assert r["weight_bytes"] == TINY_STEP_WEIGHT_BYTES
        # 256 bytes of KV per position and sequence: the prompt and 1.5 new tokens on average
        assert r["kv_bytes"] == 256 * r["batch"] * (r["positions"] + 1.5)
        assert r["bound_s"] == pytest.approx((r["weight_bytes"] + r["kv_bytes"]) / 1e10)
        assert r["ratio"] == pytest.approx(r["step_s"] / r["bound_s"])
        assert r["step_s"] == pytest.approx((r["total_s"] - r["prefill_s"]) / 2)
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 3 / r["total_s"])
    printed = capsys.readouterr().out
    assert "bandwidth 10.0 GB/s (stated); KV cache 0.2 KiB per position" in printed
    assert f"    4s uniform-k3      2     off        34 {34 + prompt:>9} " in printed
    assert "beyond the LLM's 120 positions (decode refuses these): 4s frames\n" in printed
    assert list(result["profile"]["qwen2-audio"]) == [
        "the whole call (generate)", "  generation loop (_sample / _beam_search)",
        "    the model's forward", "      the decoder stack", "        causal mask (every step)",
        "        rotary embedding", "        decoder layers", "          attention",
        "          MLP", "          RMSNorm"]
    assert json.loads(out.read_text())["rows"][3]["kv_bytes"] == 256 * 2 * (34 + prompt + 1.5)
