"""<output_dir>/run.lock (bld_scale/checkpoint/run_lock.py) with real processes holding it: a live
holder is refused by name, a holder killed with SIGKILL leaves a record that the next run takes
over with a note, and a filesystem without flock falls back to the record."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bld_scale.checkpoint.run_lock import LOCK_NAME, OutputDirLocked, RunLock, locked_output_dir

REPO = Path(__file__).resolve().parents[2]
HOLD = """
import sys
from bld_scale.checkpoint.run_lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills us)
lock.release()
"""


def _holder(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_acquire_records_the_holder_and_release_removes_the_file(tmp_path):
    out = tmp_path / "run"  # made by acquire
    lock = RunLock(out).acquire()
    record = json.loads((out / LOCK_NAME).read_text())
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    lock.release()
    assert not (out / LOCK_NAME).exists()
    lock.release()  # twice: no-op


def test_a_live_holder_is_refused_by_name(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(OutputDirLocked) as err:
            RunLock(tmp_path).acquire()
        msg = str(err.value)
        assert msg.startswith(f"output_dir {tmp_path} is in use by another run (pid {holder.pid} on host "
                              f"{socket.gethostname()}, started ")
        assert f"kill -TERM {holder.pid}" in msg and f"delete {tmp_path / LOCK_NAME}" in msg
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid  # untouched
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not (tmp_path / LOCK_NAME).exists()  # released by the holder
    RunLock(tmp_path).acquire().release()  # free again


def test_a_killed_holders_lock_is_taken_over_with_a_note(tmp_path):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)  # no release: the record stays, the kernel drops the flock
    holder.wait(timeout=30)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    notes = []
    lock = RunLock(tmp_path, log=notes.append).acquire()
    try:
        assert len(notes) == 1 and notes[0].startswith(
            f"note: taking over {tmp_path / LOCK_NAME}, left by a run that ended without releasing it "
            f"(pid {holder.pid} on host {socket.gethostname()}")
        assert "does not share locks" not in notes[0]  # same host
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_record_from_another_host_is_taken_over_with_a_warning(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "node-elsewhere", "pid": 1234}))
    notes = []
    RunLock(tmp_path, log=notes.append).acquire().release()
    assert "pid 1234 on host node-elsewhere" in notes[0] and "does not share locks between hosts" in notes[0]


def test_without_flock_a_live_holder_on_this_host_is_still_refused(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        with pytest.raises(OutputDirLocked, match=f"pid {sleeper.pid} on host .*its process is alive"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    notes = []
    lock = RunLock(tmp_path, log=notes.append).acquire()  # the holder is dead now
    assert notes == [f"warning: {tmp_path}'s filesystem does not support file locks (No locks available): a "
                     "second run on this output_dir from another host would not be refused"]
    lock.release()


def test_locked_output_dir_on_one_rank(tmp_path):
    with locked_output_dir(tmp_path, rank=0, world=1) as lock:
        assert lock.fd is not None and (tmp_path / LOCK_NAME).is_file()
        with pytest.raises(OutputDirLocked):
            with locked_output_dir(tmp_path, rank=0, world=1):
                pass
    assert not (tmp_path / LOCK_NAME).exists()
    with pytest.raises(RuntimeError, match="boom"):  # released on any exit
        with locked_output_dir(tmp_path, rank=0, world=1):
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()

