"""Sequence-parallel conversion against the unsplit one.

The pure logic (split points, exclusive prefix sums, halo ranges, routing by byte offset, packing)
over random split points (hypothesis), ranks simulated in one process; then the collectives for
real: two gloo processes (torch.multiprocessing) against `byte_logprobs` of the whole window.
"""
from __future__ import annotations

import functools
import os
import socket

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from bld_scale.convert import byte_logprobs
from bld_scale.convert.byte_rows import token_layout
from bld_scale.convert.shard_plan import (combine_rows, contribution_range, even_bounds, exclusive_prefix,
                                          pack_rows, routing_plan, unpack_rows)
from bld_scale.convert.shard_rows import canonical_logprobs, partial_one_pass_rows
from synthetic_logits import window_logprobs
from vocab_tables import SINGLE_BYTES, table_vocab

# long tokens (up to 11 bytes) so that splits straddle tokens and halos span several bytes
PIECES = SINGLE_BYTES + ["th", "the", "there", "these", "they", " the", " t", "ere", "he", "her", "here",
                         "é".encode(), "😀".encode(), " to be, or", "not to be", " question", "tion", "ion"]
VOCAB = table_vocab(PIECES)
EOS = VOCAB.vocab_size - 1
TEXTS = ["To be, or not to be, that is the question: there these they here", "théé 😀 the there",
         "there there there the question they", "a"]


def _window(text: str, seed: int):
    ids, _ = VOCAB.encode(text)
    lp = window_logprobs([ids], VOCAB.vocab_size, peaked=True, seed=seed)[0]
    return ids, lp


def simulate(lp, ids, bounds, wanted, mode="cover"):
    """The protocol of `sequence_parallel_rows` for every rank in one process (no collectives)."""
    data, starts = token_layout(ids, VOCAB)
    W = len(bounds) - 1
    sums = torch.stack([canonical_logprobs(lp[bounds[r]:bounds[r + 1]], ids, bounds[r]).sum() for r in range(W)])
    ranges = [contribution_range(starts, len(data), bounds[r], bounds[r + 1], VOCAB.max_token_len) for r in range(W)]
    plan = routing_plan(ranges, wanted)
    sent = []
    for r in range(W):
        lo, hi = ranges[r]
        acc = partial_one_pass_rows(lp[bounds[r]:bounds[r + 1]], ids, VOCAB, bounds[r], exclusive_prefix(sums, r),
                                    lo, hi, eos_id=EOS, within_token=mode == "within_token")
        sent.append([pack_rows(acc[torch.as_tensor(plan[r][d] - lo, dtype=torch.long)]) for d in range(W)])
    return [combine_rows(wanted[d], [(plan[s][d], sent[s][d]) for s in range(W)], len(data), "cpu")
            for d in range(W)], ranges


def assert_rows_equal(got, ref):
    assert got.shape == ref.shape
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))
    fin = torch.isfinite(ref)
    if not bool(fin.any()):
        return
    assert torch.allclose(got[fin].double().exp(), ref[fin].double().exp(), rtol=1e-5, atol=1e-7)
    assert (got[fin] - ref[fin]).abs().max() <= 2e-5


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.sampled_from(TEXTS), seed=st.integers(0, 3), data=st.data(),
       mode=st.sampled_from(["cover", "within_token"]))
def test_random_splits_give_the_unsplit_rows(text, seed, data, mode):
    ids, lp = _window(text, seed)
    ref = byte_logprobs(lp, ids, VOCAB, eos_id=EOS, mode=mode)
    n_rows = len(ids) + 1
    W = data.draw(st.integers(1, 4))
    cuts = sorted(data.draw(st.lists(st.integers(0, n_rows), min_size=W - 1, max_size=W - 1)))
    bounds = [0, *cuts, n_rows]
    N = ref.shape[0] - 1
    owner = data.draw(st.lists(st.integers(0, W - 1), min_size=N + 1, max_size=N + 1))  # who reads each row
    wanted = [np.asarray([n for n in range(N + 1) if owner[n] == d], dtype=np.int64) for d in range(W)]
    got, ranges = simulate(lp, ids, bounds, wanted, mode)
    for d in range(W):
        assert_rows_equal(got[d], ref[torch.as_tensor(wanted[d], dtype=torch.long)])
    # the halo: what a rank's tokens reach past the next rank's first byte, bounded by the longest token
    data_, starts = token_layout(ids, VOCAB)
    for r in range(W - 1):
        if ranges[r] != (0, 0) and bounds[r + 1] < len(ids):
            assert ranges[r][1] - starts[bounds[r + 1]] <= 2 * VOCAB.max_token_len


def test_a_token_straddling_the_split_gets_rows_from_two_ranks():
    text = TEXTS[0]
    ids, lp = _window(text, 0)
    data, starts = token_layout(ids, VOCAB)
    k = next(i for i, t in enumerate(ids) if len(VOCAB.token_bytes(t)) >= 9)  # " to be, or"
    bounds = [0, k + 1, len(ids) + 1]  # the long token's row on rank 0, the tokens after it on rank 1
    ranges = [contribution_range(starts, len(data), bounds[r], bounds[r + 1], VOCAB.max_token_len) for r in range(2)]
    overlap = range(ranges[1][0], ranges[0][1])
    assert len(overlap) > 0  # rank 0's tokens put mass on bytes rank 1 starts at: the halo
    wanted = [np.arange(0, ranges[1][0] + 2), np.arange(ranges[1][0] + 2, len(data) + 1)]
    got, _ = simulate(lp, ids, bounds, wanted)
    ref = byte_logprobs(lp, ids, VOCAB, eos_id=EOS)
    for d in range(2):
        assert_rows_equal(got[d], ref[torch.as_tensor(wanted[d])])
    assert len(routing_plan(ranges, wanted)[0][1]) > 0  # rank 0 sends rows rank 1 reads


def test_packing_keeps_float64_normalisers():
    acc = torch.tensor([[-1e5 - 0.25, -1e5 - 3.0] + [-float("inf")] * 255,
                        [-float("inf")] * 257], dtype=torch.float64)
    back = unpack_rows(pack_rows(acc))
    assert torch.equal(torch.isinf(back), torch.isinf(acc))
    # the normalised part keeps float32 precision (~1e-7 relative); a float32 total would be off by ~4e-3
    assert (back[0, :2] - acc[0, :2]).abs().max() < 1e-6


def test_even_bounds_cover_the_sequence():
    assert even_bounds(10, 3) == [0, 4, 8, 10]
    assert even_bounds(2, 4) == [0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="at least 1"):
        even_bounds(3, 0)


# ---------------------------------------------------------------------- two gloo processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ToyCausalLM(torch.nn.Module):
    """One attention layer that takes the tree forwards' 4D additive mask and position ids
    (`convert.tree_forward`): a teacher for mode exact without importing transformers into the
    spawned ranks (seconds each on this machine)."""

    def __init__(self, vocab_size: int, width: int = 16, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.pos = torch.nn.Embedding(vocab_size, width), torch.nn.Embedding(128, width)
        self.qkv, self.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, vocab_size)
        self.double().eval()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        Q = input_ids.shape[1]
        pos = torch.arange(Q)[None] if position_ids is None else position_ids
        h = self.emb(input_ids) + self.pos(pos)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / 4.0
        if attention_mask is None or attention_mask.dim() == 2:
            scores = scores.masked_fill(~torch.tril(torch.ones(Q, Q, dtype=torch.bool)), float("-inf"))
        else:
            scores = scores + attention_mask[:, 0]
        return self.out(h + torch.softmax(scores, -1) @ v) * 3.0


@functools.lru_cache(maxsize=1)
def _exact_teacher():
    return ToyCausalLM(VOCAB.vocab_size)


def _exact_window(text: str):
    from bld_scale.convert.exact import teacher_logprobs

    ids, _ = VOCAB.encode(text)
    return ids, teacher_logprobs(_exact_teacher(), ids, EOS).float()


def _gloo_rank(rank, port, jobs, results):
    import torch.distributed as dist

    from bld_scale.convert.sequence_parallel import SequenceGroup, sequence_parallel_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for name, (mode, texts, bounds, wanted) in jobs.items():
            exact = mode == "exact"
            windows = [_exact_window(t) if exact else _window(t, i) for i, t in enumerate(texts)]
            rows = max(len(ids) for ids, _ in windows) + 1
            lp = torch.zeros(len(texts), rows, VOCAB.vocab_size)
            for b, (ids, w) in enumerate(windows):
                lp[b, : len(ids) + 1] = w
            local = lp[:, bounds[rank]:bounds[rank + 1]].clone()  # only this rank's rows go in
            forwards = []
            extra = dict(teacher_model=_exact_teacher(), bos_ids=[EOS] * len(texts), max_tokens=24,
                         agree_forwards=lambda n: forwards.append(n) or n + 1) if exact else {}
            got = sequence_parallel_rows(local, [ids for ids, _ in windows], VOCAB, bounds, wanted,
                                         SequenceGroup(rank, 2), eos_id=EOS, mode=mode, **extra)
            results[(name, rank, "forwards")] = forwards
            results[(name, rank)] = [g.clone() for g in got]
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_unsplit_rows():
    import torch.multiprocessing as mp

    texts = TEXTS[:3]
    windows = [_window(t, i) for i, t in enumerate(texts)]
    rows = max(len(ids) for ids, _ in windows) + 1
    bounds = even_bounds(rows, 2)
    jobs = {}
    for mode in ("cover", "within_token", "exact"):
        wanted = []
        for ids, _ in windows:
            n = len(token_layout(ids, VOCAB)[0])
            cut = n // 2 + 3  # the student's split: not the teacher's
            wanted.append([np.arange(0, cut), np.arange(cut, n)])
        jobs[mode] = (mode, texts, bounds, wanted)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gloo_rank, args=(_free_port(), jobs, results), nprocs=2)
        results = dict(results)
    teacher = _exact_teacher()
    for mode, (_, _, _, wanted) in jobs.items():
        exact = mode == "exact"
        for b, text in enumerate(texts):
            ids, lp = _exact_window(text) if exact else windows[b]
            extra = dict(teacher=teacher, bos_id=EOS) if exact else {}
            ref = byte_logprobs(lp, ids, VOCAB, eos_id=EOS, mode=mode, **extra)
            if exact:  # the extra contexts matter here: exact is not cover
                assert not torch.allclose(ref, byte_logprobs(lp, ids, VOCAB, eos_id=EOS), atol=1e-3, equal_nan=True)
            for r in range(2):
                assert_rows_equal(results[(mode, r)][b], ref[torch.as_tensor(wanted[b][r])])
    assert all(results[("exact", r, "forwards")][0] > 0 for r in range(2))  # both ranks ran tree forwards


# ---------------------------------------------------------------------- memory planning
def test_estimate_memory_splits_each_window_over_the_sequence_parallel_gpus():
    import sys

    from bld_scale.config import load_recipe
    from launching import REPO

    sys.path.insert(0, str(REPO / "tools"))
    import estimate_memory

    recipe = load_recipe(estimate_memory.DEMO_RECIPE, check_paths=False)
    t_cfg, s_cfg = estimate_memory.teacher_config(recipe, None), estimate_memory.student_config(recipe, None)
    one, two = (estimate_memory.estimate(recipe, 1, 2, t_cfg, s_cfg, 4.4, 3.7, sequence_parallel=n) for n in (1, 2))
    rows = two["activations"].pop("sequence-parallel byte rows")
    assert rows == estimate_memory.SP_ROW_BYTES * recipe.train.micro_batch_size * recipe.data.window_bytes / 2
    assert "sequence-parallel byte rows" not in one["activations"]
    # the SP step writes the teacher's float32 log-softmax, which the fused conversion at SP=1 does not
    lsm = two["activations"].pop("teacher fp32 log-softmax")
    assert lsm == pytest.approx(4 * two["activations"]["teacher logits"])  # 8 bytes a logit against bf16's 2
    assert "teacher fp32 log-softmax" not in one["activations"]
    for name, value in one["activations"].items():
        assert two["activations"][name] == pytest.approx(value / 2), name
    assert two["teacher"]["states"] == one["teacher"]["states"]  # ZeRO-3 shards over all GPUs either way
    with pytest.raises(SystemExit, match="must divide the 2 GPUs"):
        estimate_memory.estimate(recipe, 1, 2, t_cfg, s_cfg, 4.4, 3.7, sequence_parallel=3)
    assert "split over 2 GPUs" in estimate_memory.render(two | {"activations": {**two["activations"], "x": rows}})


def test_recipe_refuses_a_sequence_parallel_size_it_cannot_run():
    from bld_scale.config import RecipeError, load_recipe

    assert load_recipe(None, check_paths=False).parallel.sequence_parallel == 1
    for overrides, message in ((["parallel.sequence_parallel=0"], "must be >= 1"),
                               (["parallel.sequence_parallel=2", "data.pack=true"], "data.pack: false"),
                               (["parallel.sequence_parallel=2", "distill.method=uld"], "method bld")):
        with pytest.raises(RecipeError, match=message):
            load_recipe(None, overrides, check_paths=False)


def test_world_size_must_be_a_multiple_of_the_sequence_parallel_size():
    from bld_scale.parallel.sequence import sequence_layout

    with pytest.raises(ValueError, match="does not divide the world size 3"):
        sequence_layout(2, 3, 0)
    layout = sequence_layout(1, 3, 2)  # off: every rank its own data-parallel replica
    assert (layout.sp_size, layout.dp_rank, layout.dp_size) == (1, 2, 3)
