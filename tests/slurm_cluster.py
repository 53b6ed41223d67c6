"""A throwaway one-node SLURM cluster on localhost, for tests (Debian 12's SLURM 22.05, no cgroups).

Follows /work/shared/docs/local-slurm.md: munged as user munge, `slurmctld -D -i` and
`slurmd -D -N NODE` with SLURM_CONF pointing at a config in a temporary folder. Every client call
has a timeout (with a dead slurmctld they block and retry forever), and `stop()` kills only the
daemons this object started, by PID (a slurmd that never registered ignores SIGTERM: SIGKILL).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmd", "slurmctld", "slurm-client", "munge"]
NODE = "node1"


def ensure_installed(timeout: int = 600) -> None:
    """apt-get the daemons and clients if missing (needs root and the Debian mirror)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=timeout, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                   check=True, timeout=timeout, env=env)


class LocalSlurm:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="bld_slurm_"))
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "LocalSlurm":
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        if not self._munge_ok():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            self._spawn("munged", ["munged", "--foreground"], user="munge", group="munge")
            self._until(self._munge_ok, 10, "munged did not come up")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._spawn("slurmd", ["slurmd", "-D", "-N", NODE])
        self._until(lambda: "idle" in self.client(["sinfo", "-h", "-o", "%t"]).stdout, timeout,
                    "node never became idle")
        return self

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()  # by PID: this Popen only
                p.wait(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- clients ------------------------------------------------------------------------------
    def client(self, args: list[str], timeout: float = 20.0, check: bool = False,
               **kw) -> subprocess.CompletedProcess:
        self.check_alive()
        return subprocess.run(args, env={**self.env, **kw.pop("env", {})}, capture_output=True,
                              text=True, timeout=timeout, check=check, **kw)

    def sbatch_wait(self, args: list[str], timeout: float = 900.0, **kw) -> subprocess.CompletedProcess:
        """`sbatch --wait` (returns the job's exit code); daemons are checked on the way out."""
        proc = self.client(["sbatch", "--wait", *args], timeout=timeout, **kw)
        self.check_alive()
        return proc

    def check_alive(self) -> None:
        for name in ("slurmctld", "slurmd"):
            p = self.procs.get(name)
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{name} died (rc {p.returncode}); see {self.root / 'log'}")

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- internals ----------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            **kw)

    def _munge_ok(self) -> bool:
        try:
            enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
            return enc.returncode == 0 and subprocess.run(
                ["unmunge"], input=enc.stdout, capture_output=True, timeout=5).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _until(self, pred, timeout: float, what: str) -> None:
        end = time.time() + timeout
        while time.time() < end:
            self.check_alive()
            try:
                if pred():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{what} within {timeout:.0f} s; logs in {self.root / 'log'}")

    def _config(self) -> str:
        r = self.root
        host = socket.gethostname().split(".")[0]  # must be the real short hostname
        return "\n".join([
            "ClusterName=bldtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            "SlurmUser=root",
            f"NodeName={NODE} NodeHostname={NODE} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
            f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none",
            "ReturnToService=2", "SlurmdParameters=config_overrides", "MailProg=/bin/true",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.log",
            "SlurmctldPort=6817", "SlurmdPort=6818",
        ]) + "\n"
