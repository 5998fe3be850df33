"""Running a stage over the shards of a store: in-process, ``--nj`` local workers, or torchrun.

Every shard has exactly one writer. Under ``torchrun`` (or ``srun`` with ``RANK``/``WORLD_SIZE``
set) rank r takes shards r, r + W, r + 2W, ... of the fixed plan; with ``--nj N`` a local process
pool takes the shards of this rank. Rank 0 creates the store before anyone writes and finishes it
after everyone is done (a gloo barrier when a process group is needed).
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Callable, Iterable

from tqdm import tqdm

from .lock import output_lock
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


#: How long a rank waits at a barrier for the others: they may still be encoding their shards
#: (gloo's default, 30 min, would fail a long run). A rank that fails does not leave the others
#: waiting this long: torchrun stops every rank when one exits with an error (under Slurm use
#: ``srun --kill-on-bad-exit=1``).
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        dist.barrier()


_factory: Callable[[], Worker] | None = None
_worker: Worker | None = None
_tick: Callable[[int], None] = lambda n: None


def die_with_parent(parent: int) -> None:
    """Ends this worker process when ``parent`` dies (even by SIGKILL), so no worker outlives it.

    Linux: the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``);
    elsewhere a daemon thread checks the parent pid every second.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        import threading
        import time

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _init_worker(factory: Callable[[], Worker] | bytes, threads: int | None, counter=None,
                 parent: int | None = None, lazy: bool = False) -> None:
    """Sets up this process's worker; ``lazy``: built by its first task, so that an error in
    ``factory`` (a model that does not load) reaches the parent as that task's exception.
    A pickled ``factory`` is unpickled (importing torch, say) only once this process is tied
    to its ``parent``."""
    global _factory, _worker, _tick
    if parent is not None:
        die_with_parent(parent)
    if isinstance(factory, bytes):
        factory = pickle.loads(factory)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if counter is not None:
        def _tick(n: int) -> None:
            with counter.get_lock():
                counter.value += n
    _factory, _worker = factory, None
    if not lazy:
        _worker = factory()


def _loaded() -> Worker:
    global _worker
    if _worker is None:
        _worker = _factory()
    return _worker


def _do_shard(path: str, name: str) -> dict:
    writer = StoreWriter(path)
    result, stats = _loaded()(name, writer.shards[name], _tick)
    writer.write_shard(name, result)
    return stats


def _head(head: Callable[[Worker], tuple[str, dict]]) -> tuple[str, dict]:
    return head(_loaded())


def run_sharded(out: str, kind: str, fp: str | None, meta: dict | None,
                shards: dict[str, list[str]], factory: Callable[[], Worker], nj: int = 1,
                force: bool = False, desc: str = "", skipped_before: list[dict] = (),
                head: Callable[[Worker], tuple[str, dict]] | None = None
                ) -> tuple[dict, list[dict]]:
    """Creates/resumes the store at ``out`` and fills its missing shards.

    ``factory`` is called once per worker process (it loads the model, say) and must be
    picklable when ``nj > 1``; the parent of ``nj > 1`` workers never calls it. When the
    store's fingerprint and meta depend on what the factory loads, pass ``fp=meta=None`` and
    ``head``: ``head(worker)`` returns them, computed in a worker. Workers die with the parent;
    a worker's error stops the run once the shards being written are done (they are kept).
    Returns the summed statistics of the shards done now (this rank) and, on rank 0, the
    utterances skipped in the whole store (``skipped_before`` included: those left out before
    sharding).
    """
    global _tick
    rank, world = dist_info()
    pool = counter = None
    if nj > 1:  # started before the store is created when ``head`` needs a loaded worker
        ctx = get_context("spawn")
        counter = ctx.Value("q", 0)
        pool = ProcessPoolExecutor(nj, mp_context=ctx, initializer=_init_worker, initargs=(
            pickle.dumps(factory), max(1, (os.cpu_count() or 1) // nj), counter, os.getpid(),
            True))
    try:
        if head is not None:
            if pool is None:
                _init_worker(factory, None)
            fp, meta = pool.submit(_head, head).result() if pool else head(_worker)
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
        if pool is None:
            if head is None and todo:  # with ``head``, loaded above already
                _init_worker(factory, None)
            _tick = bar.update
            for name in todo:
                totals.update(_do_shard(out, name))
        else:
            futures = {pool.submit(_do_shard, out, name) for name in todo}
            while futures:
                done_now, futures = wait(futures, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done_now:
                    totals.update(fut.result())
                bar.update(counter.value - bar.n)
        bar.close()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    barrier(world)
    skipped = writer.finish(skipped_before) if rank == 0 else []
    return dict(totals), skipped


# -- what every sharded stage does around its workers ----------------------------------------
def check_out(out: str, *inputs: str, inside: dict[str, str] | None = None) -> None:
    """ValueError when ``--out`` names an existing file (a store is a directory) or one of the
    stage's input stores (which writing, or --force, would destroy); or when it is, lies inside
    or holds one of the directories ``inside`` gives by option (``{"--pooler": ADAPTER}``: a
    store is not written into an adapter's directory, nor around it)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; give a directory for the store")
    for path in inputs:
        if os.path.realpath(out) == os.path.realpath(path):
            raise ValueError(f"--out {out} is the input store {path}; give another directory")
    real = os.path.realpath(out)
    for flag, folder in (inside or {}).items():
        other = os.path.realpath(folder)
        common = os.path.commonpath([real, other])
        if common == other:
            where = "is" if real == other else "lies inside"
            raise ValueError(f"--out {out} {where} the {flag} directory {folder}; give the "
                             "store a directory of its own")
        if common == real:
            raise ValueError(f"{flag} {folder} lies inside --out {out}; give the store a "
                             "directory of its own")


def summarize(stats: dict, rate: float, out: str, skipped: list) -> dict:
    """Frames, tokens, tokens/s and compression ratio of what a stage wrote now."""
    frames, tokens = stats.get("frames", 0), stats.get("tokens", 0)
    seconds = stats.get("audio_seconds", 0.0) or frames / rate
    summary = {"store": out, "utterances": stats.get("utterances", 0), "frames": frames,
               "tokens": tokens, "tokens_per_s": tokens / seconds if seconds else 0.0,
               "frames_per_s": frames / seconds if seconds else 0.0,
               "compression": frames / tokens if tokens else 0.0, "skipped": len(skipped),
               "reused": not stats}  # finished before: nothing done now
    log.debug("%s", summary)  # the CLI prints it once, as a table
    return summary


def new_stats() -> dict:
    """A shard's statistics before its first utterance (``add_utterance`` fills them)."""
    return {"utterances": 0, "frames": 0, "tokens": 0, "audio_seconds": 0.0}


#: Attributes of an utterance that every later store keeps: where a packed store's encoder
#: window held it (``extract --pack``).
CARRIED_ATTRS = ("pack", "pack_start")


def add_utterance(result: ShardResult, stats: dict, utt: str, data, frames: int,
                  duration: float, source: dict | None = None) -> None:
    """Adds one utterance's output (``len(data)`` tokens from ``frames`` encoder frames) to a
    shard's result and statistics; ``source``: the attributes of its input (those in
    ``CARRIED_ATTRS`` are kept)."""
    kept = {k: source[k] for k in CARRIED_ATTRS if source and k in source}
    result.items.append((utt, data, {"duration": duration, "frames": frames, **kept}))
    stats["utterances"] += 1
    stats["frames"] += frames
    stats["tokens"] += len(data)
    stats["audio_seconds"] += duration


def each_utterance(outputs: Callable[[list[str]], Iterable[tuple]], batch_size: int = 1
                   ) -> Worker:
    """A worker's shard loop for a stage that writes one output per utterance (segment,
    pool, ctc segment): ``outputs(batch)`` yields ``(utt, data, frames, seconds, attrs)`` for
    each utterance of a batch of ids, or ``(utt, None, error)`` for one skipped."""
    def run(name: str, ids: list[str], tick) -> tuple[ShardResult, dict]:
        result, stats = ShardResult(), new_stats()
        for i in range(0, len(ids), batch_size):
            batch = ids[i : i + batch_size]
            for utt, data, *rest in outputs(batch):
                if data is None:
                    result.skipped.append({"id": utt, "error": rest[0]})
                else:
                    add_utterance(result, stats, utt, data, *rest)
            tick(len(batch))
        return result, stats

    return run


def write_stage(out: str, kind: str, fp: str, meta: dict, shards: dict[str, list[str]],
                factory: Callable[[], Worker], rate: float, nj: int = 1, force: bool = False,
                desc: str = "") -> dict:
    """Under ``out``'s lock, the store created or resumed and its missing shards written
    (``run_sharded``); returns the summary of what was written now (``summarize``)."""
    with output_lock(out):
        stats, skipped = run_sharded(out, kind, fp, meta, shards, factory, nj=nj, force=force,
                                     desc=desc)
    return summarize(stats, rate, out, skipped)


def for_utterance(utt: str, fn, *args):
    """Calls ``fn(*args)``; a ValueError it raises names the utterance."""
    try:
        return fn(*args)
    except ValueError as e:
        raise ValueError(f"utterance {utt!r}: {e}") from e
