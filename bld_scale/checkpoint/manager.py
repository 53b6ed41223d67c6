"""Checkpoints of a run: sharded student state, exact resume, preemption, identity checks.

Layout under `checkpoint.dir` (default `<output_dir>/checkpoints`; on a cluster a filesystem every
node sees):

    latest                  text file naming the current checkpoint ("step-800"); os.replace'd
    step-800/
      meta.json             step, world size, data position, running log sums, metrics.jsonl
                            length, teacher/student identity, the resolved recipe, parameter count
      ds/                   DeepSpeed's engine.save_checkpoint (tag "ds"): the student's ZeRO
                            shards with its byte head, optimizer and LR scheduler, one file pair
                            per rank, plus DeepSpeed's zero_to_fp32.py
      rng/rank-00000.pt     per-rank RNG states (Python, NumPy, torch CPU, CUDA)
      student/              what rebuilds the student without the recipe: config.json,
                            byte_head.json, tokenizer files (used by tools/export_hf.py)
      ds_universal/         made on demand when a run resumes with another world size
                            (DeepSpeed's universal checkpoint, deepspeed.checkpoint.ds_to_universal)

Atomicity: every rank writes into `tmp-step-N/`; after a barrier rank 0 writes meta.json, renames
the folder to `step-N/` and only then points `latest` at it (write to `latest.tmp`, fsync,
os.replace). A crash at any point leaves the previous `latest` current; stale `tmp-step-*`
folders are removed by the next run. The last `checkpoint.keep` complete checkpoints are kept.

The teacher is never saved: only its identity (path and a content fingerprint), checked on resume
together with the student's config, byte head and tokenizer.

Preemption: SIGTERM and SIGUSR1 only set a flag (`StopRequest`); the training loop agrees on it
across ranks (an all-reduce at every step boundary), saves, and exits 0. A stop file named by
BLD_STOP_FILE does the same (the SLURM script touches it as well as forwarding the signal).

This module imports torch lazily so that `launch/distill.py` can install the signal handlers
before any heavy import.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

LATEST = "latest"
STEP_PREFIX = "step-"
TMP_PREFIX = "tmp-step-"
DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"
META = "meta.json"
STUDENT_FILES = "student"
FORMAT_VERSION = 1
FULL_HASH_LIMIT = 32 << 20  # files up to 32 MiB are hashed whole
EDGE_BYTES = 4 << 20  # larger ones: size + first and last 4 MiB (safetensors headers come first)


class ResumeError(RuntimeError):
    """A checkpoint that must not be resumed with this run's recipe; the message says why."""


# --------------------------------------------------------------------------------- stop requests
class StopRequest:
    """SIGTERM / SIGUSR1 (and an optional stop file) -> a flag read at step boundaries."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self.stop_file = os.environ.get("BLD_STOP_FILE") or None

    def install(self) -> "StopRequest":
        for name in self.SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        if self.received is None and self.stop_file and os.path.exists(self.stop_file):
            self.received = f"stop file {self.stop_file}"
        return self.received is not None


_STOP: StopRequest | None = None


def install_stop_handlers() -> StopRequest:
    """Install the handlers once per process (the entry point calls it first thing)."""
    global _STOP
    if _STOP is None:
        _STOP = StopRequest().install()
    return _STOP


# --------------------------------------------------------------------------------- identity
def _hash_file(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(EDGE_BYTES))
            f.seek(size - EDGE_BYTES)
            h.update(f.read(EDGE_BYTES))


def fingerprint(path: str | os.PathLike) -> str:
    """Content fingerprint of a model or tokenizer folder (or one file), independent of its path.

    Every regular file in the folder (not recursive, hidden files skipped) contributes its name
    and size; files up to 32 MiB their whole content, larger ones (weight shards) their first and
    last 4 MiB. A different checkpoint of the same architecture changes both the safetensors
    header region and the tensors at the tail, so it is caught without reading 16 GB per resume.
    """
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    for f in files:
        _hash_file(f, h)
    return h.hexdigest()[:16]


def run_identity(recipe, student_config: dict) -> dict:
    """What must not change between a checkpoint and the run resuming it."""
    s = recipe.student
    teacher_tok = recipe.teacher.tokenizer or recipe.teacher.path
    return {
        "teacher": {"path": recipe.teacher.path, "fingerprint": fingerprint(recipe.teacher.path)},
        "teacher_tokenizer": {"path": teacher_tok, "fingerprint": fingerprint(teacher_tok)},
        "student_tokenizer": {"path": s.tokenizer, "fingerprint": fingerprint(s.tokenizer)},
        "student_model": {"config": student_config, "head": s.head, "K": s.K,
                          "head_hidden_size": s.head_hidden_size, "head_num_layers": s.head_num_layers},
        "data": {"seed": recipe.seed, "window_bytes": recipe.data.window_bytes},
    }


def identity_problems(saved: dict, current: dict) -> list[str]:
    """Human-readable reasons why `current` may not resume a checkpoint made with `saved`."""
    problems = []
    names = {"teacher": "teacher (teacher.path)", "teacher_tokenizer": "teacher tokenizer",
             "student_tokenizer": "student tokenizer (student.tokenizer)"}
    for key, what in names.items():
        a, b = saved.get(key, {}), current[key]
        if a.get("fingerprint") != b["fingerprint"]:
            problems.append(f"{what}: the checkpoint was made with {a.get('path')} (fingerprint "
                            f"{a.get('fingerprint')}), this run has {b['path']} (fingerprint {b['fingerprint']})")
    a, b = saved.get("student_model", {}), current["student_model"]
    if a != b:
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        detail = []
        for k in keys:
            if k == "config" and isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                ck = sorted(c for c in set(a[k]) | set(b[k]) if a[k].get(c) != b[k].get(c))
                detail.append("config " + ", ".join(f"{c}: {a[k].get(c)!r} -> {b[k].get(c)!r}" for c in ck))
            else:
                detail.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
        problems.append("student model (student.config / head): " + "; ".join(detail))
    a, b = saved.get("data", {}), current["data"]
    if a != b:
        problems.append(f"data order (seed, data.window_bytes): checkpoint {a}, this run {b}; the saved "
                        "data position would point at other windows")
    return problems


# --------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------- files
def _fsync_dir(path: Path) -> None:
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
    _fsync_dir(path.parent)


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


def read_meta(step_dir: str | os.PathLike) -> dict:
    return json.loads((Path(step_dir) / META).read_text())


# --------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Saves and finds checkpoints of one run; every method is called by every rank."""

    def __init__(self, root: str | os.PathLike, rank: int, world: int, keep: int = 2):
        self.root = Path(root)
        self.rank, self.world, self.keep = rank, world, keep

    # ---- collective helpers
    def _barrier(self) -> None:
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            dist.barrier()

    # ---- finding
    def latest(self) -> Path | None:
        """The current checkpoint folder, or None (a `latest` naming a missing folder is an error)."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        step_dir = self.root / pointer.read_text().strip()
        if not (step_dir / META).is_file():
            raise ResumeError(f"{pointer} names {step_dir.name}, which is missing or incomplete (no "
                              f"{META}); restore it, or point {pointer} at another step-* folder")
        return step_dir

    def complete_steps(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
                 and p.name[len(STEP_PREFIX):].isdigit() and (p / META).is_file()]
        return sorted(found, key=step_of)

    def remove_partial(self) -> None:
        """Rank 0: drop `tmp-step-*` folders left by a save that crashed."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(TMP_PREFIX) or p.name == LATEST + ".tmp":
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def discard_all(self) -> None:
        """Rank 0: remove every checkpoint of this run (starting fresh on purpose)."""
        if self.rank == 0 and self.root.is_dir():
            (self.root / LATEST).unlink(missing_ok=True)
            for p in self.root.iterdir():
                if p.name.startswith((STEP_PREFIX, TMP_PREFIX)):
                    shutil.rmtree(p, ignore_errors=True)

    # ---- saving
    def save(self, engine, step: int, meta: dict, write_student_files=None) -> Path:
        """Save the student engine and this run's state as checkpoint `step`, atomically.

        `meta` (JSON-able, rank 0's copy is written) gets `step`, `world_size`, `time` added;
        `write_student_files(folder)` is called on rank 0 to write the rebuild files.
        """
        import torch

        tmp = self.root / f"{TMP_PREFIX}{step}"
        final = self.root / f"{STEP_PREFIX}{step}"
        t0 = time.perf_counter()
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        self._barrier()
        engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={"bld_step": step}, save_latest=False)
        rng_file = tmp / "rng" / f"rank-{self.rank:05d}.pt"
        torch.save(rng_state(), rng_file)
        with open(rng_file, "rb+") as f:
            os.fsync(f.fileno())
        self._barrier()  # every rank's shards are written
        if self.rank == 0:
            if write_student_files is not None:
                write_student_files(tmp / STUDENT_FILES)
            meta = {"format": FORMAT_VERSION, "step": step, "world_size": self.world,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ds_tag": DS_TAG, **meta}
            write_atomic(tmp / META, json.dumps(meta, indent=2, default=str))
            if final.exists():  # a folder of this step that `latest` does not name: an older attempt
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            write_atomic(self.root / LATEST, final.name + "\n")
            self._prune(final)
        self._barrier()
        self.last_save_seconds = time.perf_counter() - t0
        return final

    def _prune(self, current: Path) -> None:
        steps = self.complete_steps()
        for p in steps[: max(0, len(steps) - self.keep)]:
            if p != current:
                shutil.rmtree(p, ignore_errors=True)

    # ---- loading
    def load(self, engine, step_dir: Path) -> None:
        """Load the student engine's state from `step_dir` (universal when the world size changed).

        The engine must have been built with `checkpoint.load_universal` in its DeepSpeed config
        when `needs_universal(meta)` (see `Pipeline`).
        """
        meta = read_meta(step_dir)
        tag = DS_TAG
        if self.needs_universal(meta):
            self.ensure_universal(step_dir)
            tag = UNIVERSAL_TAG
        path, client = engine.load_checkpoint(str(step_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise ResumeError(f"DeepSpeed could not load {step_dir / tag}")
        if client and client.get("bld_step", meta["step"]) != meta["step"]:
            raise ResumeError(f"{step_dir}: DeepSpeed state is of step {client.get('bld_step')}, "
                              f"meta.json says {meta['step']}")

    def needs_universal(self, meta: dict) -> bool:
        return int(meta["world_size"]) != self.world

    def ensure_universal(self, step_dir: Path) -> Path:
        """Rank 0 converts `ds/` to DeepSpeed's universal format once (kept beside it)."""
        out = step_dir / UNIVERSAL_TAG
        if self.rank == 0 and not out.is_dir():
            convert_to_universal(step_dir / DS_TAG, out)
        self._barrier()
        return out

    def load_rng(self, step_dir: Path) -> str:
        """Restore this rank's RNG states (rank 0's when the saving run had fewer ranks)."""
        import torch

        own = step_dir / "rng" / f"rank-{self.rank:05d}.pt"
        src = own if own.is_file() else step_dir / "rng" / "rank-00000.pt"
        set_rng_state(torch.load(src, weights_only=False))
        return src.name


def convert_to_universal(ds_dir: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal (in process, serial workers), written under a temporary name."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = Namespace(input_folder=str(ds_dir), output_folder=str(tmp), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    ds_to_universal(args)
    (out.parent / "latest_universal").unlink(missing_ok=True)  # written by ds_to_universal; unused
    os.rename(tmp, out)
    _fsync_dir(out.parent)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
