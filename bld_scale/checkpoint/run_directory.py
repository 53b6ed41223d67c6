"""What a run does with its output_dir: resume its current checkpoint, start fresh, or refuse.

Rank 0 decides from the folder alone (`decide` only reads; the ranks help verify checksums), and
only a final decision changes anything (`carry_out`): a refused run leaves the folder as it was.
Then every rank learns the outcome (`prepare_run_directory`).

- `--fresh`: discard the run: its checkpoints, metrics.jsonl, summary.json, final/, tensorboard/.
- No checkpoint: start at step 0, unless metrics.jsonl holds training records (a run whose
  checkpoints are gone): refused, --fresh or another output_dir. Records of an attempt that died
  before its first step (evaluations only) are dropped.
- A checkpoint: the one `latest` names if it verifies, else the newest earlier one that does
  (`checkpoint.selection`: damaged ones are set aside as step-N.bad, `latest` repointed, the log
  says which and why). Resumed if the identity matches (`checkpoint.identity`) and its step is
  not past train.max_steps. metrics.jsonl is cut back to its length at the checkpoint
  (`cut_metrics`) only once the checkpoint has loaded, so a load that fails loses no records;
  the steps the resumed run redoes are then not recorded twice.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from bld_scale.checkpoint.errors import ResumeError
from bld_scale.checkpoint.files import BAD_SUFFIX, LATEST, fsync_dir, write_atomic
from bld_scale.checkpoint.identity import identity_problems
from bld_scale.checkpoint.meta import read_meta
from bld_scale.checkpoint.rank_verification import RankVerification
from bld_scale.checkpoint.selection import choose_checkpoint
from bld_scale.checkpoint.verify import local_hasher, verify_checkpoint

METRICS = "metrics.jsonl"
RUN_OUTPUTS = (METRICS, "summary.json", "final", "tensorboard")  # what --fresh discards besides checkpoints


@dataclass(frozen=True)
class RunPlan:
    """A final decision about an output_dir, and the changes it makes."""
    resume_from: Path | None  # the checkpoint step folder to resume; None: start at step 0
    discard_checkpoints: bool = False
    remove: tuple[str, ...] = ()  # names under output_dir to delete
    metrics_bytes: int | None = None  # metrics.jsonl's length at the checkpoint (`cut_metrics`, after the load)
    set_aside: tuple[Path, ...] = ()  # damaged checkpoints passed over: renamed step-N.bad
    point_latest: bool = False  # point `latest` at resume_from
    notes: tuple[str, ...] = ()  # what the log should say about the choice


def has_train_records(metrics: Path) -> bool:
    if not metrics.is_file():
        return False
    with open(metrics) as f:
        return any('"kind": "train"' in line for line in f)


def metrics_bytes(output_dir: str | os.PathLike) -> int:
    """metrics.jsonl's length now (0 without one): a checkpoint records it for the cut on resume."""
    path = Path(output_dir) / METRICS
    return path.stat().st_size if path.is_file() else 0


def decide(output_dir: str | os.PathLike, checkpoints, identity: dict, max_steps: int, fresh: bool,
           verify=None) -> RunPlan:
    """The plan for `output_dir` (reads only); ResumeError when the run must not go on here.

    `checkpoints`: the run's CheckpointManager; `identity`: this run's `run_identity`; `verify`:
    step folder -> `verify.Verdict` (default: checked here, in this process).
    """
    out = Path(output_dir)
    metrics = out / METRICS
    if fresh:
        return RunPlan(None, discard_checkpoints=True, remove=RUN_OUTPUTS)
    choice = choose_checkpoint(checkpoints.root, verify or (lambda d: verify_checkpoint(d, local_hasher())))
    latest = choice.step_dir
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
    return RunPlan(latest, metrics_bytes=meta["run"].get("metrics_bytes"), set_aside=choice.set_aside,
                   point_latest=choice.point_latest, notes=choice.notes)


def carry_out(plan: RunPlan, output_dir: str | os.PathLike, checkpoints) -> None:
    """Rank 0: make the folder what `plan` says (drops half-written checkpoints in any case)."""
    out = Path(output_dir)
    checkpoints.remove_partial()
    if plan.discard_checkpoints:
        checkpoints.discard_all()
    for name in plan.remove:
        path = out / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    for folder in plan.set_aside:
        aside = folder.with_name(folder.name + BAD_SUFFIX)
        shutil.rmtree(aside, ignore_errors=True)  # from an earlier attempt at the same step
        os.rename(folder, aside)
    if plan.set_aside:
        fsync_dir(checkpoints.root)
    if plan.point_latest and plan.resume_from is not None:
        write_atomic(checkpoints.root / LATEST, plan.resume_from.name + "\n")


def cut_metrics(output_dir: str | os.PathLike, metrics_bytes: int | None) -> None:
    """Rank 0, once the checkpoint has loaded: cut metrics.jsonl back to its length at the checkpoint
    (`metrics_bytes`, from its meta.json), so the steps the resumed run redoes are not recorded twice."""
    metrics = Path(output_dir) / METRICS
    if metrics_bytes is not None and metrics.is_file() and metrics.stat().st_size > metrics_bytes:
        with open(metrics, "r+b") as f:
            f.truncate(int(metrics_bytes))


def prepare_run_directory(output_dir: str | os.PathLike, checkpoints, identity: dict | None, max_steps: int,
                          fresh: bool, rank: int, world: int, log=print) -> Path | None:
    """Rank 0 decides and carries out; every rank returns the checkpoint to resume (None: start at
    step 0) or raises the same ResumeError. `identity` is only read on rank 0; every rank takes part
    in verifying the candidate checkpoints (`checkpoint.rank_verification`); `log` (rank 0) gets
    what was verified and why a checkpoint other than `latest`'s was chosen."""
    ranks = RankVerification(rank, world)
    if rank != 0:
        outcome = ranks.serve()
    else:
        outcome = {"resume": None, "error": None}
        try:
            verify = None if fresh else (lambda d: verify_checkpoint(d, ranks.hasher))
            plan = decide(output_dir, checkpoints, identity, max_steps, fresh, verify)
            carry_out(plan, output_dir, checkpoints)
            outcome["resume"] = str(plan.resume_from) if plan.resume_from else None
            for note in plan.notes:
                log(note)
        except ResumeError as err:
            outcome["error"] = str(err)
        except BaseException as err:  # tell the other ranks before failing, instead of leaving them waiting
            ranks.finish({"resume": None, "error": f"rank 0 failed while preparing {output_dir}: {err!r}"})
            raise
        ranks.finish(outcome)
    if outcome["error"]:
        raise ResumeError(outcome["error"])
    return Path(outcome["resume"]) if outcome["resume"] else None
