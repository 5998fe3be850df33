"""One writer per output directory: a live holder refuses, a dead one's lock is taken over."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from lalmtool.lock import LOCK_FILE, LockError, output_lock
from lalmtool.store import StoreError

HOLD = textwrap.dedent("""
    import sys, time
    from lalmtool.lock import output_lock
    with output_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
""")


def _holder(out_dir) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out_dir)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_process_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "out"
    p = _holder(out)
    try:
        with pytest.raises(LockError) as e:
            with output_lock(str(out)):
                pass
        msg = str(e.value)
        assert f"is being written by pid {p.pid} on host" in msg
        assert msg.endswith(f"or remove {os.path.realpath(out / LOCK_FILE)} if that process is gone")
        assert isinstance(e.value, StoreError)
    finally:
        p.kill()
        p.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    p = _holder(out)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == p.pid  # left behind
    with caplog.at_level(logging.WARNING, logger="lalmtool.lock"):
        with output_lock(str(out)):
            assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over a stale lock left by pid {p.pid}" in caplog.text
    assert not (out / LOCK_FILE).exists()  # released on exit


def test_released_on_exception_and_reentrant(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(KeyError):
        with output_lock(out):
            with output_lock(out):  # the same process nests freely
                pass
            assert os.path.exists(os.path.join(out, LOCK_FILE))
            raise KeyError("boom")
    assert not os.path.exists(os.path.join(out, LOCK_FILE))
    with output_lock(out):  # free again
        pass


def test_forked_worker_shares_the_parents_lock(tmp_path):
    out = str(tmp_path / "out")
    with output_lock(out):
        pid = os.fork()
        if pid == 0:  # a --nj worker: nesting inside the inherited lock must not raise
            try:
                with output_lock(out):
                    os._exit(0)
            except BaseException:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_only_rank_0_of_a_torchrun_job_locks(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with output_lock(out):
        monkeypatch.setenv("RANK", "1")
        with output_lock(out):  # another rank of the same job: no lock of its own
            assert json.loads(open(os.path.join(out, LOCK_FILE)).read())["pid"] == os.getpid()
        monkeypatch.setenv("RANK", "0")
    assert not os.path.exists(os.path.join(out, LOCK_FILE))
