"""Stop requests: SIGTERM / SIGUSR1 / SIGINT, a stop file, or a launcher that died, become a flag
read at step boundaries.

The handlers only set the flag; the training loop agrees on it across ranks, saves and exits 0.

- SIGINT (Ctrl-C) is a stop request like SIGTERM. A second SIGINT at least `ABORT_AFTER_S`
  seconds after the first raises KeyboardInterrupt (abort without saving): launchers forward a
  Ctrl-C to ranks that the terminal already signalled (torchrun sends SIGINT again), and such a
  copy arrives within a fraction of a second, so it must not count as the user's second Ctrl-C.
- A stop file named by BLD_STOP_FILE does the same (the SLURM script and scripts/demo.sh touch it).
- The launcher processes above this rank (`deepspeed`, `deepspeed.launcher.launch`, `torchrun`),
  recorded at start-up: when one of them is gone (killed; the `deepspeed` runner dies at once on
  SIGTERM and forwards nothing), the rank would otherwise train on to the end unattended.

Standard library only at import time: `launch/distill.py` installs the handlers before any heavy
import, so a signal during start-up does not kill the rank (psutil, a DeepSpeed dependency, is
imported when the launchers are looked up).
"""
from __future__ import annotations

import os
import signal
import sys
import time

ABORT_AFTER_S = 2.0  # a second SIGINT sooner than this is a launcher's copy of the first

# How launchers appear in a process's command line: a script name or a `-m` module.
LAUNCHER_SCRIPTS = ("deepspeed", "torchrun")
LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                    "torch.distributed.launch")


def launcher_name(cmdline: list[str]) -> str | None:
    """The launcher a command line runs (e.g. 'deepspeed.launcher.launch'), or None."""
    for i, word in enumerate(cmdline[:3]):  # the interpreter, then the script or `-m module`
        if os.path.basename(word) in LAUNCHER_SCRIPTS:
            return os.path.basename(word)
        if word == "-m" and i + 1 < len(cmdline) and cmdline[i + 1] in LAUNCHER_MODULES:
            return cmdline[i + 1]
    return None


class LauncherWatch:
    """The chain of launcher processes above this one (parent first), as (pid, start time, name)."""

    def __init__(self, launchers: list[tuple[int, float, str]]):
        self.launchers = launchers

    @classmethod
    def of_this_process(cls) -> "LauncherWatch":
        try:
            import psutil
        except ImportError:
            return cls([])
        found = []
        try:
            proc = psutil.Process().parent()
            while proc is not None and proc.pid > 1:
                name = launcher_name(proc.cmdline())
                if name is None:
                    break
                found.append((proc.pid, proc.create_time(), name))
                proc = proc.parent()
        except psutil.Error:
            pass
        return cls(found)

    def gone(self) -> str | None:
        """'<name> (pid N)' of the first launcher that no longer runs, else None."""
        if not self.launchers:
            return None
        import psutil

        for pid, started, name in self.launchers:
            try:
                proc = psutil.Process(pid)
                alive = proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            except psutil.Error:
                alive = True  # cannot tell: assume it runs
            if not alive:
                return f"{name} (pid {pid})"
        return None


class StopRequest:
    """SIGTERM / SIGUSR1 / SIGINT, a stop file, or a dead launcher -> a flag read at step boundaries."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self, watch: LauncherWatch | None = None):
        self.received: str | None = None
        self.stop_file = os.environ.get("BLD_STOP_FILE") or None
        self.watch = watch or LauncherWatch([])
        self._first_sigint: float | None = None
        self.aborting = False  # a second Ctrl-C came: whatever fails from here on is that abort

    def install(self) -> "StopRequest":
        for name in self.SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint >= ABORT_AFTER_S:
                self.aborting = True
                raise KeyboardInterrupt  # the user's second Ctrl-C: abort without saving
            if self._first_sigint is None:
                self._first_sigint = now
        if self.received is None:
            self.received = name
            _say_on_rank0(f"[bld_scale] {name}: stopping at the next step boundary after saving a "
                          "checkpoint" + (" (Ctrl-C again to abort without saving)" if name == "SIGINT" else ""))

    @property
    def requested(self) -> bool:
        if self.received is None and self.stop_file and os.path.exists(self.stop_file):
            self.received = f"stop file {self.stop_file}"
        if self.received is None:
            gone = self.watch.gone()
            if gone:
                self.received = f"launcher {gone} exited"
        return self.received is not None


def _say_on_rank0(message: str) -> None:
    """One line on stderr from rank 0; os.write, not print: this runs inside a signal handler,
    which may have interrupted a print to the same stream."""
    if os.environ.get("RANK", "0") == "0":
        try:
            os.write(sys.stderr.fileno(), (message + "\n").encode())
        except (OSError, ValueError):
            pass


_STOP: StopRequest | None = None


def install_stop_handlers() -> StopRequest:
    """Install the handlers once per process (the entry point calls it first thing)."""
    global _STOP
    if _STOP is None:
        _STOP = StopRequest(LauncherWatch.of_this_process()).install()
    return _STOP
