"""The checkpoint package imports without torch (launch/distill.py installs the stop handlers from
it before any heavy import), and its stop request reacts to the signals SLURM sends."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# `bld_scale/__init__.py` itself re-exports torch code; this checks the checkpoint package on its
# own: the parent package is stubbed, and importing torch, NumPy or DeepSpeed fails.
NO_HEAVY_IMPORTS = f"""
import sys, types
pkg = types.ModuleType("bld_scale")
pkg.__path__ = [{str(REPO / "bld_scale")!r}]
sys.modules["bld_scale"] = pkg
for name in ("torch", "numpy", "deepspeed", "transformers"):
    sys.modules[name] = None  # `import name` now raises ImportError
import bld_scale.checkpoint as c
c.install_stop_handlers()
print(sorted(c.__all__))
"""


def test_the_checkpoint_package_imports_without_torch():
    proc = subprocess.run([sys.executable, "-c", NO_HEAVY_IMPORTS], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "CheckpointManager" in proc.stdout and "install_stop_handlers" in proc.stdout


def test_a_signal_becomes_a_stop_request_and_does_not_kill(monkeypatch):
    from bld_scale.checkpoint.preemption import StopRequest

    monkeypatch.delenv("BLD_STOP_FILE", raising=False)
    old = {name: signal.getsignal(getattr(signal, name)) for name in StopRequest.SIGNALS}
    try:
        stop = StopRequest().install()
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.received == "SIGUSR1"
    finally:
        for name, handler in old.items():
            signal.signal(getattr(signal, name), handler)


def test_a_stop_file_is_a_stop_request(tmp_path, monkeypatch):
    from bld_scale.checkpoint.preemption import StopRequest

    monkeypatch.setenv("BLD_STOP_FILE", str(tmp_path / "stop"))
    stop = StopRequest()
    assert not stop.requested
    (tmp_path / "stop").touch()
    assert stop.requested and stop.received == f"stop file {tmp_path / 'stop'}"
