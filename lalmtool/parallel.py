"""Running a stage over the shards of a store: in-process, ``--nj`` local workers, or torchrun.

Every shard has exactly one writer. Under ``torchrun`` (or ``srun`` with ``RANK``/``WORLD_SIZE``
set) rank r takes shards r, r + W, r + 2W, ... of the fixed plan; with ``--nj N`` a local process
pool takes the shards of this rank. Rank 0 creates the store before anyone writes and finishes it
after everyone is done (a gloo barrier when a process group is needed).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Callable

from tqdm import tqdm

from .store import ShardResult, StoreWriter

log = logging.getLogger("lalmtool")

# A worker maps (shard name, utterance ids) to the shard's content and summed statistics.
Worker = Callable[[str, list[str]], tuple[ShardResult, dict]]


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when run alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()


_worker: Worker | None = None


def _init_worker(factory: Callable[[], Worker], threads: int | None) -> None:
    global _worker
    if threads:
        import torch

        torch.set_num_threads(threads)
    _worker = factory()


def _do_shard(path: str, name: str) -> dict:
    writer = StoreWriter(path)
    result, stats = _worker(name, writer.shards[name])
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
    rank, world = dist_info()
    if rank == 0:
        StoreWriter.create(out, kind, fp, meta, shards, force=force)
    barrier(world)
    writer = StoreWriter(out)
    mine = [s for i, s in enumerate(shards) if i % world == rank]
    todo = [s for s in mine if s in set(writer.pending())]
    done = len(mine) - len(todo)
    if done:
        log.info("%s: %d of %d shard(s) already complete, skipped", out, done, len(mine))
    totals: Counter = Counter()
    bar = tqdm(total=sum(len(shards[s]) for s in todo), desc=desc or kind, unit="utt",
               disable=not todo or None)
    if nj <= 1:
        _init_worker(factory, None)
        for name in todo:
            totals.update(_do_shard(out, name))
            bar.update(len(shards[name]))
    elif todo:
        threads = max(1, (os.cpu_count() or 1) // nj)
        with ProcessPoolExecutor(nj, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(factory, threads)) as pool:
            futures = {pool.submit(_do_shard, out, name): name for name in todo}
            try:
                for fut in as_completed(futures):
                    totals.update(fut.result())
                    bar.update(len(shards[futures[fut]]))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    bar.close()
    barrier(world)
    skipped = writer.finish(skipped_before) if rank == 0 else []
    return dict(totals), skipped
