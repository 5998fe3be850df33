"""The GPU cost benchmarks run end to end on a tiny Qwen2-Audio architecture on the CPU and
report the token counts and ratios that the compression implies."""
import json
import os

import pytest

from conftest import ROOT, TINY_QWEN2_AUDIO

@pytest.fixture
def benchmarks(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY_QWEN2_AUDIO))
    return str(cfg)


def closed_form_parameters(spec: dict) -> int:
    """Parameters of a Qwen2-Audio model, counted from its config's sizes: the Whisper-style
    tower (two convolutions, positions, layers with a bias-free key, a final norm), the linear
    projector and the Qwen2 decoder (biased q, k, v; untied lm_head unless tied)."""
    a, t = spec["audio_config"], spec["text_config"]
    d, f, m = a["d_model"], a["encoder_ffn_dim"], a["num_mel_bins"]
    tower = (3 * m * d + d) + (3 * d * d + d) + a["max_source_positions"] * d + 2 * d
    tower += a["encoder_layers"] * (4 * d * d + 3 * d + 4 * d + 2 * d * f + f + d)
    h, i, v = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    kv = t["num_key_value_heads"] * h // t["num_attention_heads"]
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    decoder = v * h + t["num_hidden_layers"] * layer + h
    lm_head = 0 if t.get("tie_word_embeddings") else v * h
    return tower + (d * h + h) + decoder + lm_head


def test_parameter_count_is_the_models_size_by_its_shapes(benchmarks):
    from archs import ARCHS, arch_config, parameter_count

    assert parameter_count(arch_config(file=benchmarks)) == closed_form_parameters(TINY_QWEN2_AUDIO) == 82912
    for name, spec in ARCHS.items():
        assert parameter_count(arch_config(name)) == closed_form_parameters(spec), name
    # the 7B architecture is the size of the real Qwen/Qwen2-Audio-7B checkpoint (8.4 B)
    assert parameter_count(arch_config("qwen2-audio-7b")) == 8_397_094_912


def test_arch_config_takes_exactly_one_source(benchmarks):
    from archs import arch_config

    cfg = arch_config(file=benchmarks)
    assert (cfg.audio_config.d_model, cfg.text_config.hidden_size,
            cfg.text_config.max_position_embeddings) == (16, 32, 120)
    for kwargs in ({}, {"name": "qwen2-audio-7b", "file": benchmarks}):
        with pytest.raises(SystemExit, match="give exactly one of --arch and --arch-config"):
            arch_config(**kwargs)


def test_prefill_benchmark_on_a_tiny_arch(benchmarks, tmp_path, capsys):
    import bench_prefill

    out = tmp_path / "prefill.json"
    rows = bench_prefill.main(["--arch-config", benchmarks, "--random-frames", "--seconds", "4",
                               "--conditions", "uniform-k2", "uniform-k3", "--repeats", "1",
                               "--json", str(out)])["qwen2-audio"]
    assert [r["condition"] for r in rows] == ["frames", "uniform-k2", "uniform-k3"]
    assert [r["audio_tokens"] for r in rows] == [100, 50, 34]  # 4 s at 25 Hz, ceil(100 / k)
    prompt = rows[0]["positions"] - 100
    assert [r["positions"] for r in rows] == [100 + prompt, 50 + prompt, 34 + prompt]
    assert [r["ratios"]["audio_tokens"] for r in rows] == [1.0, 0.5, 0.34]
    # the prefill's FLOPs are the LLM's, from the positions P: per layer 2·P·(q, k, v, o and MLP
    # weights) and 4·P²·hidden for attention (scores and weighted sum, counted in full), and the
    # lm_head on the last position only
    h, layers, inter, vocab = 32, 2, 64, 512
    kv = 2 * h // 4
    per_token = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    assert [round(r["gflop"] * 1e9) for r in rows] == [
        2 * P * per_token + layers * 4 * P * P * h + 2 * h * vocab
        for P in (100 + prompt, 50 + prompt, 34 + prompt)]
    assert [round(r["ratios"]["gflop"], 6) for r in rows] == [
        round(r["gflop"] / rows[0]["gflop"], 6) for r in rows]
    printed = capsys.readouterr().out
    assert f"4s uniform-k3         34 {34 + prompt:>9}  0.340" in printed
    assert ("beyond the LLM's 120 positions (max_position_embeddings; decode refuses these): "
            "4s frames\n") in printed  # 147 positions; k=2 (97) and k=3 (81) fit
    assert json.loads(out.read_text())["qwen2-audio"][1]["audio_tokens"] == 50


def _positions(config: str, n: int, tmp_path) -> str:
    """The tiny architecture with an LLM of ``n`` positions (Qwen-7B's: 8192)."""
    cfg = json.loads(open(config).read())
    cfg["text_config"]["max_position_embeddings"] = n
    path = tmp_path / f"positions-{n}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_train_step_benchmark_on_a_tiny_arch(benchmarks, tmp_path, capsys):
    import bench_train_step

    rows = bench_train_step.main(["--arch-config", _positions(benchmarks, 8192, tmp_path),
                                  "--batch", "2x4",
                                  "--conditions", "uniform-k3", "--repeats", "1"])
    assert [(r["condition"], r["checkpointing"], r["audio_tokens"]) for r in rows] == [
        ("frames", "off", 100), ("uniform-k3", "off", 34),
        ("frames", "on", 100), ("uniform-k3", "on", 34)]
    assert [rows[0]["llm_tokens"] - r["llm_tokens"] for r in rows] == [0, 66, 0, 66]
    assert [r["ratios"]["audio_tokens"] for r in rows] == [1.0, 0.34, 1.0, 0.34]
    assert [r["seconds"] is None for r in rows] == [False] * 4  # all four fit and were timed
    printed = capsys.readouterr().out
    assert "    2x4 uniform-k3    on        34 " in printed


def test_train_step_benchmark_marks_examples_beyond_the_llms_positions(benchmarks, tmp_path,
                                                                        capsys):
    """A whole recording in one example: 10 min of 25 Hz frames (15,000 audio tokens) exceeds
    an LLM of 8,192 positions and is reported as not trainable; pooled by 3 it trains."""
    import bench_train_step

    rows = bench_train_step.main(["--arch-config", _positions(benchmarks, 8192, tmp_path),
                                  "--batch", "1x600",
                                  "--conditions", "uniform-k3", "--checkpointing", "on",
                                  "--repeats", "1"])
    assert [(r["condition"], r["audio_tokens"], r["seconds"] is None) for r in rows] == [
        ("frames", 15000, True), ("uniform-k3", 5000, False)]
    assert "beyond the LLM's 8192 positions: not trainable" in capsys.readouterr().out
