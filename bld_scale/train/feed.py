"""This rank's micro-batches in training order, made on the host ahead of the device (`data.prefetch`).

A micro-batch is made in three host steps, by the pipeline's `prepare(windows, first)`: both
tokenizations of its windows, their layout (`collate` or `pack`), and with a teacher cache the
byte targets read from it. `MicroBatchFeed` runs them for each step's share of the window stream
(`data.sources`: `take(global batch)`, this rank's contiguous share, split into micro-batches)
and hands the micro-batches out in order, on the device.

* `prefetch = 0`: made when asked for, on the training thread, from the run's own stream.
* `prefetch = N > 0`: made in a background thread (`data.prefetch.Prefetcher`) up to N
  micro-batches ahead, from a fork of the stream, in pinned memory on CUDA so the copy to the
  device is asynchronous (`non_blocking`). The run's own stream is moved only as micro-batches
  are handed out: its position (what checkpoints save, and `data_position` in metrics.jsonl) is
  always that of the windows training has consumed, never of those made ahead, so a resumed run
  sees exactly the windows an uninterrupted one would. An error in the thread (bad data, a cache
  read) is raised in the training thread at the micro-batch it belongs to.

Either way the micro-batches, and so the losses, are the same.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

import torch

from bld_scale.data.prefetch import Prefetcher
from bld_scale.data.sources import rank_share


@dataclasses.dataclass
class MicroBatch:
    batch: object  # DistillBatch
    cached: tuple | None  # (byte_logprobs, mask) from the teacher cache, or None
    teacher_tokens: float  # positions this rank's teacher forward processes (0: no teacher forward)
    prepare_s: float  # host seconds spent making it (in whichever thread made it)
    position: int  # the stream's position once this micro-batch's step was taken
    epoch: int


def teacher_positions(batch) -> int:
    """Teacher positions of a batch, padding left out (a packed row has none)."""
    mask = batch.teacher_attention_mask
    return int(mask.sum()) if mask is not None else batch.teacher_input_ids.numel()


def pinned(value):
    """`value` with its tensors in pinned (page-locked) host memory: tensors, tuples, dataclasses
    (e.g. DistillBatch and its PackedLayout); anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, tuple):
        return tuple(pinned(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: pinned(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


class MicroBatchFeed:
    def __init__(self, stream, prepare: Callable, *, steps: int, global_batch: int, micro_batch_size: int,
                 grad_accum: int, dp_rank: int, dp_size: int, device, prefetch: int = 0,
                 teacher_share: float = 1.0):
        """`stream`: the run's WindowStream at the first step to train; `steps`: steps to feed;
        `prepare(windows, first) -> (batch, cached)` on the host, `first` the stream index of the
        first window; `teacher_share`: the fraction of each batch's teacher positions this rank's
        teacher forward processes (0 without a teacher forward, 1/sp under sequence parallelism)."""
        self.stream, self.prepare, self.device = stream, prepare, device
        self.steps, self.global_batch, self.micro, self.grad_accum = steps, global_batch, micro_batch_size, grad_accum
        self.dp_rank, self.dp_size, self.teacher_share = dp_rank, dp_size, teacher_share
        cuda = getattr(device, "type", None) == "cuda"
        self._pin = cuda and prefetch > 0
        self._prefetcher = None
        if prefetch > 0:
            on_start = (lambda: torch.cuda.set_device(device)) if cuda else None  # pinning uses this device
            self._prefetcher = Prefetcher(self._micro_batches(stream.fork()), prefetch, on_start=on_start,
                                          name="bld_scale-data")
            self._source: Iterator[MicroBatch] = self._prefetcher
        else:
            self._source = self._micro_batches(stream)

    def _micro_batches(self, stream) -> Iterator[MicroBatch]:
        for _ in range(self.steps):
            first = stream.position + self.dp_rank * self.global_batch // self.dp_size  # this rank's first window
            mine = rank_share(stream.take(self.global_batch), self.dp_rank, self.dp_size)
            for m in range(self.grad_accum):
                t0 = time.perf_counter()
                windows = mine[m * self.micro:(m + 1) * self.micro]
                batch, cached = self.prepare(windows, first + m * self.micro)
                if self._pin:
                    batch, cached = pinned(batch), pinned(cached)
                yield MicroBatch(batch, cached, teacher_positions(batch) * self.teacher_share,
                                 time.perf_counter() - t0, stream.position, stream.epoch)

    def next(self) -> MicroBatch:
        """The next micro-batch, on the device; the run's stream is now at its step's position."""
        item = next(self._source)
        self.stream.position, self.stream.epoch = item.position, item.epoch  # consumed (a no-op without prefetch)
        item.batch = item.batch.to(self.device)  # non_blocking: asynchronous from pinned memory
        if item.cached is not None:
            item.cached = tuple(t.to(self.device, non_blocking=True) for t in item.cached)
        return item

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
