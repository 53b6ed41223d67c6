"""The sequence-parallel loss: ranks' shares add up to the unsplit `bld_loss`, values and gradients.

Ranks are threads here; `group_sum` is a barrier-synchronised sum, which is what the all-reduce
over the sequence-parallel group computes.
"""
from __future__ import annotations

import threading

import pytest
import torch

from bld_scale.train.losses import bld_loss
from bld_scale.train.sequence_loss import sequence_parallel_bld_loss


class ThreadGroupSum:
    """Sum over `size` threads, one call per thread at a time (an all-reduce)."""

    def __init__(self, size: int):
        self.size, self.values, self.barrier = size, {}, threading.Barrier(size)
        self.lock = threading.Lock()

    def __call__(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.values[rank] = t.detach().clone()
        self.barrier.wait()
        total = sum(self.values[r] for r in range(self.size))
        self.barrier.wait()
        return total


def _inputs(seed=0, B=2, J=11, K=4, V=30):
    g = torch.Generator().manual_seed(seed)
    token_logits = torch.randn(B, J, V, generator=g, dtype=torch.float64).requires_grad_()
    byte_logits = torch.randn(B, J, K, 257, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, V, (B, J), generator=g)
    labels[1, 8:] = -100  # a shorter window: padding on the last rank only
    byte_targets = torch.randint(0, 256, (B, J, K), generator=g)
    byte_targets[torch.rand(B, J, K, generator=g) < 0.4] = -100  # uneven slots per rank
    q = torch.log_softmax(torch.randn(B, J, K, 257, generator=g, dtype=torch.float64) * 2, -1)
    q_mask = byte_targets != -100
    q[0, 2, 0] = float("-inf")  # an undefined teacher row
    return token_logits, labels, byte_logits, byte_targets, q, q_mask


@pytest.mark.parametrize("cuts", [[0, 6, 11], [0, 2, 9, 11], [0, 11, 11]])
def test_shares_add_up_to_the_unsplit_loss_and_gradient(cuts):
    token_logits, labels, byte_logits, byte_targets, q, q_mask = _inputs()
    weights = dict(lambda_ce=1.0, lambda_b=0.7, lambda_kl=0.3)
    ref, ref_logs = bld_loss(token_logits, labels, byte_logits, byte_targets, q, q_mask & torch.isfinite(q).any(-1),
                             **weights)
    ref.backward()
    ref_grads = token_logits.grad.clone(), byte_logits.grad.clone()
    token_logits.grad = byte_logits.grad = None
    W = len(cuts) - 1
    group = ThreadGroupSum(W)
    out = {}

    def rank(r):
        s = slice(cuts[r], cuts[r + 1])
        out[r] = sequence_parallel_bld_loss(token_logits[:, s], labels[:, s], byte_logits[:, s], byte_targets[:, s],
                                            q[:, s], q_mask[:, s], lambda t: group(r, t), W, **weights)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(W)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in range(W):
        assert torch.allclose(out[r][1]["loss"].double(), ref.detach().double(), rtol=1e-6)
        for name in ("loss_ce", "loss_byte_ce", "loss_kl"):
            assert torch.allclose(out[r][1][name].double(), ref_logs[name].double(), rtol=1e-6), name
    # what the engine does: gradients summed over every rank and divided by their number
    sum(out[r][0] for r in range(W)).backward()
    assert torch.allclose(token_logits.grad / W, ref_grads[0], rtol=1e-5, atol=1e-8)  # the terms are computed in float32
    assert torch.allclose(byte_logits.grad / W, ref_grads[1], rtol=1e-5, atol=1e-8)  # the terms are computed in float32


def test_per_rank_means_would_differ():
    """The check above can fail: averaging the ranks' own means is not the unsplit loss here."""
    token_logits, labels, byte_logits, byte_targets, q, q_mask = _inputs()
    ref, _ = bld_loss(token_logits, labels, byte_logits, byte_targets, q, q_mask)
    halves = [bld_loss(token_logits[:, s], labels[:, s], byte_logits[:, s], byte_targets[:, s], q[:, s],
                       q_mask[:, s])[0] for s in (slice(0, 2), slice(2, 11))]
    assert abs(float((sum(halves) / 2 - ref).detach())) > 1e-3
