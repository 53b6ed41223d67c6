"""Checkpoints of a run: when and what to save, resume or not, preemption, identity checks.

Modules, one concern each (none imports torch at import time, so `launch/distill.py` can install
the stop handlers first thing):
- `manager`: CheckpointManager, saves/loads the student engine and the training state; when to save
- `run_directory`: resume / fresh / refuse for an output_dir (and what that deletes or cuts)
- `preemption`: StopRequest, install_stop_handlers (SIGTERM / SIGUSR1 / stop file -> a flag)
- `identity`: fingerprint, run_identity, identity_problems
- `rng`: rng_state, set_rng_state
- `meta`: meta.json's format (FORMAT_VERSION, read_meta; older formats converted)
- `files`: the layout's names, write_atomic, resolve_checkpoint, folder_bytes
- `errors`: ResumeError, CheckpointFormatError
Details: docs/checkpointing.md.
"""
from bld_scale.checkpoint.errors import CheckpointFormatError, ResumeError
from bld_scale.checkpoint.files import (DS_TAG, LATEST, META, STUDENT_FILES, folder_bytes, resolve_checkpoint,
                                        write_atomic)
from bld_scale.checkpoint.identity import fingerprint, identity_problems, run_identity
from bld_scale.checkpoint.manager import CheckpointManager
from bld_scale.checkpoint.meta import FORMAT_VERSION, read_meta
from bld_scale.checkpoint.preemption import StopRequest, install_stop_handlers
from bld_scale.checkpoint.rng import rng_state, set_rng_state
from bld_scale.checkpoint.run_directory import RunPlan, carry_out, decide, metrics_bytes, prepare_run_directory

__all__ = ["CheckpointFormatError", "CheckpointManager", "DS_TAG", "FORMAT_VERSION", "LATEST", "META",
           "ResumeError", "RunPlan", "STUDENT_FILES", "StopRequest", "carry_out", "decide", "fingerprint",
           "folder_bytes", "identity_problems", "install_stop_handlers", "metrics_bytes", "prepare_run_directory",
           "read_meta", "resolve_checkpoint", "rng_state", "run_identity", "set_rng_state", "write_atomic"]
