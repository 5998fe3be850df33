"""Segment + pool throughput (frames per second on one core) and peak memory.

Usage: python benchmarks/bench_compress.py [--dims 384 1280] [--utts 200] [--frames 750]

Synthetic encoder-like features (smoothly varying random walks, float16 as stored); every
method's boundaries, then pooling. Each measurement runs in a fresh forked process; memory is
its peak resident set size (the synthetic features included).
"""
from __future__ import annotations

import argparse
import os
import time
import multiprocessing as mp
import resource

os.environ.setdefault("OMP_NUM_THREADS", "1")  # figures are per core
import numpy as np  # noqa: E402

from lalmtool import segment as S  # noqa: E402
from lalmtool.pool import pool  # noqa: E402


def features(n: int, T: int, D: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        steps = rng.standard_normal((T, D)).astype(np.float32)
        walk = np.cumsum(steps * (rng.random((T, 1)) < 0.3), axis=0) + 0.5 * steps
        out.append(walk.astype(np.float16))
    return out


def bench(fn, data) -> tuple[float, float]:
    """(frames per second, peak RSS in MiB of the process: data included) of fn over data."""
    fn(data[0])  # warm-up: imports, allocator
    t0 = time.perf_counter()
    for z in data:
        fn(z)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return sum(len(z) for z in data) / dt, peak


def _child(fn, data, q) -> None:
    q.put(bench(fn, data))


def isolated(fn, data) -> tuple[float, float]:
    q = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=_child, args=(fn, data, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dims", type=int, nargs="+", default=[384, 1280])
    ap.add_argument("--utts", type=int, default=200)
    ap.add_argument("--frames", type=int, default=750, help="frames per utterance (15 s at 50 Hz)")
    args = ap.parse_args()
    methods = {
        "peaks": S.peaks,
        "scpc(0.05)": lambda z: S.scpc(z, 0.05),
        "prominence(0.05)": lambda z: S.prominence(z, 0.05),
        "uniform(3)": lambda z: S.uniform(z, 3),
        "peaks+pool(mean)": lambda z: pool(z, S.peaks(z), "mean"),
        "uniform(3)+pool(mean)": lambda z: pool(z, S.uniform(z, 3), "mean"),
        "uniform(3)+pool(pick)": lambda z: pool(z, S.uniform(z, 3), "pick"),
    }
    print(f"{'D':>5} {'method':<24} {'frames/s (1 core)':>18} {'peak RSS MiB':>14}")
    for D in args.dims:
        data = features(args.utts, args.frames, D)
        for name, fn in methods.items():
            fps, peak = isolated(fn, data)
            print(f"{D:>5} {name:<24} {fps:>18,.0f} {peak:>14.1f}")


if __name__ == "__main__":
    main()
