"""Step-time parts (bld_scale.train.step_timer) and the FLOPs / MFU of a train record
(bld_scale.train.throughput), against sleeps of known length and hand computations."""
from __future__ import annotations

import time

import pytest
import torch

from bld_scale.train.step_timer import PARTS, StepTimer
from bld_scale.train.throughput import ModelFlops, parameter_count, peak_bf16_tflops, resolve_peak_tflops, step_flops

# what one micro-batch of the pipeline marks, with the seconds each segment sleeps
SEGMENTS = [("data_wait", 0.010), ("student", 0.020), ("teacher", 0.030), ("conversion", 0.015),
            ("student", 0.025), ("optimizer", 0.005)]


def _run_step(timer: StepTimer, micro_batches: int) -> float:
    t0 = time.perf_counter()
    timer.start_step()
    for _ in range(micro_batches):
        for part, seconds in SEGMENTS:
            timer.mark(part)
            time.sleep(seconds)
    timer.end_step()
    return time.perf_counter() - t0


def test_cpu_parts_add_up_to_the_step_and_match_their_sleeps():
    timer = StepTimer(torch.device("cpu"))
    walls = [_run_step(timer, micro_batches=2) for _ in range(3)]
    timer.add("data_prepare", 0.3)
    got = timer.close()
    assert set(got) == {f"time_{p}" for p in PARTS} | {"time_data_prepare", "time_step"}
    parts = sum(got[f"time_{p}"] for p in PARTS)
    assert parts == pytest.approx(got["time_step"], rel=1e-9)  # contiguous segments: exactly the step
    assert got["time_step"] == pytest.approx(sum(walls) / 3, rel=0.05)
    expected = {p: 0.0 for p in PARTS}
    for part, seconds in SEGMENTS:
        expected[part] += 2 * seconds  # two micro-batches per step
    for part in PARTS:  # a sleep lasts at least its length, and not much more on an idle-ish machine
        assert expected[part] <= got[f"time_{part}"] <= expected[part] + 0.06, (part, got)
    assert got["time_data_prepare"] == pytest.approx(0.1)  # per step
    assert timer.close() == {}  # a new window: nothing measured yet


def test_marks_outside_a_step_are_ignored_and_unknown_parts_refused():
    timer = StepTimer(torch.device("cpu"))
    timer.mark("teacher")  # e.g. a held-out evaluation's teacher forward between steps
    time.sleep(0.05)
    timer.start_step()
    timer.mark("student")
    time.sleep(0.01)
    timer.end_step()
    timer.mark("teacher")
    got = timer.close()
    assert got["time_teacher"] == 0.0 and got["time_step"] == pytest.approx(got["time_student"])
    assert 0.01 <= got["time_step"] < 0.04
    timer.start_step()
    with pytest.raises(ValueError, match="unknown step part 'backward'"):
        timer.mark("backward")
    with pytest.raises(ValueError, match="unknown added time"):
        timer.add("teacher", 1.0)


# ---------------------------------------------------------------------- FLOPs and MFU
def test_step_flops_by_hand():
    # a 1.5B teacher over 8,200 tokens forward, a 1.2B student over 7,900 tokens forward and backward
    assert step_flops(1_500_000_000, 8_200, 1_200_000_000, 7_900) == 2 * 1.5e9 * 8_200 + 6 * 1.2e9 * 7_900


def test_record_tflops_and_mfu_by_hand():
    flops = ModelFlops(n_teacher=1_543_000_000, n_student=1_236_000_000, devices=8, peak_tflops=989.0)
    record = {"tokens_per_s": 20_000.0, "teacher_tokens_per_s": 21_000.0}
    per_device = (2 * 1_543_000_000 * 21_000 + 6 * 1_236_000_000 * 20_000) / 8  # FLOP/s of one GPU
    got = flops.fields(record)
    assert got["tflops"] == pytest.approx(per_device / 1e12, rel=1e-12)
    assert got["mfu"] == pytest.approx(per_device / 989e12, rel=1e-12) and got["mfu_peak_tflops"] == 989.0
    # no peak (a CPU, or an unknown GPU without logging.peak_tflops): TFLOP/s only
    assert set(ModelFlops(10, 10, 1, None).fields(record)) == {"tflops"}
    # no teacher forward (method ce, or a teacher cache): only the student's 6·N·T
    assert ModelFlops(0, 1_000, 1, None).fields({"tokens_per_s": 1e9})["tflops"] == pytest.approx(6.0)


def test_peaks_by_name_and_by_recipe():
    assert peak_bf16_tflops("NVIDIA H200") == 989.0 and peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_bf16_tflops("Tesla T4") is None
    assert resolve_peak_tflops(None, torch.device("cpu")) is None
    assert resolve_peak_tflops(123.0, torch.device("cpu")) == 123.0


def test_parameter_count_counts_a_tied_weight_once_and_zero3_shards_at_full_size():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    assert parameter_count(model) == 40
    shard = torch.nn.Linear(3, 3)
    shard.weight.ds_numel = 900  # a ZeRO-3 partition keeps the full size here
    assert parameter_count(shard) == 900 + 3
