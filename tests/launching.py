"""Helpers for tests that launch the pipeline as real processes (torchrun, deepspeed)."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISTILL = REPO / "launch" / "distill.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # one thread per rank on a 2-core machine
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def torchrun(n: int, *args, script: Path = DISTILL) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), str(script), *args]


def run_launch(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` in the repository with rank_env(), whose
    timeout ends the whole process group: the launcher *and* its ranks. (subprocess.run kills only
    the launcher; its ranks live on, hold cores and ports, and turn one hung test into a suite of
    timeouts.) On a timeout the test fails with the output so far."""
    import pytest

    proc = subprocess.Popen(cmd, cwd=REPO, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def records(out: Path, kind: str = "train") -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


LOSS_KEYS = ("loss", "loss_ce", "loss_byte_ce", "loss_kl")


def assert_same_steps(run_a: Path, run_b: Path, steps: int, keys=LOSS_KEYS, **approx) -> list[tuple[dict, dict]]:
    """Two runs' train records: `steps` each, the same data positions, `keys` equal within
    `pytest.approx(**approx)`. Returns the record pairs for further checks."""
    import pytest

    a, b = records(run_a, "train"), records(run_b, "train")
    assert len(a) == len(b) == steps, (len(a), len(b))
    for x, y in zip(a, b):
        assert x["data_position"] == y["data_position"]
        for key in keys:
            assert y[key] == pytest.approx(x[key], **approx), (key, x, y)
    return list(zip(a, b))
