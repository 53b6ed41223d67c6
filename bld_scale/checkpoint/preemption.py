"""Preemption: SIGTERM / SIGUSR1 (and an optional stop file) become a flag read at step boundaries.

The handlers only set the flag; the training loop agrees on it across ranks, saves and exits 0.
A stop file named by BLD_STOP_FILE does the same (the SLURM script touches it as well as
forwarding the signal). Standard library only: `launch/distill.py` installs the handlers before
any heavy import, so a signal during start-up does not kill the rank.
"""
from __future__ import annotations

import os
import signal


class StopRequest:
    """SIGTERM / SIGUSR1 (and an optional stop file) -> a flag read at step boundaries."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self.stop_file = os.environ.get("BLD_STOP_FILE") or None

    def install(self) -> "StopRequest":
        for name in self.SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        if self.received is None and self.stop_file and os.path.exists(self.stop_file):
            self.received = f"stop file {self.stop_file}"
        return self.received is not None


_STOP: StopRequest | None = None


def install_stop_handlers() -> StopRequest:
    """Install the handlers once per process (the entry point calls it first thing)."""
    global _STOP
    if _STOP is None:
        _STOP = StopRequest().install()
    return _STOP
