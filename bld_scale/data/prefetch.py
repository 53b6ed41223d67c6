"""Items of an iterator made ahead in a background thread, handed out in order.

`Prefetcher(items, depth)` runs `items` (any iterable; a generator is run only in that thread) in
a daemon thread and keeps up to `depth` finished items waiting, so the consumer finds the next one
ready while the producer works on the one after. The training loop uses it for its micro-batches
(`bld_scale.train.feed`): both tokenizations, the layout and the teacher-cache reads then run
while the device trains on the previous micro-batch.

Contract:
* order: items come out exactly as the iterable yields them; nothing is dropped or repeated;
* errors: an exception raised by the iterable (or by `on_start`) is raised again in the thread
  that calls `next()`, the same exception object, whose traceback still shows where it was raised
  in the producer; after it, `next()` raises it again rather than hang;
* end: when the iterable is exhausted, `next()` raises StopIteration;
* shutdown: `close()` (also on leaving a `with` block) stops the producer at its next hand-over
  and joins it; the thread is a daemon, so a producer stuck in a call that never returns cannot
  keep the process alive at exit.

The producer runs at most `depth + 1` items ahead of the consumer (`depth` waiting, one being
made). Threads share the GIL: this pays when the producer's work releases it (tokenizers in Rust,
file reads, tensor copies) or when the consumer mostly waits on a device.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")

_ITEM, _END, _ERROR = "item", "end", "error"
_POLL_S = 0.1  # how often a blocked side looks whether the other has gone away


class Prefetcher(Generic[T]):
    def __init__(self, items: Iterable[T], depth: int, *, on_start: Callable[[], None] | None = None,
                 name: str = "bld_scale-prefetch"):
        """`on_start`: called first in the producer thread (e.g. selecting the CUDA device there)."""
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._items, self._on_start = items, on_start
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stopping = threading.Event()
        self._failure: BaseException | None = None
        self._ended = False
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer thread
    def _produce(self) -> None:
        try:
            if self._on_start is not None:
                self._on_start()
            for item in self._items:
                if not self._put((_ITEM, item)):
                    return  # closed: the consumer wants no more
            self._put((_END, None))
        except BaseException as err:  # noqa: BLE001 - every failure goes to the consumer
            self._put((_ERROR, err))

    def _put(self, entry) -> bool:
        while not self._stopping.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    # ------------------------------------------------------------------ consumer
    def __iter__(self):
        return self

    def __next__(self) -> T:
        if self._failure is not None:
            raise self._failure
        if self._ended:
            raise StopIteration
        if self._stopping.is_set():
            raise RuntimeError("the prefetcher was closed: no more items")
        while True:
            try:
                kind, value = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if self._stopping.is_set():
                    raise RuntimeError("the prefetcher was closed: no more items") from None
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread ended without handing over an item or an error") from None
        if kind == _ERROR:
            self._failure = value
            raise value
        if kind == _END:
            self._ended = True
            raise StopIteration
        return value

    def close(self, timeout: float = 30.0) -> None:
        """Stop the producer and wait for it (up to `timeout` s; it is a daemon either way)."""
        self._stopping.set()
        while True:  # free a producer blocked on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
