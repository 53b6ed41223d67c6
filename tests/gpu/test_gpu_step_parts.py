"""Data off the critical path and step-time parts on a GPU (needs CUDA; skipped without it).

* The feed with `data.prefetch` hands out, on the device, exactly the micro-batches made inline
  (its thread selects the device, pins them, and the copies are non_blocking).
* The step timer's CUDA-event path: device parts, host data wait, nothing read before `close()`.
"""
from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from bld_scale.data.batch import PairTokenizer, collate  # noqa: E402
from bld_scale.data.packing import pack  # noqa: E402
from bld_scale.data.sources import WindowStream  # noqa: E402
from bld_scale.train.feed import MicroBatchFeed  # noqa: E402
from bld_scale.train.step_timer import StepTimer  # noqa: E402

pytestmark = pytest.mark.gpu
TEXTS = [("Now is the winter of our discontent made glorious summer. " * 40)[: 700 + 53 * i] for i in range(15)]


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoTokenizer

    from bld_scale.demo import STUDENT_TOKENIZER_DIR, TEACHER_DIR
    from bld_scale.tokenize.token_bytes import TokenBytes

    t = AutoTokenizer.from_pretrained(TEACHER_DIR)
    s = AutoTokenizer.from_pretrained(STUDENT_TOKENIZER_DIR)
    return (PairTokenizer(TokenBytes.from_tokenizer(t), TokenBytes.from_tokenizer(s)),
            t.bos_token_id or t.eos_token_id, s.bos_token_id or s.eos_token_id)


@pytest.mark.parametrize("layout", [collate, pack])
def test_prefetched_micro_batches_on_the_device_equal_the_inline_ones(pair, layout):
    tok, t_bos, s_bos = pair

    def prepare(windows, first):
        batch = layout([tok(w) for w in windows], 4, t_bos, s_bos)
        return batch, (torch.full((2, 3), float(first)), torch.ones(2, 3, dtype=torch.bool))

    def feed(prefetch):
        return MicroBatchFeed(WindowStream(TEXTS, 256, seed=3), prepare, steps=6, global_batch=4, micro_batch_size=2,
                              grad_accum=2, dp_rank=0, dp_size=1, device=torch.device("cuda"), prefetch=prefetch)

    inline, ahead = feed(0), feed(2)
    for _ in range(12):
        a, b = inline.next(), ahead.next()
        assert b.batch.student_input_ids.is_cuda and b.cached[0].is_cuda
        for name, value in vars(a.batch).items():
            other = getattr(b.batch, name)
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), name
            elif name != "packing":
                assert value == other, name
        assert torch.equal(a.cached[0], b.cached[0]) and (a.position, a.epoch) == (b.position, b.epoch)
    ahead.close()


def test_cuda_parts_are_device_times_and_data_wait_host_time():
    timer = StepTimer(torch.device("cuda"))
    x = torch.randn(4096, 4096, device="cuda")
    timer.start_step()
    timer.mark("data_wait")
    time.sleep(0.05)  # the host waits; the device idles
    timer.mark("student")
    for _ in range(20):
        x = x @ x / 64
    timer.mark("optimizer")
    timer.end_step()
    got = timer.close()
    assert got["time_data_wait"] >= 0.05  # host clock
    assert got["time_student"] > 0.001 and got["time_teacher"] == 0.0
    assert got["time_student"] + got["time_optimizer"] <= got["time_step"] + 1e-5  # events: ~0.5 us resolution
