"""Data off the training thread: the prefetcher (order, errors, shutdown) and the training feed built on
it (the same micro-batches with and without prefetching, the saved position always the consumed one).

One process, no DeepSpeed, no models: the feed is driven with a stand-in `prepare` that records
what it was given.
"""
from __future__ import annotations

import threading
import time
import traceback

import pytest
import torch

from bld_scale.data.batch import PairTokenizer, collate
from bld_scale.data.prefetch import Prefetcher
from bld_scale.data.sources import WindowStream
from bld_scale.train.feed import MicroBatchFeed, pinned, teacher_positions

TEXTS = [("Now is the winter of our discontent made glorious summer. " * 40)[: 700 + 53 * i] for i in range(15)]


# ---------------------------------------------------------------------- Prefetcher
def test_items_come_out_in_order_and_then_the_end():
    with Prefetcher(iter(range(50)), depth=3) as items:
        assert list(items) == list(range(50))
        with pytest.raises(StopIteration):
            next(items)


def test_the_producer_stays_at_most_depth_plus_one_ahead():
    made = []

    def produce():
        for i in range(100):
            made.append(i)
            yield i

    with Prefetcher(produce(), depth=2) as items:
        assert next(items) == 0
        time.sleep(0.3)  # give the producer every chance to run ahead
        assert len(made) <= 1 + 2 + 1  # the one handed out, two waiting, one being made
        assert [next(items) for _ in range(5)] == [1, 2, 3, 4, 5]


def _failing():
    yield "a"
    yield "b"
    raise_deep()


def raise_deep():
    raise KeyError("window 2 is broken")


def test_an_error_in_the_producer_is_raised_in_the_consumer_with_its_traceback():
    items = Prefetcher(_failing(), depth=4)
    assert next(items) == "a" and next(items) == "b"  # what came before the failure is still handed out
    with pytest.raises(KeyError, match="window 2 is broken") as caught:
        next(items)
    frames = [f.name for f in traceback.extract_tb(caught.value.__traceback__)]
    assert "raise_deep" in frames and "_failing" in frames  # where it happened, in the producer thread
    with pytest.raises(KeyError):  # again, not a hang
        next(items)
    items.close()
    assert not items.alive


def test_an_error_in_on_start_is_raised_too():
    def boom():
        raise RuntimeError("no device")

    with Prefetcher(iter([1, 2]), depth=1, on_start=boom) as items:
        with pytest.raises(RuntimeError, match="no device"):
            next(items)


def test_close_stops_a_producer_blocked_on_a_full_queue_and_an_endless_one():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    items = Prefetcher(endless(), depth=2)
    assert next(items) == 0
    time.sleep(0.2)  # the queue is full: the producer waits to hand over
    t0 = time.perf_counter()
    items.close()
    assert not items.alive and time.perf_counter() - t0 < 5
    assert not any(t.name == "bld_scale-prefetch" for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="closed"):
        next(items)


def test_depth_below_one_is_refused():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetcher(iter([]), depth=0)


# ---------------------------------------------------------------------- MicroBatchFeed
class Recorded:
    """A stand-in batch: the windows and their stream index, with the fields the feed reads."""

    def __init__(self, windows, first):
        self.windows, self.first = windows, first
        self.teacher_attention_mask = torch.ones(len(windows), 3, dtype=torch.long)
        self.teacher_input_ids = torch.zeros(len(windows), 3, dtype=torch.long)

    def to(self, device):
        return self


def _prepare(windows, first):
    return Recorded(list(windows), first), None


def _feed(stream, prefetch, steps, dp_rank=0, dp_size=2, micro=2, accum=3, prepare=_prepare):
    return MicroBatchFeed(stream, prepare, steps=steps, global_batch=micro * accum * dp_size, micro_batch_size=micro,
                          grad_accum=accum, dp_rank=dp_rank, dp_size=dp_size, device=torch.device("cpu"),
                          prefetch=prefetch)


def _consume(feed, steps, accum=3):
    """(windows, first, stream position and epoch seen after each micro-batch) of `steps` steps."""
    seen = []
    for _ in range(steps * accum):
        item = feed.next()
        seen.append((item.batch.windows, item.batch.first, feed.stream.position, feed.stream.epoch))
    return seen


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_the_feed_hands_out_the_same_micro_batches_with_and_without_prefetching(dp_rank):
    """Windows, stream indices, and the position and epoch after each micro-batch: equal, past an epoch end."""
    steps = 12  # 12 steps x 12 windows: past the end of the first epoch
    plain = _feed(WindowStream(TEXTS, 256, seed=3), 0, steps, dp_rank=dp_rank)
    ahead = _feed(WindowStream(TEXTS, 256, seed=3), 2, steps, dp_rank=dp_rank)
    a, b = _consume(plain, steps), _consume(ahead, steps)
    ahead.close()
    assert a == b
    assert max(epoch for *_, epoch in a) >= 1
    # the windows are the stream's own: this rank's contiguous share of each step's global batch
    reference = WindowStream(TEXTS, 256, seed=3)
    for step in range(steps):
        batch = reference.take(12)[dp_rank * 6:(dp_rank + 1) * 6]
        got = [w for windows, *_ in a[step * 3:(step + 1) * 3] for w in windows]
        assert got == batch
        assert a[step * 3][1] == step * 12 + dp_rank * 6  # `first`: the stream index of the first window


def test_the_position_is_the_consumed_one_while_the_thread_runs_ahead_and_resumes_exactly():
    """Stopped after 4 of 10 steps with prefetching: the run's stream is at step 4's position (the thread
    has taken more), and a feed restarted from its saved state gives steps 5-10 as an uninterrupted run."""
    straight = _consume(_feed(WindowStream(TEXTS, 256, seed=3), 0, 10), 10)

    stream = WindowStream(TEXTS, 256, seed=3)
    feed = _feed(stream, 3, 10)
    first_part = _consume(feed, 4)
    time.sleep(0.2)  # the thread fills its queue
    assert stream.position == 4 * 12 and stream.state_dict()["position"] == 48
    saved = stream.state_dict()
    feed.close()

    resumed_stream = WindowStream(TEXTS, 256, seed=3)
    resumed_stream.load_state_dict(saved)
    feed = _feed(resumed_stream, 3, 6)
    second_part = _consume(feed, 6)
    feed.close()
    assert first_part + second_part == straight


def test_the_feed_ends_after_its_steps():
    feed = _feed(WindowStream(TEXTS, 256, seed=3), 2, 1)
    _consume(feed, 1)
    with pytest.raises(StopIteration):
        feed.next()
    feed.close()


def test_an_error_while_preparing_surfaces_at_its_micro_batch():
    def prepare(windows, first):
        if first >= 8:
            raise ValueError(f"window {first}: cannot tokenize")
        return _prepare(windows, first)

    feed = _feed(WindowStream(TEXTS, 256, seed=3), 2, 5, dp_size=1, prepare=prepare)
    got = [feed.next().batch.first for _ in range(4)]
    assert got == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="window 8: cannot tokenize"):
        feed.next()
    feed.close()


def test_teacher_positions_leave_padding_out():
    class Padded:
        teacher_attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
        teacher_input_ids = torch.zeros(2, 4)

    class Packed:
        teacher_attention_mask = None
        teacher_input_ids = torch.zeros(1, 9)

    assert teacher_positions(Padded) == 7 and teacher_positions(Packed) == 9


def test_pinned_keeps_every_field_of_a_batch(tiny_pair, monkeypatch):
    """Every tensor of a DistillBatch (and of a tuple beside it) copied to pinned memory, the rest kept."""
    teacher_vocab, student_vocab, t_bos, s_bos = tiny_pair
    pair = PairTokenizer(teacher_vocab, student_vocab)
    batch = collate([pair(TEXTS[0][:200]), pair(TEXTS[1][:150])], 4, t_bos, s_bos)
    if not torch.cuda.is_available():  # pinning needs CUDA: here the walk over the fields, with a copy for pinning
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: t.clone())
    moved, extra = pinned((batch, torch.ones(2)))
    assert torch.equal(extra, torch.ones(2))
    if torch.cuda.is_available():
        assert moved.student_input_ids.is_pinned() and extra.is_pinned()
    for name, value in vars(batch).items():
        other = getattr(moved, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other) and value.data_ptr() != other.data_ptr(), name
        else:
            assert other == value, name


@pytest.fixture(scope="module")
def tiny_pair():
    from transformers import AutoTokenizer

    from bld_scale.demo import STUDENT_TOKENIZER_DIR, TEACHER_DIR
    from bld_scale.tokenize.token_bytes import TokenBytes

    t = AutoTokenizer.from_pretrained(TEACHER_DIR)
    s = AutoTokenizer.from_pretrained(STUDENT_TOKENIZER_DIR)
    return (TokenBytes.from_tokenizer(t), TokenBytes.from_tokenizer(s), t.bos_token_id or t.eos_token_id,
            s.bos_token_id or s.eos_token_id)
