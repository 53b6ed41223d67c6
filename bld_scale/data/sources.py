"""Documents from local text, JSONL or Parquet -> a stream of windows.

The stream is deterministic: documents in a seeded order (per epoch; streaming corpora keep their
stored order), each cut into windows by `split_windows`, numbered globally. Step `s` of a run
with global batch `G` takes windows `s*G .. s*G+G-1`; data-parallel rank `r` of `W` takes its
contiguous `G/W` share of them, split into micro-batches. So the same recipe sees the same
windows per optimizer step whatever the world size, and the whole position is one integer: the
number of windows consumed (`WindowStream.position`), saved and restored with checkpoints.
`builtin:train` and `builtin:heldout` name the shipped corpus.

Text and JSONL files are read by `bld_scale.data.files` (errors name the file, byte offset and
line), Parquet through Hugging Face `datasets` (`bld_scale.data.parquet`). `open_corpus` loads
and checks both splits of a recipe before any model is loaded; every refusal is a `DataError`.
"""
from __future__ import annotations

import glob
import random
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from bld_scale.data.batch import split_windows
from bld_scale.data.corpus import load_works
from bld_scale.data.errors import DataError
from bld_scale.data.files import JsonlFiles, TextFiles
from bld_scale.data.normalize import located, normalized
from bld_scale.data.report import DataReport

BUILTIN = "builtin:"
FORMATS = ("text", "jsonl", "parquet")


def _stderr(message: str) -> None:
    print(f"bld_scale: {message}", file=sys.stderr, flush=True)


def _expand(patterns: Sequence[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"data file or glob {pattern!r} matches nothing")
        files.extend(matches)
    return files


def load_documents(sources: Sequence[str], fmt: str = "text", text_field: str = "text",
                   streaming: bool = False, *, invalid_utf8: str = "error",
                   max_skipped_fraction: float = 0.01, normalize: str = "none",
                   key: str = "data.train", log: Callable[[str], None] | None = _stderr):
    """An iterable of document strings, re-iterable (each call to iter() starts over).

    `text` files are one document each; `jsonl`/`parquet` rows are documents (field or column
    `text_field`). With `streaming`, rows are read lazily (large corpora) and checked as they are
    read; otherwise every file is read and checked here. `invalid_utf8` (`error` | `replace`),
    `max_skipped_fraction` and `normalize` are the recipe's `data.*` keys of those names; `key`
    names the sources in messages, and `log` says once what reading altered or skipped.
    """
    if fmt not in FORMATS:
        raise DataError(f"data.format: unknown format {fmt!r}; choose {', '.join(FORMATS)}")
    builtin = [s for s in sources if s.startswith(BUILTIN)]
    files = [s for s in sources if not s.startswith(BUILTIN)]
    docs = _BuiltinWorks()
    for name in builtin:
        docs.add(name, load_works(name[len(BUILTIN):]))
    if files:
        report = DataReport(key, max_skipped_fraction, {"text": "file", "jsonl": "line"}.get(fmt, "row"))
        paths = _expand(files)
        if fmt == "text":
            loaded = TextFiles(paths, invalid_utf8, report, streaming, log)
        elif fmt == "jsonl":
            loaded = JsonlFiles(paths, text_field, invalid_utf8, report, streaming, log)
        else:
            from bld_scale.data.parquet import ParquetColumn

            loaded = ParquetColumn(paths, text_field, report, streaming, log)
        docs = _Chain(docs, loaded) if len(docs) else loaded
    return normalized(docs, normalize)


class _BuiltinWorks(list):
    """The shipped works (a list of texts) with their names, for messages."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def add(self, source: str, works: dict) -> None:
        self.extend(works.values())
        self.names.extend(f"{source} work {name!r}" for name in works)

    def iter_located(self):
        return zip(self.names, self)


class _Chain:
    def __init__(self, first: _BuiltinWorks, second):
        self.first, self.second = first, second
        self.streaming = second.streaming

    def __iter__(self):
        yield from self.first
        yield from self.second

    def __len__(self):
        return len(self.first) + len(self.second)

    def __getitem__(self, i):
        return self.first[i] if i < len(self.first) else self.second[i - len(self.first)]

    def iter_located(self):
        yield from self.first.iter_located()
        yield from located(self.second)


def has_text(documents) -> bool:
    """Whether any document is non-empty (reads up to the first one that is)."""
    return any(isinstance(t, str) and t for t in documents)


@dataclass
class Corpus:
    """A recipe's documents: `train` for the window stream, `heldout` for evaluation ([] if none)."""

    train: object
    heldout: object


def open_corpus(data, log: Callable[[str], None] | None = _stderr) -> Corpus:
    """Load and check `data.train` and `data.heldout` (a `DataConfig`): cheap enough to run before
    the models load, and the documents it returns are the ones to train on (nothing is read twice).

    Refuses (`DataError`) a training corpus without any text, invalid UTF-8 under
    `data.invalid_utf8: error`, and too many rows without text; says once what it replaced or
    skipped. A streaming corpus is checked as it is read, except that its first text is looked
    for here.
    """
    def load(sources, key, streaming):
        return load_documents(sources, data.format, data.text_field, streaming,
                              invalid_utf8=data.invalid_utf8,
                              max_skipped_fraction=data.max_skipped_fraction,
                              normalize=data.normalize, key=key, log=log)

    train = load(data.train, "data.train", data.streaming)
    if not has_text(train):
        raise DataError(f"data.train holds no text: every document of {', '.join(data.train)} is empty "
                        "(or has no text field): nothing to train on. Point data.train at the corpus")
    heldout = load(data.heldout, "data.heldout", False) if data.heldout else []
    if data.heldout and not has_text(heldout) and log is not None:
        log(f"data.heldout ({', '.join(data.heldout)}) holds no text: no held-out evaluation")
    return Corpus(train, heldout)


class WindowStream:
    """Globally numbered windows over the documents, epoch after epoch, from a position.

    `epoch` is the pass over the data that the last window taken belongs to (0: the first), for
    the metrics; `windows_per_epoch` is known once a pass has ended. When a pass ends the data
    repeats (in a new document order unless streaming); `log` says so once per epoch, or once
    for all when a pass is shorter than one `take` (then every step repeats windows).
    """

    def __init__(self, documents, window_bytes: int, seed: int, shuffle: bool = True,
                 log: Callable[[str], None] | None = None, key: str = "data.train"):
        self.documents = documents
        self.window_bytes = window_bytes
        self.seed = seed
        self.shuffle = shuffle and not getattr(documents, "streaming", False)
        self.log, self.key = log, key
        self.position = 0  # windows consumed so far
        self.epoch = 0
        self.windows_per_epoch: int | None = None
        self._said_tiny = False

    def _epoch_order(self, epoch: int) -> list[int] | None:
        if not self.shuffle:
            return None
        order = list(range(len(self.documents)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def _windows(self) -> Iterator[tuple[int, str]]:
        epoch = 0
        while True:
            order = self._epoch_order(epoch)
            docs = (self.documents[i] for i in order) if order is not None else iter(self.documents)
            produced = 0
            for doc in docs:
                if doc:
                    for window in split_windows(doc, self.window_bytes):
                        produced += 1
                        yield epoch, window
            if not produced:
                raise DataError(f"{self.key} holds no text: every document is empty, nothing to "
                                "train on. Point it at the corpus")
            self.windows_per_epoch = produced
            epoch += 1

    def take(self, count: int) -> list[str]:
        """The next `count` windows from the current position (and advance it)."""
        if not hasattr(self, "_iter") or self._iter_pos != self.position:
            self._iter = self._windows()
            self.epoch = 0
            for _ in range(self.position):  # resume: replay the deterministic order (and epoch)
                self.epoch, _ = next(self._iter)
            self._iter_pos = self.position
        out = []
        for _ in range(count):
            epoch, window = next(self._iter)
            if epoch != self.epoch:
                self._epoch_ended(epoch, count)
                self.epoch = epoch
            out.append(window)
        self.position += count
        self._iter_pos = self.position
        return out

    def fork(self) -> "WindowStream":
        """A stream of its own over the same documents, at this one's position: a reader thread
        takes windows from it ahead of training while this one keeps the position training has
        consumed (what checkpoints save)."""
        twin = WindowStream(self.documents, self.window_bytes, self.seed, self.shuffle, log=self.log, key=self.key)
        twin.position = self.position
        return twin

    def _epoch_ended(self, epoch: int, count: int) -> None:
        if self.log is None or self._said_tiny:
            return
        n = self.windows_per_epoch
        if n < count:
            self._said_tiny = True
            self.log(f"warning: {self.key} gives only {n} window{'s' * (n != 1)} per epoch, fewer than the {count} "
                     "one step takes: every step repeats the same windows. Add data (or lower "
                     "train.micro_batch_size / train.grad_accum)")
        else:
            order = "in the stored order" if not self.shuffle else "in a new document order"
            self.log(f"{self.key}: epoch {epoch - 1} ended ({n} windows per epoch, {n * epoch} "
                     f"taken); epoch {epoch} repeats the data {order}")

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "window_bytes": self.window_bytes,
                "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position (the epoch follows from it; a saved `epoch` is informative only)."""
        if state.get("window_bytes") != self.window_bytes or state.get("seed") != self.seed:
            raise DataError(f"data position was saved with window_bytes={state.get('window_bytes')}, "
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
