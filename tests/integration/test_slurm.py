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
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "distill.sbatch"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("BLD_TEST_SLURM") != "1", reason="opt-in: BLD_TEST_SLURM=1"),
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
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


TINY = ["train.micro_batch_size=2", "train.log_interval=1", "train.eval_interval=0", "train.warmup_steps=2",
        "data.heldout=[]"]


def _train_steps(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_sbatch_two_ranks(cluster, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "slurm-%j.out"
    proc = cluster.sbatch_wait(
        ["--nodes=1", "--cpus-per-task=2", f"--output={log}", "--time=20",
         _export(BLD_NPROC_PER_NODE="2"), str(SBATCH), f"output_dir={out}", "train.max_steps=4", *TINY],
        timeout=900, cwd=tmp_path)
    # The job log interleaves progress bars of several processes: partial multi-byte characters.
    logs = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{logs[-6000:]}"
    assert "first_node=node1" in logs and "MASTER_ADDR=127.0.0.1" in logs and "nproc_per_node=2" in logs, logs[-3000:]
    assert "world size 2" in logs, logs[-3000:]
    assert _train_steps(out) == [1, 2, 3, 4]
    assert (out / "final" / "byte_head.safetensors").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-4"


def test_usr1_saves_requeues_and_resumes(cluster, tmp_path):
    """USR1 to the batch shell mid-run (what --signal=B:USR1@N sends before the time limit): the
    trap asks every rank to save and stop, then requeues; the requeued job (SLURM_RESTART_COUNT=1)
    resumes from the checkpoint and completes the run.

    The test sends the signal itself once a few steps are logged (`scancel --batch`), so it does
    not depend on how fast this machine runs relative to SLURM's time-limit clock.
    """
    import time

    out = tmp_path / "run"
    sub = cluster.client(["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", "--time=20",
                          f"--output={tmp_path}/slurm-%j.out", _export(BLD_NPROC_PER_NODE="2"), str(SBATCH),
                          f"output_dir={out}", "train.max_steps=30", "checkpoint.interval=10", *TINY],
                         cwd=tmp_path, check=True)
    job = sub.stdout.strip().split(";")[0]
    deadline, nudged, pending_since, state, signalled = time.time() + 1200, 0, None, "", False
    while time.time() < deadline:
        state = cluster.client(["scontrol", "show", "job", job, "-o"]).stdout
        if "JobState=COMPLETED" in state or "JobState=FAILED" in state:
            break
        if not signalled and (out / "metrics.jsonl").is_file() and len(_train_steps(out)) >= 3:
            cluster.client(["scancel", "--batch", "--signal=USR1", job], check=True)
            signalled = True
        restarts = int(state.split("Restarts=")[1].split()[0]) if "Restarts=" in state else 0
        if "JobState=PENDING" in state and restarts > nudged:
            pending_since = pending_since or time.time()
            # A requeued job is held back ~2.5 min (BeginTime); start it now, but not within a few
            # seconds of the requeue (slurmd then refuses the launch: "Job credential revoked").
            if time.time() - pending_since > 5:
                cluster.client(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
                nudged, pending_since = restarts, None
        time.sleep(1)
    logs = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("slurm-*.out"))
    assert "JobState=COMPLETED" in state, f"{state}\n{logs[-6000:]}"
    assert "USR1" in logs and "restart=1" in logs and "requeueing" in logs, logs[-4000:]
    assert "stopped at step" in logs and "resumed from" in logs, logs[-4000:]
    assert signalled
    assert _train_steps(out) == list(range(1, 31)), _train_steps(out)  # nothing lost, nothing twice
    summaries = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"summary"' in x]
    assert len(summaries) == 1
