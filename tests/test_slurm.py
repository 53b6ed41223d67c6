"""launch/slurm/distill.sbatch on a real one-node SLURM cluster started on localhost.

Opt-in (BLD_TEST_SLURM=1): it apt-installs slurmd/slurmctld/munge when missing and starts root
daemons, side effects a plain `pytest` must not have. It does run on the CI machine kind (root,
Debian 12): ~15 s install + ~40-60 s per job there, so a CI job can set BLD_TEST_SLURM=1.
The job's program is the two-engine prototype for now; BLD_SLURM_ENTRY / BLD_SLURM_ARGS point it
elsewhere (e.g. launch/distill.py and a recipe) without editing this file.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm" / "distill.sbatch"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("BLD_TEST_SLURM") != "1", reason="opt-in: BLD_TEST_SLURM=1"),
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from slurm_cluster import LocalSlurm, ensure_installed

    ensure_installed()
    c = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield c
    finally:
        c.stop()


def _export(**extra) -> str:
    env = {"BLD_REPO": str(REPO), "BLD_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}
    return "--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items())


def test_sbatch_two_ranks(cluster, tmp_path):
    out = tmp_path / "r.json"
    entry = os.environ.get("BLD_SLURM_ENTRY", "tests/scripts/two_engines.py")
    args = shlex.split(os.environ.get("BLD_SLURM_ARGS", f"--out {out} --global-batch 4"))
    log = tmp_path / "slurm-%j.out"
    proc = cluster.sbatch_wait(
        ["--nodes=1", "--cpus-per-task=2", f"--output={log}", "--time=20",
         _export(BLD_ENTRY=entry, BLD_NPROC_PER_NODE="2"), str(SBATCH), *args],
        timeout=900, cwd=tmp_path)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{logs[-6000:]}"
    assert "first_node=node1" in logs and "MASTER_ADDR=127.0.0.1" in logs and "nproc_per_node=2" in logs, logs[-3000:]
    if "BLD_SLURM_ARGS" in os.environ:
        return  # a custom entry: its own outputs are its own business
    r = json.loads(out.read_text())
    assert r["world"] == 2 and r["restart_count"] == 0
    losses = [s["loss"] for s in r["steps"]]
    assert losses[-1] < losses[0], losses


def test_usr1_requeues_and_restarts(cluster, tmp_path):
    """--signal=B:USR1@N: the trap requeues; the job runs again with SLURM_RESTART_COUNT=1."""
    import time

    marker = tmp_path / "starts.txt"
    # 2-minute limit, signal 100 s before it: USR1 ~20 s in (SLURM checks limits every ~30 s).
    sub = cluster.client(["sbatch", "--parsable", "--nodes=1", "--time=2", "--signal=B:USR1@100",
                          f"--output={tmp_path}/slurm-%j.out",
                          _export(BLD_ENTRY="tests/scripts/requeue_probe.py", BLD_NPROC_PER_NODE="1"),
                          str(SBATCH), str(marker)], cwd=tmp_path, check=True)
    job = sub.stdout.strip().split(";")[0]
    deadline, nudged, state = time.time() + 420, False, ""
    while time.time() < deadline:
        state = cluster.client(["scontrol", "show", "job", job, "-o"]).stdout
        if "JobState=COMPLETED" in state or "JobState=FAILED" in state:
            break
        if "JobState=PENDING" in state and "Restarts=1" in state and not nudged:
            # A requeued job is held back ~2.5 min (BeginTime); start it now.
            cluster.client(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            nudged = True
        time.sleep(2)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert "JobState=COMPLETED" in state, f"{state}\n{logs[-4000:]}"
    assert marker.read_text().split("\n")[:2] == ["start 0", "start 1"], marker.read_text()
    assert "USR1" in logs and "restart=1" in logs, logs[-4000:]  # --open-mode=append kept run 1
