"""meta.json: what a checkpoint is, and the run's state that is not tensors.

Format 2 (written by this version):

    {"format": 2, "step": 800, "world_size": 8, "time": "...", "ds_tag": "ds",
     "train_state": the training loop's state_dict() without its per-rank RNG (rng/ holds that):
                    {"step", "data", "log_sums", "log_window_seconds",
                     "evals_before": {"teacher", "student_bpb"}},
     "run": what the run directory policy and the tools read:
            {"identity", "recipe", "student_parameters", "metrics_bytes"}}

Format 1 (bld_scale before the checkpoint package was split) held the same values flat at the top
level: data, log_sums, log_window_seconds, teacher_eval, student_bpb_before, metrics_bytes,
identity, recipe, student_parameters, max_steps. `read_meta` returns format 2 whatever the file
holds; a format it does not know is refused with what to do.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bld_scale.checkpoint.errors import CheckpointFormatError
from bld_scale.checkpoint.files import DS_TAG, META

FORMAT_VERSION = 2


def compose_meta(step: int, world_size: int, train_state: dict, run: dict) -> dict:
    """The content of a new checkpoint's meta.json."""
    return {"format": FORMAT_VERSION, "step": step, "world_size": world_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ds_tag": DS_TAG,
            "train_state": train_state, "run": run}


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
    version = meta.get("format")
    if version == FORMAT_VERSION:
        return meta
    if version == 1:
        return _from_format_1(meta)
    raise CheckpointFormatError(
        f"{where} is checkpoint format {version!r}; this bld_scale reads formats 1 to {FORMAT_VERSION}. "
        "Use the bld_scale version that wrote it (a newer one) to resume or export it, or start a new "
        "run: another output_dir, or --fresh to discard this one")


def read_meta(step_dir: str | os.PathLike) -> dict:
    """A checkpoint's meta.json in the current format (older formats converted)."""
    path = Path(step_dir) / META
    return upgrade_meta(json.loads(path.read_text()), path)
