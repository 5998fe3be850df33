"""Running a stage over the shards of a store: in-process, ``--nj`` local workers, or torchrun.

Every shard has exactly one writer. Under ``torchrun`` (or ``srun`` with ``RANK``/``WORLD_SIZE``
set) rank r takes shards r, r + W, r + 2W, ... of the fixed plan; with ``--nj N`` a local process
pool takes the shards of this rank. Rank 0 creates the store before anyone writes and finishes it
after everyone is done (a gloo barrier when a process group is needed).
"""
from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Callable

from tqdm import tqdm

from .store import ShardResult, StoreWriter

log = logging.getLogger("lalmtool")

# A worker maps (shard name, utterance ids, tick) to the shard's content and summed statistics;
# it calls tick(n) as it finishes n utterances, for the progress bar.
Worker = Callable[[str, list[str], Callable[[int], None]], tuple[ShardResult, dict]]


def progress(**kwargs) -> tqdm:
    """A tqdm bar; in a log file (not a terminal) it writes a line every 10 s at most."""
    return tqdm(mininterval=0.1 if sys.stderr.isatty() else 10.0, **kwargs)


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when run alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_device(device: str) -> str:
    """The device this process should use: ``cuda`` means ``cuda:LOCAL_RANK`` under torchrun.

    An explicit index (``cuda:1``) and every other device (``cpu``, ``mps``) are kept as given;
    without ``LOCAL_RANK`` in the environment ``cuda`` stays ``cuda`` (the current device).
    """
    local_rank = os.environ.get("LOCAL_RANK")
    if device == "cuda" and local_rank is not None:
        return f"cuda:{int(local_rank)}"
    return device


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()


_worker: Worker | None = None
_tick: Callable[[int], None] = lambda n: None


def _init_worker(factory: Callable[[], Worker], threads: int | None, counter=None) -> None:
    global _worker, _tick
    if threads:
        import torch

        torch.set_num_threads(threads)
    if counter is not None:
        def _tick(n: int) -> None:
            with counter.get_lock():
                counter.value += n
    _worker = factory()


def _do_shard(path: str, name: str) -> dict:
    writer = StoreWriter(path)
    result, stats = _worker(name, writer.shards[name], _tick)
    writer.write_shard(name, result)
    return stats


def run_sharded(out: str, kind: str, fp: str, meta: dict, shards: dict[str, list[str]],
                factory: Callable[[], Worker], nj: int = 1, force: bool = False,
                desc: str = "", skipped_before: list[dict] = ()) -> tuple[dict, list[dict]]:
    """Creates/resumes the store at ``out`` and fills its missing shards.

    ``factory`` is called once per worker process (it loads the model, say) and must be
    picklable when ``nj > 1``. Returns the summed statistics of the shards done now (this rank)
    and, on rank 0, the utterances skipped in the whole store (``skipped_before`` included: those
    left out before sharding).
    """
    global _tick
    rank, world = dist_info()
    if rank == 0:
        StoreWriter.create(out, kind, fp, meta, shards, force=force)
    barrier(world)
    writer = StoreWriter(out)
    mine = [s for i, s in enumerate(shards) if i % world == rank]
    pending = set(writer.pending())  # verifies the shards present: once, not per shard
    todo = [s for s in mine if s in pending]
    done = len(mine) - len(todo)
    if done:
        log.info("%s: %d of %d shard(s) already complete, skipped", out, done, len(mine))
    totals: Counter = Counter()
    bar = progress(total=sum(len(shards[s]) for s in todo), desc=desc or kind, unit="utt",
               disable=not todo)
    if nj <= 1:
        _init_worker(factory, None)
        _tick = bar.update
        for name in todo:
            totals.update(_do_shard(out, name))
    elif todo:
        threads = max(1, (os.cpu_count() or 1) // nj)
        ctx = get_context("spawn")
        counter = ctx.Value("q", 0)
        with ProcessPoolExecutor(nj, mp_context=ctx, initializer=_init_worker,
                                 initargs=(factory, threads, counter)) as pool:
            pending = {pool.submit(_do_shard, out, name) for name in todo}
            try:
                while pending:
                    done_now, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for fut in done_now:
                        totals.update(fut.result())
                    bar.update(counter.value - bar.n)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    bar.close()
    barrier(world)
    skipped = writer.finish(skipped_before) if rank == 0 else []
    return dict(totals), skipped
