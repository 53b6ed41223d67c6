"""The pipeline users run, as real processes: `deepspeed` launcher and `torchrun`, no mocks.

Equivalence tolerance (1 rank vs 2 ranks, same global batch): both runs cut each optimizer
step's windows into the same two micro-batches of 2 (1 rank: grad_accum 2; 2 ranks: one each),
so every forward sees identical rows in fp32. Only the order of the gradient sums differs
(an all-reduce of two partial gradients against two accumulated micro-steps): ~1e-7 relative
per step, which Adam can amplify for near-zero gradients over 4 steps. rtol 1e-4 leaves room for
that and none for a real bug (a rank's rows dropped, a gradient not averaged: >1e-2).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from launching import DISTILL, LOSS_KEYS, REPO, assert_same_steps, free_port, records, run_launch
pytestmark = pytest.mark.slow
STUDENT_TOKENIZER = REPO / "bld_scale" / "assets" / "demo" / "student_tokenizer"


# Exact targets here (the checkpoint tests run the default `cover`): the tree-masked teacher
# forwards must keep ZeRO-3 ranks in step (the cap below makes their counts differ by rank, so
# the ranks must agree on a count and pad), and 2 ranks must still match 1.
FAST = ["train.log_interval=1", "train.eval_interval=2", "train.warmup_steps=2", "distill.conversion=exact",
        "distill.exact_chunk_tokens=256"]  # several tree forwards per text, a count that differs by rank


@pytest.fixture(scope="module")
def deepspeed_two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds2")
    port = free_port()
    proc = run_launch(["deepspeed", "--num_gpus", "2", "--master_port", str(port), str(DISTILL),
                       "train.max_steps=4", f"output_dir={out}", "train.micro_batch_size=2",
                       "train.grad_accum=1", *FAST])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc.port = port
    return out, proc


def test_cpu_runs_leave_nothing_in_shared_memory(deepspeed_two_ranks):
    # DeepSpeed's CPU shm all-reduce (built at init_distributed unless we switch it off) maps a
    # 66 MB /dev/shm file per rank, named after the master port, and never unlinks it: RAM lost
    # for good on every run. It is also JIT-compiled on each machine's first run.
    _, proc = deepspeed_two_ranks
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    assert not sorted(shm.glob(f"deepspeed_allreduce_buffer_*_{proc.port}_*"))
    assert "deepspeed_shm_comm_op built" not in proc.stdout + proc.stderr


def test_deepspeed_two_ranks_leave_finite_losses_with_a_kl_term(deepspeed_two_ranks):
    out, proc = deepspeed_two_ranks
    train = records(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        for key in ("loss", "loss_ce", "loss_byte_ce", "loss_kl", "lr", "tokens_per_s", "bytes_per_s"):
            assert math.isfinite(r[key]), (key, r)
        assert r["loss_kl"] > 0
    teacher = records(out, "teacher_eval")[0]
    assert teacher["teacher_token_bpb"] < 4.0  # the shipped teacher is trained, far below random
    assert teacher["conversion"] == "exact" and math.isfinite(teacher["conversion_gap"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["student_bpb_after"] < summary["student_bpb_before"]
    assert (out / "recipe.resolved.yaml").is_file()
    assert (out / "final" / "byte_head.safetensors").is_file()
    assert "student after 4 steps" in proc.stdout  # the closing table
    assert "teacher placement: zero3 (auto on CPU" in proc.stdout  # the default keeps CPU runs as they were
    evals = {r["step"]: r["student_bpb"] for r in records(out, "eval")}
    assert sorted(evals) == [0, 2, 4]  # before, train.eval_interval=2, after
    assert f"[bld_scale] step 2: held-out student BPB {evals[2]:.4f}" in proc.stdout


def test_the_final_tokenizer_encodes_as_training_did(deepspeed_two_ranks):
    from transformers import AutoTokenizer

    out, _ = deepspeed_two_ranks
    src = AutoTokenizer.from_pretrained(STUDENT_TOKENIZER)  # the recipe's student.tokenizer
    final = AutoTokenizer.from_pretrained(out / "final")
    text = "To be, or not to be"
    # training feeds [BOS] + the text's tokens (data.batch.resolve_bos: the tokenizer's BOS)
    assert final(text).input_ids == [src.bos_token_id] + src(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    """The same 4 steps on 1 rank: each step's 4 windows in two micro-batches of 2."""
    out1 = tmp_path_factory.mktemp("one")
    proc = run_launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                       "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(DISTILL),
                       "train.max_steps=4", f"output_dir={out1}", "train.micro_batch_size=2",
                       "train.grad_accum=2", *FAST])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out1


def test_two_ranks_match_one_rank(deepspeed_two_ranks, one_rank_run):
    out2, _ = deepspeed_two_ranks
    assert_same_steps(one_rank_run, out2, 4, (*LOSS_KEYS, "lr"), rel=1e-4)


def test_packed_windows_match_padded_ones(deepspeed_two_ranks, tmp_path):
    """data.pack=true (one row per micro-batch, no padding) trains and evaluates as the padded run:
    the same windows and micro-batches as test_two_ranks_match_one_rank, so the same tolerance.
    The packed run's teacher is replicated (teacher.placement=replicate), the padded run's ZeRO-3:
    packed rows through a plain module and through the engine, one pair of runs."""
    out2, _ = deepspeed_two_ranks
    out1 = tmp_path / "packed"
    proc = run_launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                       "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(DISTILL),
                       "train.max_steps=4", f"output_dir={out1}", "train.micro_batch_size=2",
                       "train.grad_accum=2", "data.pack=true", "teacher.placement=replicate", *FAST])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "teacher placement: replicate" in proc.stdout
    assert_same_steps(out2, out1, 4, rel=1e-4)
    for kind, key in (("eval", "student_bpb"), ("teacher_eval", "teacher_byte_bpb"),
                      ("teacher_eval", "teacher_token_bpb")):
        got, want = [r[key] for r in records(out1, kind)], [r[key] for r in records(out2, kind)]
        assert len(got) == len(want) > 0 and got == pytest.approx(want, rel=1e-4), (kind, key)


def test_sequence_parallel_two_ranks_match_one_rank(one_rank_run, tmp_path, placement="zero3"):
    """parallel.sequence_parallel=2: both ranks share every window (DeepSpeed Ulysses splits the
    teacher's and the student's positions in halves; 512-byte windows, so canonical tokens and
    student tokens straddle the split), each converts its own teacher rows, the byte rows move to
    the student slots by offset, the loss is reduced over the pair. Mode exact, as the 1-rank run:
    the extra contexts' tree forwards run on the rank holding their token, counts agreed over the
    ZeRO-3 teacher's ranks. Same windows and micro-batches as the 1-rank run (grad_accum 2): only
    float summation orders differ (measured ~1e-7 relative). A replicated teacher under sequence
    parallelism is checked by test_checkpoint's SP resume (mode cover), and with mode exact by the
    packed run above (its own forward counts, no agreement); with `placement="replicate"` this test
    passed too (one more launch, ~22 s, not in CI)."""
    out = tmp_path / "sp2"
    proc = run_launch(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(DISTILL),
                       "train.max_steps=4", f"output_dir={out}", "train.micro_batch_size=2", "train.grad_accum=2",
                       "parallel.sequence_parallel=2", f"teacher.placement={placement}", *FAST])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sequence parallel: 2 ranks share each window" in proc.stdout
    assert f"teacher placement: {placement} (teacher.placement set in the recipe)" in proc.stdout
    for a, _ in assert_same_steps(one_rank_run, out, 4, (*LOSS_KEYS, "lr"), rel=1e-5):
        assert a["loss_kl"] > 0
    for kind, key in (("eval", "student_bpb"), ("teacher_eval", "teacher_byte_bpb")):
        got, want = [r[key] for r in records(out, kind)], [r[key] for r in records(one_rank_run, kind)]
        assert len(got) == len(want) > 0 and got == pytest.approx(want, rel=1e-5), (kind, key)


@pytest.mark.parametrize("override, message", [
    ("train.max_step=4", "max_steps"),                   # unknown key: the valid one is suggested
    ("train.max_steps=four", "train.max_steps"),          # wrong type
    ("distill.method=kd", "ce"),                          # bad choice: the valid ones are named
    ("teacher.path=/nonexistent/teacher", "/nonexistent/teacher"),  # missing file
])
def test_bad_recipes_are_refused_before_heavy_work(override, message):
    proc = run_launch([sys.executable, str(DISTILL), override], timeout=120)
    assert proc.returncode == 2
    assert "bad recipe" in proc.stderr and message in proc.stderr
    assert "deepspeed" not in proc.stdout.lower()  # refused before DeepSpeed started
