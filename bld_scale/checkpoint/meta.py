"""meta.json: what a checkpoint is, and the run's state that is not tensors.

Format 2 (written by this version):

    {"format": 2, "step": 800, "world_size": 8, "time": "...", "ds_tag": "ds",
     "train_state": the training loop's state_dict() without its per-rank RNG (rng/ holds that):
                    {"step", "data", "log_sums", "log_window_seconds",
                     "evals_before": {"teacher", "student_bpb"}},
     "run": what the run directory policy and the tools read:
            {"identity", "recipe", "student_parameters", "metrics_bytes"},
     "manifest": "manifest.json"}   the checkpoint's file list with sizes and checksums
                                    (`checkpoint.manifest`), written after meta.json; absent in
                                    checkpoints saved before manifests existed

Format 1 (bld_scale before the checkpoint package was split) held the same values flat at the top
level: data, log_sums, log_window_seconds, teacher_eval, student_bpb_before, metrics_bytes,
identity, recipe, student_parameters, max_steps. `read_meta` returns format 2 whatever the file
holds; a format it does not know is refused with what to do, and a damaged or foreign file
(not JSON, keys missing or of the wrong type) is refused naming the file and the key.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bld_scale.checkpoint.errors import CheckpointFormatError, DamagedCheckpointError
from bld_scale.checkpoint.files import DS_TAG, MANIFEST, META

FORMAT_VERSION = 2


def compose_meta(step: int, world_size: int, train_state: dict, run: dict) -> dict:
    """The content of a new checkpoint's meta.json."""
    return {"format": FORMAT_VERSION, "step": step, "world_size": world_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ds_tag": DS_TAG,
            "train_state": train_state, "run": run, "manifest": MANIFEST}


def _from_format_1(meta: dict) -> dict:
    return {
        "format": FORMAT_VERSION, "step": meta["step"], "world_size": meta["world_size"],
        "time": meta.get("time"), "ds_tag": meta.get("ds_tag", DS_TAG),
        "train_state": {"step": meta["step"], "data": meta["data"], "log_sums": meta.get("log_sums") or {},
                        "log_window_seconds": float(meta.get("log_window_seconds", 0.0)),
                        "evals_before": {"teacher": meta.get("teacher_eval"),
                                         "student_bpb": meta.get("student_bpb_before")}},
        "run": {"identity": meta.get("identity", {}), "recipe": meta.get("recipe"),
                "student_parameters": meta.get("student_parameters"), "metrics_bytes": meta.get("metrics_bytes")},
    }


def upgrade_meta(meta: dict, where: str | os.PathLike = META) -> dict:
    """`meta` in the current format; `where` names the file in the error."""
    if not isinstance(meta, dict) or "format" not in meta:
        raise DamagedCheckpointError(
            f"{where}: not a bld_scale checkpoint's meta.json (no \"format\" key); the file is damaged "
            "or not ours. Use another checkpoint of the run (point `latest` at it), or restore this file")
    version = meta.get("format")
    if version == FORMAT_VERSION:
        return _checked(meta, where)
    if version == 1:
        _require(meta, where, {"step": int, "world_size": int, "data": dict})
        return _checked(_from_format_1(meta), where)
    raise CheckpointFormatError(
        f"{where} is checkpoint format {version!r}; this bld_scale reads formats 1 to {FORMAT_VERSION}. "
        "Use the bld_scale version that wrote it (a newer one) to resume or export it, or start a new "
        "run: another output_dir, or --fresh to discard this one")


def _require(meta: dict, where, types: dict) -> dict:
    for key, kind in types.items():
        value = meta.get(key)
        if key not in meta:
            raise DamagedCheckpointError(f'{where}: key "{key}" is missing; the file is damaged or not ours')
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DamagedCheckpointError(f'{where}: key "{key}" should be {kind.__name__}, found '
                                         f'{type(value).__name__} {value!r:.40}; the file is damaged or not ours')
    return meta


def _checked(meta: dict, where) -> dict:
    """`meta` (format 2) if the keys the resume and the tools read have the right types."""
    _require(meta, where, {"step": int, "world_size": int, "train_state": dict, "run": dict})
    _require(meta["train_state"], f"{where} (train_state)", {"data": dict})
    if meta["world_size"] < 1 or meta["step"] < 0:
        raise DamagedCheckpointError(f"{where}: step {meta['step']}, world_size {meta['world_size']}: "
                                     "out of range; the file is damaged")
    return meta


def read_meta(step_dir: str | os.PathLike) -> dict:
    """A checkpoint's meta.json in the current format (older formats converted).

    DamagedCheckpointError (naming the file) when it is missing, not UTF-8 JSON, or lacks the keys
    the resume reads; CheckpointFormatError for a format this version does not know.
    """
    path = Path(step_dir) / META
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpointError(f"{path}: missing; {Path(step_dir).name} is incomplete") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise DamagedCheckpointError(f"{path}: not valid JSON ({err}); the file is truncated or "
                                     "damaged") from None
    return upgrade_meta(meta, path)
