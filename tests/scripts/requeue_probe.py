"""Entry for the SLURM requeue test: the first run (SLURM_RESTART_COUNT=0) records itself and
sleeps until the time-limit signal requeues the job; the requeued run records itself and exits 0.
Run under torchrun like the real entry, so the whole launch path is exercised."""
import os
import sys
import time

marker = sys.argv[1]
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
if int(os.environ.get("RANK", "0")) == 0:
    with open(marker, "a") as f:
        f.write(f"start {restart}\n")
if restart == 0:
    time.sleep(600)  # killed by the requeue long before this ends
