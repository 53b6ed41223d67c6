"""The training loop's state apart from the models: what a checkpoint must carry for an exact resume.

`TrainState.state_dict()` / `load_state_dict()` are what the checkpoint manager saves and loads
beside the student engine: the step, the data position, the running sums of the current logging
window and its seconds, the evaluations made before training (a resumed run reports them, it does
not redo them), and this process's RNG states ("rng", per rank; the rest is the same on every
rank and JSON-able).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from bld_scale.checkpoint.rng import rng_state, set_rng_state

AllSum = Callable[[list[float]], list[float]]  # sums a vector over the ranks


class LogWindow:
    """Running sums of the step logs since the last train record, and the seconds they took."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self._carried = 0.0  # seconds of this window before a resume
        self._start = time.perf_counter()

    def begin(self) -> None:
        """Start the clock (a resumed window continues from its saved seconds)."""
        self._start = time.perf_counter() - self._carried

    def seconds(self) -> float:
        return time.perf_counter() - self._start

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (a checkpoint save) out of the throughput."""
        self._start += seconds

    def resume(self, sums: dict[str, float], seconds: float) -> None:
        """Continue a saved window: its sums so far and the seconds it had run."""
        self.sums = dict(sums)
        self._carried = float(seconds)

    def add(self, logs: dict) -> None:
        """One micro-batch's logs ("tokens", "bytes", "teacher_tokens" are counts, the rest averaged). Tensors are
        summed where they are (float64), so no step waits for the device; `global_sums` reads them."""
        for key, value in logs.items():
            value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.sums["_micro"] = self.sums.get("_micro", 0.0) + 1.0

    def global_sums(self, all_sum: AllSum) -> dict[str, float]:
        """The sums over all ranks (collective: every rank calls it, with the same keys)."""
        keys = sorted(self.sums)
        return dict(zip(keys, all_sum([float(self.sums[k]) for k in keys]))) if keys else {}

    def close(self, all_sum: AllSum) -> dict:
        """The window's record (averages per micro-batch over all ranks, tokens/s and bytes/s);
        starts the next window."""
        seconds = self.seconds()
        totals = self.global_sums(all_sum)
        count = totals.pop("_micro")  # micro-batches over all ranks since the last record
        record = {k: v / count for k, v in totals.items() if k not in ("tokens", "bytes", "teacher_tokens")}
        record["tokens_per_s"] = totals.get("tokens", 0.0) / seconds
        record["bytes_per_s"] = totals.get("bytes", 0.0) / seconds
        if "teacher_tokens" in totals:  # teacher positions run forward (0 without a teacher forward)
            record["teacher_tokens_per_s"] = totals["teacher_tokens"] / seconds
        self.sums, self._start = {}, time.perf_counter()
        return record


class TrainState:
    """Step, data stream, log window, evaluations before training, RNG: saved and restored exactly."""

    def __init__(self, stream, rank: int, all_sum: AllSum):
        self.step = 0  # optimizer steps done
        self.stream = stream  # has position, state_dict(), load_state_dict() (data.sources.WindowStream)
        self.window = LogWindow()
        self.evals_before: dict | None = None  # {"teacher": dict | None, "student_bpb": float | None}
        self.rank = rank
        self._all_sum = all_sum

    def state_dict(self) -> dict:
        """Collective (the log sums are summed over ranks): every rank calls it."""
        return {"step": self.step, "data": self.stream.state_dict(),
                "log_sums": self.window.global_sums(self._all_sum),
                "log_window_seconds": self.window.seconds(),
                "evals_before": self.evals_before, "rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.stream.load_state_dict(state["data"])
        # the saved sums are already summed over ranks: rank 0 carries them, the others add zeros
        self.window.resume({k: (float(v) if self.rank == 0 else 0.0) for k, v in (state["log_sums"] or {}).items()},
                           state["log_window_seconds"])
        self.evals_before = dict(state["evals_before"]) if state["evals_before"] is not None else None
        set_rng_state(state["rng"])  # last: nothing above may draw from them
