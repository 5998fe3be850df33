"""The decoder-only backends' ``compile`` option (static KV cache + compiled decode step): the
same greedy and beam token ids as the eager generation, and a clean fallback (one warning, the
eager ids) where compiling is unavailable or fails. Speed is measured by
``benchmarks/bench_generate.py``, not here."""
import logging

import pytest
import torch

from conftest import write_tiny_llm
from lalmtool.models import check_backend_options, load_backend
from lalmtool.testing import write_random_qwen2_audio

#: The ids ``generate_ids`` gave on the fixtures below before the ``compile`` option existed:
#: greedy, 8 new tokens, and beam 3, 12 new tokens (257 = <|endoftext|>, padding after it).
GREEDY_IDS = [[92, 169, 48, 172, 89, 54, 68, 108],
              [92, 169, 194, 134, 195, 128, 100, 1],
              [92, 169, 194, 134, 195, 128, 100, 1],
              [92, 169, 194, 134, 195, 128, 48, 172]]
BEAM3_IDS = [[257, 114, 48, 250, 6, 152, 23, 219, 147, 153, 211, 49],
             [92, 37, 2, 39, 60, 137, 99, 194, 134, 152, 23, 219],
             [92, 37, 2, 81, 227, 237, 43, 33, 4, 4, 109, 123],
             [92, 169, 194, 134, 195, 128, 100, 1, 185, 125, 89, 54]]


@pytest.fixture(scope="module")
def tiny_qwen2_audio(tmp_path_factory) -> str:
    return write_random_qwen2_audio(str(tmp_path_factory.mktemp("tiny-qwen2-audio")))


def feats_for(lengths, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for n in lengths]


FEATS = feats_for([3, 7, 12, 20])  # a left-padded batch of four lengths


@pytest.fixture(scope="module")
def eager(tiny_qwen2_audio):
    return load_backend("qwen2-audio", tiny_qwen2_audio)


def test_eager_generation_gives_the_ids_it_gave_before(eager):
    assert eager.compile is False
    assert eager.generate_ids(FEATS, 1, 8).tolist() == GREEDY_IDS
    assert eager.generate_ids(FEATS, 3, 12).tolist() == BEAM3_IDS


def test_compiled_generation_gives_the_eager_token_ids(tiny_qwen2_audio, eager, caplog):
    compiled = load_backend("qwen2-audio", tiny_qwen2_audio, compile=True)
    with caplog.at_level(logging.WARNING, logger="lalmtool"):
        for beam in (1, 3):
            ids = compiled.generate_ids(FEATS, beam, 24)
            assert ids.tolist() == eager.generate_ids(FEATS, beam, 24).tolist(), beam
        assert compiled.generate_ids(FEATS, 1, 8).tolist() == GREEDY_IDS
        assert compiled.generate_ids(FEATS, 3, 12).tolist() == BEAM3_IDS
        assert compiled.transcribe(FEATS, 1, [3, 24, 8, 24]) == eager.transcribe(
            FEATS, 1, [3, 24, 8, 24])
    assert compiled.compile is True  # it compiled: no fallback
    assert caplog.records == []
    assert getattr(compiled._core(), "_compiled_call", None) is not None


def test_compile_unavailable_falls_back_with_one_warning(tiny_qwen2_audio, caplog, monkeypatch):
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    be = load_backend("qwen2-audio", tiny_qwen2_audio, compile=True)
    with caplog.at_level(logging.WARNING, logger="lalmtool"):
        assert be.generate_ids(FEATS, 1, 8).tolist() == GREEDY_IDS
        assert be.generate_ids(FEATS, 3, 12).tolist() == BEAM3_IDS
    assert [r.getMessage() for r in caplog.records] == [
        "compile=true: compiling the decode step failed (torch.compile is not supported on this "
        "Python/platform); generating without it (transformers' dynamic KV cache, eager)"]
    assert be.compile is False
    assert getattr(be._core(), "_compiled_call", None) is None


def test_a_compile_that_fails_midway_falls_back_to_the_eager_ids(tiny_qwen2_audio, caplog,
                                                                  monkeypatch):
    from transformers import CompileConfig

    import lalmtool.models.base as base

    def broken_backend(graph, example_inputs, **options):
        raise RuntimeError("no C++ compiler")

    real = base.compiled

    def compiled_with_a_broken_backend(config):
        config = real(config)
        config.compile_config = CompileConfig(backend=broken_backend)
        config.compile_config._compile_all_devices = True
        return config

    monkeypatch.setattr(base, "compiled", compiled_with_a_broken_backend)
    be = load_backend("qwen2-audio", tiny_qwen2_audio, compile=True)
    with caplog.at_level(logging.WARNING, logger="lalmtool"):
        assert be.generate_ids(FEATS, 1, 8).tolist() == GREEDY_IDS
        assert be.generate_ids(FEATS, 1, 8).tolist() == GREEDY_IDS
    assert [r.getMessage() for r in caplog.records] == [
        "compile=true: compiling the decode step failed (BackendCompilerFailed, from "
        "RuntimeError: no C++ compiler); generating without it (transformers' dynamic KV "
        "cache, eager)"]
    assert be.compile is False


def test_compile_is_a_backend_option_of_both_decoder_only_backends(tiny_qwen2_audio):
    for name in ("qwen2-audio", "speechllm"):
        check_backend_options(name, {"compile": True}, "--backend-opt")  # accepted
    with pytest.raises(ValueError, match="backend 'whisper' has no option compile"):
        check_backend_options("whisper", {"compile": True}, "--backend-opt")
    with pytest.raises(ValueError, match="compile must be true or false, not 'yes'"):
        load_backend("qwen2-audio", tiny_qwen2_audio, compile="yes")


def test_speechllm_compiled_generation_gives_the_eager_token_ids(tmp_path, tiny_whisper, smollm2):
    write_tiny_llm(tmp_path / "llm", smollm2)
    opts = {"encoder": tiny_whisper, "stack": 3, "hidden": 24}
    eager = load_backend("speechllm", str(tmp_path / "llm"), **opts)
    compiled = load_backend("speechllm", str(tmp_path / "llm"), compile=True, **opts)
    compiled.model.load_state_dict(eager.model.state_dict())  # the same random projector
    feats = feats_for([20, 29, 41])
    for beam in (1, 2):
        expected = eager.generate_ids(feats, beam, 12)
        assert compiled.generate_ids(feats, beam, 12).tolist() == expected.tolist(), beam
    assert compiled.compile is True
