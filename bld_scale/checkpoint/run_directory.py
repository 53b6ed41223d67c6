"""What a run does with its output_dir: resume its current checkpoint, start fresh, or refuse.

Rank 0 decides from the folder alone (`decide` only reads), and only a final decision changes
anything (`carry_out`): a refused run leaves the folder as it was. Then every rank learns the
outcome (`prepare_run_directory`).

- `--fresh`: discard the run: its checkpoints, metrics.jsonl, summary.json, final/, tensorboard/.
- No checkpoint: start at step 0, unless metrics.jsonl holds training records (a run whose
  checkpoints are gone): refused, --fresh or another output_dir. Records of an attempt that died
  before its first step (evaluations only) are dropped.
- A checkpoint: resume it if the identity matches (`checkpoint.identity`) and its step is not past
  train.max_steps; metrics.jsonl is cut back to its length at the checkpoint, so the steps the
  resumed run redoes are not recorded twice.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from bld_scale.checkpoint.errors import ResumeError
from bld_scale.checkpoint.identity import identity_problems
from bld_scale.checkpoint.meta import read_meta

METRICS = "metrics.jsonl"
RUN_OUTPUTS = (METRICS, "summary.json", "final", "tensorboard")  # what --fresh discards besides checkpoints


@dataclass(frozen=True)
class RunPlan:
    """A final decision about an output_dir, and the changes it makes."""
    resume_from: Path | None  # the checkpoint step folder to resume; None: start at step 0
    discard_checkpoints: bool = False
    remove: tuple[str, ...] = ()  # names under output_dir to delete
    metrics_bytes: int | None = None  # cut metrics.jsonl back to this length


def has_train_records(metrics: Path) -> bool:
    if not metrics.is_file():
        return False
    with open(metrics) as f:
        return any('"kind": "train"' in line for line in f)


def metrics_bytes(output_dir: str | os.PathLike) -> int:
    """metrics.jsonl's length now (0 without one): a checkpoint records it for the cut on resume."""
    path = Path(output_dir) / METRICS
    return path.stat().st_size if path.is_file() else 0


def decide(output_dir: str | os.PathLike, checkpoints, identity: dict, max_steps: int, fresh: bool) -> RunPlan:
    """The plan for `output_dir` (reads only); ResumeError when the run must not go on here.

    `checkpoints`: the run's CheckpointManager; `identity`: this run's `run_identity`.
    """
    out = Path(output_dir)
    metrics = out / METRICS
    if fresh:
        return RunPlan(None, discard_checkpoints=True, remove=RUN_OUTPUTS)
    latest = checkpoints.latest()
    if latest is None:
        if has_train_records(metrics):
            raise ResumeError(
                f"output_dir {out} holds a run (training records in {metrics.name}) but no checkpoint "
                f"in {checkpoints.root} to resume from; pass --fresh to discard it and start over, or "
                "choose another output_dir")
        return RunPlan(None, remove=(METRICS,))  # only pre-training records of an attempt that died early
    meta = read_meta(latest)
    problems = identity_problems(meta["run"].get("identity") or {}, identity)
    if problems:
        raise ResumeError(
            f"refusing to resume {latest} with this recipe:\n  - " + "\n  - ".join(problems) +
            "\nUse the original models and tokenizers, or start a new run (another output_dir, or "
            "--fresh to discard this one)")
    if int(meta["step"]) > max_steps:
        raise ResumeError(f"{latest} is at step {meta['step']}, past train.max_steps={max_steps}")
    return RunPlan(latest, metrics_bytes=meta["run"].get("metrics_bytes"))


def carry_out(plan: RunPlan, output_dir: str | os.PathLike, checkpoints) -> None:
    """Rank 0: make the folder what `plan` says (drops half-written checkpoints in any case)."""
    out = Path(output_dir)
    checkpoints.remove_partial()
    if plan.discard_checkpoints:
        checkpoints.discard_all()
    for name in plan.remove:
        path = out / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    metrics = out / METRICS
    if plan.metrics_bytes is not None and metrics.is_file() and metrics.stat().st_size > plan.metrics_bytes:
        with open(metrics, "r+b") as f:
            f.truncate(int(plan.metrics_bytes))


def prepare_run_directory(output_dir: str | os.PathLike, checkpoints, identity: dict | None, max_steps: int,
                          fresh: bool, rank: int, world: int) -> Path | None:
    """Rank 0 decides and carries out; every rank returns the checkpoint to resume (None: start at
    step 0) or raises the same ResumeError. `identity` is only read on rank 0."""
    outcome = {"resume": None, "error": None}
    if rank == 0:
        try:
            plan = decide(output_dir, checkpoints, identity, max_steps, fresh)
            carry_out(plan, output_dir, checkpoints)
            outcome["resume"] = str(plan.resume_from) if plan.resume_from else None
        except ResumeError as err:
            outcome["error"] = str(err)
    if world > 1:
        import torch.distributed as dist

        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if outcome["error"]:
        raise ResumeError(outcome["error"])
    return Path(outcome["resume"]) if outcome["resume"] else None
