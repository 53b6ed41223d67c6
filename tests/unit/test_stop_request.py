"""Stop requests (bld_scale/checkpoint/preemption.py): SIGINT is a stop request like SIGTERM, a
second SIGINT aborts only when it is the user's (not a launcher's copy of the first), and a rank
whose launcher dies stops (real processes: a fake launcher script named like one)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bld_scale.checkpoint import preemption
from bld_scale.checkpoint.preemption import LauncherWatch, StopRequest, launcher_name

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def handlers(monkeypatch):
    """Install a StopRequest's handlers for the test, restoring the previous ones after."""
    monkeypatch.delenv("BLD_STOP_FILE", raising=False)
    old = {name: signal.getsignal(getattr(signal, name)) for name in StopRequest.SIGNALS}
    yield lambda: StopRequest().install()
    for name, handler in old.items():
        signal.signal(getattr(signal, name), handler)


def _deliver(sig) -> None:
    os.kill(os.getpid(), sig)
    for _ in range(100):  # the Python-level handler runs at the next bytecode boundary
        time.sleep(0.001)


def test_sigint_is_a_stop_request(handlers):
    stop = handlers()
    assert not stop.requested
    _deliver(signal.SIGINT)
    assert stop.requested and stop.received == "SIGINT"


def test_a_launchers_copy_of_the_sigint_does_not_abort_but_a_later_one_does(handlers, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: clock[0])
    stop = handlers()
    _deliver(signal.SIGINT)
    clock[0] += preemption.ABORT_AFTER_S - 0.1  # torchrun forwards the terminal's Ctrl-C at once
    _deliver(signal.SIGINT)
    _deliver(signal.SIGTERM)  # the DeepSpeed launcher answers Ctrl-C with SIGTERM to the ranks
    assert stop.received == "SIGINT"
    assert not stop.aborting
    clock[0] += 0.2  # the user's second Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        _deliver(signal.SIGINT)
    assert stop.aborting


def test_sigterm_then_sigint_stops_once(handlers):
    stop = handlers()
    _deliver(signal.SIGTERM)
    _deliver(signal.SIGINT)  # the first SIGINT: a stop request, already made
    assert stop.received == "SIGTERM"


@pytest.mark.parametrize("cmdline, name", [
    (["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "2", "launch/distill.py"], "deepspeed"),
    (["/venv/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30="], "deepspeed.launcher.launch"),
    (["python", "-m", "torch.distributed.run", "--nproc_per_node", "2"], "torch.distributed.run"),
    (["/venv/bin/python3", "/venv/bin/torchrun", "x.py"], "torchrun"),
    (["bash", "-c", "torchrun x.py"], None),
    (["python", "launch/distill.py", "--local_rank=0"], None),
    (["/usr/sbin/slurmstepd"], None),
    ([], None),
])
def test_launcher_names(cmdline, name):
    assert launcher_name(cmdline) == name


def test_a_dead_launcher_is_a_stop_request():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    import psutil

    watch = LauncherWatch([(proc.pid, psutil.Process(proc.pid).create_time(), "deepspeed")])
    stop = StopRequest(watch)
    try:
        assert watch.gone() is None and not stop.requested
    finally:
        proc.kill()
        proc.wait()
    assert stop.requested and stop.received == f"launcher deepspeed (pid {proc.pid}) exited"


# A fake launcher chain: `deepspeed` (a script of that name) starts a rank that installs the stop
# handlers and waits at "step boundaries" until a stop request; the test kills the launcher.
FAKE_LAUNCHER = """import subprocess, sys
subprocess.run([sys.executable, "-c", sys.argv[1]])
"""
RANK = """import sys, time
from bld_scale.checkpoint.preemption import install_stop_handlers
stop = install_stop_handlers()
print("watching", [name for _, _, name in stop.watch.launchers], flush=True)
while not stop.requested:
    time.sleep(0.05)
print("stopped:", stop.received, flush=True)
"""


def test_a_rank_stops_when_its_launcher_is_killed(tmp_path):
    launcher = tmp_path / "deepspeed"
    launcher.write_text(FAKE_LAUNCHER)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("BLD_STOP_FILE", None)
    agent = subprocess.Popen([sys.executable, str(launcher), RANK], stdout=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
    try:
        assert agent.stdout.readline().strip() == "watching ['deepspeed']"
        agent.send_signal(signal.SIGTERM)  # the DeepSpeed runner dies at once, forwarding nothing
        agent.wait(timeout=30)
        line = agent.stdout.readline().strip()  # the rank, orphaned, still writes to the pipe
        assert line == f"stopped: launcher deepspeed (pid {agent.pid}) exited"
    finally:
        try:
            os.killpg(agent.pid, signal.SIGKILL)  # this test's own process group only
        except ProcessLookupError:
            pass


def test_no_launcher_no_watch():
    assert LauncherWatch.of_this_process().launchers == []  # pytest's parent is not a launcher
