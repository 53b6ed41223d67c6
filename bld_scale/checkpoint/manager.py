"""The checkpoint manager: saves and loads the student engine and the training state, and decides
when a step is saved.

What it saves (layout: `checkpoint.files`): the student engine through DeepSpeed
(`engine.save_checkpoint`, tag "ds": ZeRO shards, optimizer, LR scheduler), and a stateful object's
`state_dict()` (the training loop's: step, data position, log window, evaluations, RNG): its
"rng" entry per rank in `rng/rank-N.pt`, the rest, JSON, in meta.json with the run's description
(`checkpoint.meta`). When: every `interval` steps, on a stop request, and at the end of the run.

Atomicity: every rank writes into `tmp-step-N/`; after a barrier rank 0 writes meta.json; then
every rank hashes (and fsyncs) the files it wrote, rank 0 writes manifest.json from all of them
(`checkpoint.manifest`), renames the folder to `step-N/` and only then points `latest` at it
(write to `latest.tmp`, fsync, os.replace). A crash at any point leaves the previous `latest`
current; stale `tmp-step-*` folders are removed by the next run. The last `keep` complete
checkpoints are kept.

torch and DeepSpeed are imported when called, so that importing this module stays light.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from bld_scale.checkpoint.errors import ResumeError
from bld_scale.checkpoint.files import (DS_TAG, LATEST, META, STEP_PREFIX, STUDENT_FILES, TMP_PREFIX,
                                        UNIVERSAL_TAG, fsync_dir, is_step_name, rng_file, step_of, write_atomic)
from bld_scale.checkpoint.manifest import checkpoint_files, hash_files, owner, write_manifest
from bld_scale.checkpoint.meta import compose_meta, read_meta


class CheckpointManager:
    """Saves and finds checkpoints of one run; every method is called by every rank.

    `interval`: save every that many steps and at the end (0: only on a stop request).
    """

    def __init__(self, root: str | os.PathLike, rank: int, world: int, keep: int = 2, interval: int = 0):
        self.root = Path(root)
        self.rank, self.world, self.keep, self.interval = rank, world, keep, interval
        self.last_saved: int | None = None  # step of the last checkpoint saved or loaded by this run

    # ---- collective helpers
    def _barrier(self) -> None:
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            dist.barrier()

    # ---- when
    def due(self, step: int, stopping: bool = False, end: bool = False) -> bool:
        """Whether `step` is saved: on a stop request always; with an interval, at its multiples
        and at the end of the run (`end`) unless that step is saved already."""
        if stopping:
            return True
        if not self.interval:
            return False
        return self.last_saved != step if end else step % self.interval == 0

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
        found = [p for p in self.root.iterdir() if p.is_dir() and is_step_name(p.name) and (p / META).is_file()]
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
    def save(self, step: int, engine, train_state, run: dict, write_student_files=None) -> Path:
        """Save `engine` and `train_state` as checkpoint `step`, atomically; returns its folder.

        `train_state.state_dict()` is called on every rank (it may be collective): its "rng" entry
        goes to this rank's RNG file, the rest (rank 0's copy) to meta.json with `run` (JSON-able).
        `write_student_files(folder)` is called on rank 0 to write the rebuild files.
        """
        import torch

        state = dict(train_state.state_dict())
        rng = state.pop("rng")
        tmp = self.root / f"{TMP_PREFIX}{step}"
        final = self.root / f"{STEP_PREFIX}{step}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            rng_file(tmp, 0).parent.mkdir(parents=True)
        self._barrier()
        engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={"bld_step": step}, save_latest=False)
        own = rng_file(tmp, self.rank)
        torch.save(rng, own)
        with open(own, "rb+") as f:
            os.fsync(f.fileno())
        self._barrier()  # every rank's shards are written
        if self.rank == 0:
            if write_student_files is not None:
                write_student_files(tmp / STUDENT_FILES)
            meta = compose_meta(step, self.world, state, run)
            write_atomic(tmp / META, json.dumps(meta, indent=2, default=str))
        self._barrier()  # meta.json and the student files are written
        entries = self._hash_own_files(tmp)
        if self.rank == 0:
            write_manifest(tmp, entries)
            if final.exists():  # a folder of this step that `latest` does not name: an older attempt
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.root)
            write_atomic(self.root / LATEST, final.name + "\n")
            self._prune(final)
        self._barrier()
        self.last_saved = step
        return final

    def _hash_own_files(self, folder: Path) -> dict:
        """Every rank hashes and fsyncs the files it owns (`manifest.owner`: those it wrote); rank 0
        gets them all, and hashes any file no rank reported (e.g. one it alone sees)."""
        rels = checkpoint_files(folder)
        entries = hash_files(folder, [r for r in rels if owner(r, self.world) == self.rank], sync=True)
        if self.world > 1:
            import torch.distributed as dist

            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, entries)
            entries = {k: v for share in gathered for k, v in share.items()}
        if self.rank == 0:
            entries.update(hash_files(folder, [r for r in rels if r not in entries], sync=True))
        return entries

    def _prune(self, current: Path) -> None:
        steps = self.complete_steps()
        for p in steps[: max(0, len(steps) - self.keep)]:
            if p != current:
                shutil.rmtree(p, ignore_errors=True)

    # ---- loading
    def load(self, step_dir: Path, engine, train_state) -> str:
        """Load `engine` and then `train_state` from `step_dir`; returns the RNG file used.

        The engine must have been built with `checkpoint.load_universal` in its DeepSpeed config
        when `needs_universal(meta)` (the world size changed). A rank without an RNG file of its
        own (the saving run had fewer ranks) takes rank 0's. The train state is loaded last: it
        restores the RNG states, and nothing after may draw from them.
        """
        import torch

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
        own = rng_file(step_dir, self.rank)
        src = own if own.is_file() else rng_file(step_dir, 0)
        train_state.load_state_dict({**meta["train_state"], "rng": torch.load(src, weights_only=False)})
        self.last_saved = int(meta["step"])
        return src.name

    def needs_universal(self, meta: dict) -> bool:
        return int(meta["world_size"]) != self.world

    def ensure_universal(self, step_dir: Path) -> Path:
        """Rank 0 converts `ds/` to DeepSpeed's universal format once (kept beside it)."""
        out = step_dir / UNIVERSAL_TAG
        if self.rank == 0 and not out.is_dir():
            convert_to_universal(step_dir / DS_TAG, out)
        self._barrier()
        return out


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
    fsync_dir(out.parent)
