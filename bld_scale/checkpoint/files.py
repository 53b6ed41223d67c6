"""Where a checkpoint's files are, and writing them so that a crash never leaves a half-made one.

Layout under `checkpoint.dir` (default `<output_dir>/checkpoints`):

    latest                  text file naming the current checkpoint ("step-800"); os.replace'd
    step-800/
      meta.json             what the checkpoint is and the run's JSON state (`checkpoint.meta`)
      manifest.json         every other file's size and SHA-256 (`checkpoint.manifest`), written
                            last, before the folder is renamed into place
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
MANIFEST = "manifest.json"
BAD_SUFFIX = ".bad"  # a damaged checkpoint a resume passed over is renamed step-N.bad
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


def is_step_name(name: str) -> bool:
    return name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit()


def step_folders(root: Path) -> list[Path]:
    """The `step-N` folders under `root`, complete or not, by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_step_name(p.name)), key=step_of)


def read_latest(root: Path) -> str | None:
    """What `root/latest` names (stripped), or None without one."""
    try:
        return (Path(root) / LATEST).read_bytes().decode("utf-8", "replace").strip()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step folder from a step folder, a checkpoint root (its `latest`) or an output_dir.

    FileNotFoundError saying what is there instead: a step folder without meta.json, or `latest`
    missing or naming a folder that is not there (with the step folders to choose from).
    """
    p = Path(path)
    if (p / META).is_file():
        return p
    if p.is_dir() and is_step_name(p.name):
        raise FileNotFoundError(f"{p}: no {META}: an incomplete or damaged checkpoint")
    for root in (p, p / "checkpoints"):
        name = read_latest(root)
        steps = ", ".join(f.name for f in step_folders(root))
        if name is None and steps:
            raise FileNotFoundError(f"{root / LATEST} is missing; pass one of the step folders instead "
                                    f"({steps}) or point it at one: echo step-N > {root / LATEST}")
        if name is not None:
            step = root / name
            if (step / META).is_file():
                return step
            raise FileNotFoundError(f"{root / LATEST} names {name!r}, which is missing or incomplete (no "
                                    f"{META}); step folders there: {steps or 'none'}")
    raise FileNotFoundError(f"{p}: not a checkpoint (no {META}), and no '{LATEST}' file in it or in "
                            f"{p / 'checkpoints'}")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
