"""Documents from local text, JSONL or Parquet (Hugging Face `datasets`) -> a stream of windows.

The stream is deterministic: documents in a seeded order (per epoch; streaming corpora keep their
stored order), each cut into windows by `split_windows`, numbered globally. Step `s` of a run
with global batch `G` takes windows `s*G .. s*G+G-1`; data-parallel rank `r` of `W` takes its
contiguous `G/W` share of them, split into micro-batches. So the same recipe sees the same
windows per optimizer step whatever the world size, and the whole position is one integer: the
number of windows consumed (`WindowStream.position`), saved and restored with checkpoints.
`builtin:train` and `builtin:heldout` name the shipped corpus.
"""
from __future__ import annotations

import glob
import random
from typing import Iterator, Sequence

from bld_scale.data.corpus import load_works
from bld_scale.data.batch import split_windows

BUILTIN = "builtin:"


def _expand(patterns: Sequence[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"data file or glob {pattern!r} matches nothing")
        files.extend(matches)
    return files


def load_documents(sources: Sequence[str], fmt: str = "text", text_field: str = "text",
                   streaming: bool = False):
    """An iterable of document strings, re-iterable (each call to iter() starts over).

    `text` files are one document each; `jsonl`/`parquet` rows are documents (column
    `text_field`). With `streaming`, rows are read lazily (large corpora).
    """
    builtin = [s for s in sources if s.startswith(BUILTIN)]
    files = [s for s in sources if not s.startswith(BUILTIN)]
    docs: list = []
    for name in builtin:
        split = name[len(BUILTIN):]
        docs.extend(load_works(split).values())
    if not files:
        return docs
    import datasets

    kind = {"text": "text", "jsonl": "json", "parquet": "parquet"}[fmt]
    kwargs = {"sample_by": "document"} if kind == "text" else {}
    dataset = datasets.load_dataset(kind, data_files=_expand(files), split="train",
                                    streaming=streaming, **kwargs)
    if text_field not in (dataset.column_names or [text_field]):
        raise ValueError(f"data.text_field={text_field!r} is not a column of {files}; columns: "
                         f"{dataset.column_names}")
    column = "text" if kind == "text" else text_field
    if docs:
        return _Chain(docs, _Column(dataset, column))
    return _Column(dataset, column)


class _Column:
    def __init__(self, dataset, column):
        self.dataset, self.column = dataset, column
        self.streaming = not hasattr(dataset, "__len__")

    def __iter__(self):
        for row in self.dataset:
            yield row[self.column]

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[int(i)][self.column]


class _Chain:
    def __init__(self, first: list, second: _Column):
        self.first, self.second = first, second
        self.streaming = second.streaming

    def __iter__(self):
        yield from self.first
        yield from self.second

    def __len__(self):
        return len(self.first) + len(self.second)

    def __getitem__(self, i):
        return self.first[i] if i < len(self.first) else self.second[i - len(self.first)]


class WindowStream:
    """Globally numbered windows over the documents, epoch after epoch, from a position."""

    def __init__(self, documents, window_bytes: int, seed: int, shuffle: bool = True):
        self.documents = documents
        self.window_bytes = window_bytes
        self.seed = seed
        self.shuffle = shuffle and not getattr(documents, "streaming", False)
        self.position = 0  # windows consumed so far

    def _epoch_order(self, epoch: int) -> list[int] | None:
        if not self.shuffle:
            return None
        order = list(range(len(self.documents)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def _windows(self) -> Iterator[str]:
        epoch = 0
        while True:
            order = self._epoch_order(epoch)
            docs = (self.documents[i] for i in order) if order is not None else iter(self.documents)
            produced = False
            for doc in docs:
                if doc:
                    for window in split_windows(doc, self.window_bytes):
                        produced = True
                        yield window
            if not produced:
                raise ValueError("the training data holds no text: every document is empty")
            epoch += 1

    def take(self, count: int) -> list[str]:
        """The next `count` windows from the current position (and advance it)."""
        if not hasattr(self, "_iter") or self._iter_pos != self.position:
            self._iter = self._windows()
            for _ in range(self.position):  # resume: replay the deterministic order
                next(self._iter)
            self._iter_pos = self.position
        out = [next(self._iter) for _ in range(count)]
        self.position += count
        self._iter_pos = self.position
        return out

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "window_bytes": self.window_bytes}

    def load_state_dict(self, state: dict) -> None:
        if state.get("window_bytes") != self.window_bytes or state.get("seed") != self.seed:
            raise ValueError(f"data position was saved with window_bytes={state.get('window_bytes')}, "
                             f"seed={state.get('seed')}; this run has {self.window_bytes}, {self.seed}: "
                             "the saved position would point at other windows")
        self.position = int(state["position"])


def rank_share(windows: list[str], rank: int, world: int) -> list[str]:
    """Rank `rank`'s contiguous share of a global batch (the batch must divide evenly)."""
    if len(windows) % world:
        raise ValueError(f"global batch of {len(windows)} windows does not split over {world} ranks")
    share = len(windows) // world
    return windows[rank * share:(rank + 1) * share]


def heldout_windows(documents, window_bytes: int, max_windows: int) -> list[str]:
    """The first `max_windows` windows of the held-out documents, in stored order."""
    out: list[str] = []
    for doc in documents:
        for window in split_windows(doc, window_bytes) if doc else []:
            out.append(window)
            if len(out) >= max_windows:
                return out
    return out
