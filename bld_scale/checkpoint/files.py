"""Where a checkpoint's files are, and writing them so that a crash never leaves a half-made one.

Layout under `checkpoint.dir` (default `<output_dir>/checkpoints`):

    latest                  text file naming the current checkpoint ("step-800"); os.replace'd
    step-800/
      meta.json             what the checkpoint is and the run's JSON state (`checkpoint.meta`)
      ds/                   DeepSpeed's engine.save_checkpoint (tag "ds"): ZeRO shards, optimizer,
                            LR scheduler, one file pair per rank, plus DeepSpeed's zero_to_fp32.py
      rng/rank-00000.pt     per-rank RNG states
      student/              what rebuilds the student without the recipe (`model.export`)
      ds_universal/         made on demand when a run resumes with another world size
"""
from __future__ import annotations

import os
from pathlib import Path

LATEST = "latest"
STEP_PREFIX = "step-"
TMP_PREFIX = "tmp-step-"
DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"
META = "meta.json"
RNG_DIR = "rng"
STUDENT_FILES = "student"


def rng_file(step_dir: Path, rank: int) -> Path:
    return Path(step_dir) / RNG_DIR / f"rank-{rank:05d}.pt"


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (where the filesystem allows opening a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def step_of(folder: Path) -> int:
    return int(folder.name[len(STEP_PREFIX):])


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step folder from a step folder, a checkpoint root (its `latest`) or an output_dir."""
    p = Path(path)
    if (p / META).is_file():
        return p
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            step = root / (root / LATEST).read_text().strip()
            if (step / META).is_file():
                return step
    raise FileNotFoundError(f"{p}: not a checkpoint (no {META}), and no '{LATEST}' file in it or in "
                            f"{p / 'checkpoints'}")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
