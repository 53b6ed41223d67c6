"""Where a training step's time goes, without stopping the host for the device.

The loop marks boundaries: `mark(part)` starts a segment of `part` that lasts until the next mark;
`start_step()` / `end_step()` open and close a step (marks outside a step, e.g. a held-out
evaluation's teacher forwards, are ignored). The pipeline's segments per micro-batch:

    data_wait -> student (forward) -> teacher -> conversion [-> teacher -> conversion ...]
              -> student (backward) -> optimizer

`teacher` is each teacher forward; `conversion` is what follows it up to the loss (the byte
conversion, the divergence, the CE terms); without a teacher forward (method ce, or a teacher
cache) the loss counts as `student`.

Clocks: on CPU every segment is host time (`time.perf_counter`), so the parts add up to the step.
On CUDA each mark also records a CUDA event on the current stream; `student`, `teacher`,
`conversion` and `optimizer` are the device time between their events, `data_wait` stays host time
(what the training thread waited for its next micro-batch) and `step` is the device time from the
step's first mark to its last: `step` minus the four device parts is the time the device spent
outside them (waiting for the host's data or launches). Events are read only when `close()` is
called (once per logged step, when the loop synchronises anyway) or when they are already done.

`close()` gives each part's seconds per step since the last `close()` (`time_<part>`) and
`time_step`, for rank 0's own steps (the parts are not summed over ranks).
"""
from __future__ import annotations

import time

import torch

PARTS = ("data_wait", "student", "teacher", "conversion", "optimizer")
HOST_PARTS = ("data_wait",)  # measured on the host clock even on CUDA
ADDED = ("data_prepare",)  # host seconds measured elsewhere (the data thread) and added, not segments


class StepTimer:
    def __init__(self, device):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self._active = False
        self._marks: list[tuple[str | None, float, object]] = []  # the open step's (part, host s, event)
        self._pending: list[list] = []  # closed steps whose events may still be running
        self._sums = dict.fromkeys(PARTS + ADDED + ("step",), 0.0)
        self._steps = 0

    def start_step(self) -> None:
        self._active, self._marks = True, []

    def mark(self, part: str) -> None:
        """End the current segment and start one of `part` (ignored outside a step)."""
        if not self._active:
            return
        if part not in PARTS and part is not None:
            raise ValueError(f"unknown step part {part!r}; the parts are {', '.join(PARTS)}")
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self._marks.append((part, time.perf_counter(), event))

    def add(self, name: str, seconds: float) -> None:
        """Host seconds spent elsewhere for this step (`data_prepare`: making its micro-batches,
        in the data thread when prefetching); not part of `time_step`."""
        if name not in ADDED:
            raise ValueError(f"unknown added time {name!r}; these are {', '.join(ADDED)}")
        self._sums[name] += seconds

    def end_step(self) -> None:
        if not self._active:
            return
        self.mark(None)  # the last segment's end
        self._active = False
        self._pending.append(self._marks)
        self._marks = []
        self._steps += 1
        # fold the steps the device has finished (a query, not a wait), so events do not pile up
        while self._pending and (not self.cuda or self._pending[0][-1][2].query()):
            self._fold(self._pending.pop(0))

    def _fold(self, marks: list) -> None:
        for (part, host, event), (_, host_end, event_end) in zip(marks, marks[1:]):
            if self.cuda and part not in HOST_PARTS:
                seconds = event.elapsed_time(event_end) / 1000.0
            else:
                seconds = host_end - host
            self._sums[part] += seconds
        if self.cuda:
            self._sums["step"] += marks[0][2].elapsed_time(marks[-1][2]) / 1000.0
        else:
            self._sums["step"] += marks[-1][1] - marks[0][1]

    def close(self) -> dict:
        """Seconds per step of each part, and of the step, since the last close; starts over.
        Waits for the device to reach the last recorded event (on CUDA)."""
        if self._pending and self.cuda:
            self._pending[-1][-1][2].synchronize()
        for marks in self._pending:
            self._fold(marks)
        steps = self._steps
        out = {f"time_{k}": v / steps for k, v in self._sums.items()} if steps else {}
        self._pending, self._sums, self._steps = [], dict.fromkeys(PARTS + ADDED + ("step",), 0.0), 0
        return out
