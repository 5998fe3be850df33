"""The Python API (lalmtool.compress): on a padded batch of stored frames it gives exactly the
boundaries and tokens that `lalmtool segment` + `lalmtool pool` stored, for every method and
reducer; mean pooling passes gradients to the frames."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lalmtool.compress import compress, dissimilarity, pool
from lalmtool.extract import extract
from lalmtool.pool import pool_store
from lalmtool.segment import segment
from lalmtool.store import Store

# (method, segment options, API options)
CONDITIONS = [
    ("peaks", {}, {}),
    ("uniform", {"k": 3}, {"k": 3}),
    ("prominence", {"threshold": 0.02}, {"threshold": 0.02}),
    ("scpc", {"threshold": 0.01}, {"threshold": 0.01}),
    ("prominence", {"target_rate": 12.0}, {"target_rate": 12.0}),
    ("scpc", {"target_rate": 15.0}, {"target_rate": 15.0}),
    ("uniform", {"target_rate": 20.0}, {"target_rate": 20.0}),
]


@pytest.fixture(scope="module")
def frames(tmp_path_factory, tiny_whisper) -> str:
    """A frame store of five clips (1.0, 2.5, 0.7, 3.2, 1.9 s) from a tiny random Whisper."""
    import soundfile as sf

    from conftest import tone, write_manifest

    d = tmp_path_factory.mktemp("api")
    rows = []
    for i, sec in enumerate([1.0, 2.5, 0.7, 3.2, 1.9]):
        sf.write(d / f"u{i}.wav", tone(sec, freq=200 + 40 * i, seed=i), 16000)
        rows.append({"id": f"utt{i}", "audio": f"u{i}.wav", "text": f"sentence {i}"})
    m = write_manifest(d / "manifest.jsonl", rows)
    return extract(m, tiny_whisper, str(d / "frames"))["store"]


def batch(store: Store) -> tuple[list[str], torch.Tensor, torch.Tensor, list[float]]:
    """(ids, padded float32 frames [B, T, D] as stored, lengths, audio seconds)."""
    ids = list(store.ids)
    zs = [torch.from_numpy(store[u]).float() for u in ids]
    x = torch.nn.utils.rnn.pad_sequence(zs, batch_first=True)
    return ids, x, torch.tensor([len(z) for z in zs]), [store.attrs(u)["duration"] for u in ids]


@pytest.mark.parametrize("method,seg_opts,api_opts", CONDITIONS)
@pytest.mark.parametrize("reduce", ["mean", "pick"])
def test_api_equals_the_stored_boundaries_and_tokens(frames, tmp_path, method, seg_opts,
                                                     api_opts, reduce):
    seg_dir, pooled_dir = str(tmp_path / "seg"), str(tmp_path / "pooled")
    segment(frames, method, seg_dir, **seg_opts)
    pool_store(frames, seg_dir, reduce, pooled_dir)
    src, seg, pooled = Store(frames), Store(seg_dir), Store(pooled_dir)
    ids, x, lengths, seconds = batch(src)
    out = compress(x, method, reduce, lengths=lengths, frame_rate=src.meta["frame_rate"],
                   seconds=seconds, **api_opts)
    assert {k: v for k, v in seg.meta["params"].items() if k != "target_rate"} == out.params
    assert 0 < out.lengths.sum() < 0.6 * lengths.sum()  # a real compression, not frames again
    for b, u in enumerate(ids):
        assert out.boundaries[b].tolist() == seg[u].tolist()
        n = int(out.lengths[b])
        assert n == len(pooled[u])
        np.testing.assert_array_equal(out.tokens[b, :n].half().numpy(), pooled[u])
        assert not out.tokens[b, n:].any()  # padding is zeros
    one = compress(x[2, : lengths[2]], method, reduce, frame_rate=src.meta["frame_rate"],
                   **{k: v for k, v in {**api_opts, **out.params}.items()
                      if k not in ("target_rate",)})
    np.testing.assert_array_equal(one.tokens.half().numpy(), pooled[ids[2]])


def test_mean_pooling_passes_each_frame_the_inverse_of_its_segment_length():
    x = torch.randn(2, 7, 4, requires_grad=True)
    starts = [torch.tensor([0, 2, 5]), torch.tensor([0, 1])]
    tokens, counts = pool(x, starts, "mean", lengths=torch.tensor([7, 4]))
    assert counts.tolist() == [3, 2]
    tokens.sum().backward()
    want = torch.tensor([[1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2],
                         [1, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0]])
    torch.testing.assert_close(x.grad, want[:, :, None].expand(2, 7, 4))
    torch.testing.assert_close(tokens[0, 1], x[0, 2:5].mean(0))


def test_uniform_mean_is_ceil_mode_average_pooling_and_pick_is_a_stride():
    x = torch.randn(10, 6)
    mean = compress(x, "uniform", "mean", k=3).tokens
    ref = torch.nn.functional.avg_pool1d(x.T[None], 3, ceil_mode=True)[0].T
    torch.testing.assert_close(mean, ref)
    assert torch.equal(compress(x, "uniform", "pick", k=3).tokens, x[::3])


def test_dissimilarity_and_peaks_on_a_known_curve():
    # frames along directions whose cosine distance to the next is 0, 1, 0, 1 - cos 45°, 0
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    diag = torch.tensor([1.0, 1.0])
    x = torch.stack([e1, e1, e2, e2, diag, diag])
    d = dissimilarity(x)
    torch.testing.assert_close(d, torch.tensor([0.0, 1.0, 0.0, 1 - 2 ** -0.5, 0.0]))
    out = compress(x, "peaks")
    assert out.boundaries[0].tolist() == [0, 2, 4]
    torch.testing.assert_close(out.tokens, torch.stack([e1, e2, diag]))


def test_bad_lengths_and_options_are_named():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"lengths must be 2 values in 1..5, got \[5, 6\]"):
        compress(x, lengths=[5, 6])
    with pytest.raises(ValueError, match="target_rate needs frame_rate"):
        compress(x, "uniform", target_rate=10)
    with pytest.raises(ValueError, match="peaks has none"):
        compress(x, "peaks", target_rate=10, frame_rate=50)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tokens_equal_the_cpu_ones():
    torch.manual_seed(0)
    x, lengths = torch.randn(3, 200, 64), torch.tensor([200, 150, 37])
    for method, opts in (("peaks", {}), ("uniform", {"k": 3}), ("prominence",
                                                                {"threshold": 0.05})):
        cpu = compress(x, method, lengths=lengths, **opts)
        gpu = compress(x.cuda(), method, lengths=lengths.cuda(), **opts)
        assert gpu.tokens.device.type == "cuda"
        assert [b.tolist() for b in gpu.boundaries] == [b.tolist() for b in cpu.boundaries]
        torch.testing.assert_close(gpu.tokens.cpu(), cpu.tokens, rtol=1e-5, atol=1e-6)


def readme_blocks() -> list[str]:
    """The python blocks of the docs' section on the API (docs/pipeline.md)."""
    import os
    import re

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "pipeline.md")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    section = text[text.index("### Compression as a Python API"):]
    section = section[: section.index("\n## ")] if "\n## " in section else section
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_api_example_runs_and_says_what_it_prints(capsys):
    torch.manual_seed(0)
    scope: dict = {}
    exec(readme_blocks()[0], scope)
    assert scope["frames"].grad.abs().sum() > 0
    out, rate = scope["out"], scope["rate"]
    assert out.tokens.shape[:2] == (2, int(out.lengths.max()))
    assert rate.lengths.sum().item() == 48  # 10 tokens/s over 4.8 s of frames (150 + 90 at 50 Hz)


@pytest.mark.slow
def test_readme_whisper_splice_example_runs(tiny_en, capsys):
    scope: dict = {}
    exec(readme_blocks()[1], scope)
    assert capsys.readouterr().out.split()[:2] == ["150", "50"]  # 2.99 s: 150 frames, 50 tokens
