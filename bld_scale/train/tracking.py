"""Metrics out of a run: `metrics.jsonl` always, TensorBoard when installed, wandb when configured.

Only rank 0 writes, and only rank 0 says when TensorBoard was asked for but cannot be imported.
One JSON object a line; every record has `step` and `kind` ("train", "eval", "teacher_eval",
"summary").
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    def __init__(self, output_dir: str | os.PathLike, enabled: bool, tensorboard: bool = True,
                 wandb_project: str | None = None, run_config: dict | None = None,
                 purge_step: int | None = None):
        """`purge_step`: on resume, the first step the run redoes; TensorBoard drops its events from
        there on, as metrics.jsonl is cut back to the checkpoint."""
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=purge_step)
            except ImportError as err:  # optional, but asked for: say so once, do not stop the run
                self._tb = None
                print(f"[bld_scale] TensorBoard off: logging.tensorboard is true but TensorBoard cannot "
                      f"be imported ({err}); pip install tensorboard, or set logging.tensorboard=false",
                      flush=True)
        if wandb_project:
            import wandb  # configured explicitly: a missing package is an error worth seeing

            self._wandb = wandb.init(project=wandb_project, config=run_config or {},
                                     dir=str(output_dir))

    def log(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in numeric.items()}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
