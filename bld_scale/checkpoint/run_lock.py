"""One run per output_dir: a lock file, `<output_dir>/run.lock`, held by rank 0 while the run lives.

Rank 0 takes it before it reads or changes anything in the folder (resume / --fresh decisions,
metrics, checkpoints, final/) and releases it when the run ends, whatever the exit; every rank
learns the outcome (`locked_output_dir`). A second run on the same folder is refused (exit 2),
naming the holder.

The lock is `fcntl.flock` on the file, which the kernel releases when the holding process dies
(even by SIGKILL), so a crashed run never blocks the next one. The file also records the holder
(host, pid, start time, SLURM job) for the messages; a record left by a run that died without
releasing is taken over with a note. On NFS the Linux client turns flock into an NFS byte-range
lock, which the server arbitrates across hosts (when the mount has locking: not `nolock` or
`local_lock=flock|all`); Lustre needs the `flock` mount option (with `localflock` the lock is
per node only); GPFS and BeeGFS (with its global locks enabled) arbitrate across hosts. Where
the filesystem refuses flock, the run goes on with a warning and only the record is checked
(a live holder on this host is refused). Where locks are per node, two runs on two nodes are
not kept apart; the note on a takeover names the other host so that such a case shows.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = "run.lock"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class OutputDirLocked(RuntimeError):
    """Another live run holds the output_dir; the message names it and what to do."""


def _holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "command": " ".join(sys.argv)}


def _describe(record: dict) -> str:
    what = f"pid {record.get('pid', '?')} on host {record.get('host', '?')}"
    if record.get("started"):
        what += f", started {record['started']}"
    if record.get("slurm_job_id"):
        what += f", SLURM job {record['slurm_job_id']}"
    return what


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


class RunLock:
    """`<output_dir>/run.lock`: `acquire()` or OutputDirLocked; `release()` at the end."""

    def __init__(self, output_dir: str | os.PathLike, log=None):
        self.path = Path(output_dir) / LOCK_NAME
        self.log = log or (lambda message: print(f"[bld_scale] {message}", file=sys.stderr, flush=True))
        self.fd: int | None = None

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        try:
            record = json.loads(raw) if raw.strip() else {}
        except ValueError:
            record = {"host": "?", "pid": "?", "note": "unreadable record"}
        return record if isinstance(record, dict) else {}

    def _refuse(self, record: dict, why: str) -> OutputDirLocked:
        return OutputDirLocked(
            f"output_dir {self.path.parent} is in use by another run ({_describe(record)}): {why}. "
            f"Wait for it to end or stop it (kill -TERM {record.get('pid', 'PID')} on {record.get('host', 'its host')} "
            f"saves a checkpoint and stops it), or choose another output_dir; if no such run exists any "
            f"more, delete {self.path}")

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # retried only when the holder removed the file under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = self._read(fd)
                os.close(fd)
                raise self._refuse(record, f"it holds {self.path}")
            except OSError as err:
                if err.errno not in UNSUPPORTED:
                    os.close(fd)
                    raise
                return self._without_flock(fd, err)
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                return self._take(fd)
            os.close(fd)  # the previous holder unlinked it while we waited: lock the new file
        raise OSError(f"could not lock {self.path}: it keeps being replaced")

    def _take(self, fd: int) -> "RunLock":
        previous = self._read(fd)
        if previous and previous.get("pid") != os.getpid():
            where = "" if previous.get("host") == socket.gethostname() else (
                " If that run is still running on its host, this filesystem does not share locks "
                "between hosts: stop one of the two runs.")
            self.log(f"note: taking over {self.path}, left by a run that ended without releasing it "
                     f"({_describe(previous)}).{where}")
        self._write(fd)
        return self

    def _without_flock(self, fd: int, err: OSError) -> "RunLock":
        previous = self._read(fd)
        if previous.get("host") == socket.gethostname() and previous.get("pid") != os.getpid() \
                and _pid_alive(previous.get("pid")):
            os.close(fd)
            raise self._refuse(previous, "its process is alive")
        self.log(f"warning: {self.path.parent}'s filesystem does not support file locks ({err.strerror}): "
                 "a second run on this output_dir from another host would not be refused")
        self._write(fd)
        return self

    def _write(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_holder_record()) + "\n").encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        """Remove the file (if it is still ours) and drop the lock; a no-op when not held."""
        if self.fd is None:
            return
        try:
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = None


@contextmanager
def locked_output_dir(output_dir: str | os.PathLike, rank: int, world: int, log=None):
    """Rank 0 holds `<output_dir>/run.lock` for the body; every rank raises the same
    OutputDirLocked when it is taken (a collective: every rank must enter it)."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(output_dir, log).acquire()
        except OutputDirLocked as err:
            error = str(err)
    if world > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise OutputDirLocked(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
