"""The fused one-pass conversion: raw logits plus each row's log-normaliser, no log-softmax written.

References: the brute force of `test_byteconv` on `log_softmax(logits)` computed in float64, and
the unfused conversion of the same logits' float32 `log_softmax` (the two paths subtract the
normaliser in float32 in different orders: probabilities agree to float32 rounding).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bld_scale.convert import byte_logprobs
from bld_scale.convert import running_sums as running_sums_module
from bld_scale.convert.byte_rows import pad_byte_rows
from bld_scale.convert.dispatch import teacher_byte_targets, teacher_token_logits
from bld_scale.convert.one_pass import byte_logprobs_one_pass
from bld_scale.convert.running_sums import log_normaliser
from test_byteconv import SMALL, assert_matches, brute_force
from vocab_tables import table_vocab


def raw_logits(rows, vocab_size, scale, seed, offset=0.0):
    """Random logits with a different large offset per row: a conversion that forgot to subtract
    the normaliser would be off by that offset."""
    g = torch.Generator().manual_seed(seed)
    shift = offset * torch.rand(rows, 1, generator=g)
    return torch.randn(rows, vocab_size, generator=g) * scale + shift


def reference(logits, ids, vocab, **kw):
    return brute_force(torch.log_softmax(logits.double(), -1), ids, vocab, **kw)


@pytest.mark.parametrize("mode", ["cover", "within_token"])
@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (4.0, 300.0), (2.0, -80.0)])
def test_fused_matches_brute_force_and_unfused(mode, scale, offset):
    vocab = table_vocab(SMALL)
    ids, _ = vocab.encode("the there here, they é😀 these")
    eos = vocab.vocab_size - 1
    logits = raw_logits(len(ids) + 1, vocab.vocab_size, scale, seed=7, offset=offset)
    got = byte_logprobs(logits, ids, vocab, eos_id=eos, mode=mode, log_normaliser=log_normaliser(logits))
    assert_matches(got, reference(logits, ids, vocab, eos_id=eos, mode=mode))
    unfused = byte_logprobs(torch.log_softmax(logits, -1), ids, vocab, eos_id=eos, mode=mode)
    assert float((got.double().exp() - unfused.double().exp()).abs().max()) <= 2e-6


def test_fused_bfloat16_logits_read_as_float32():
    vocab = table_vocab(SMALL)
    ids, _ = vocab.encode("they there")
    logits = raw_logits(len(ids) + 1, vocab.vocab_size, 2.0, seed=2, offset=40.0).bfloat16()
    got = byte_logprobs(logits, ids, vocab, log_normaliser=log_normaliser(logits))
    assert_matches(got, reference(logits.float(), ids, vocab))


@pytest.mark.parametrize("tiny", [1e-8, 1e-15])
def test_fused_vanishing_masses_are_refined(tiny):
    """Whole byte rows made of masses a difference of running sums cannot resolve: the direct
    re-summation must subtract the normaliser too."""
    vocab = table_vocab(SMALL)
    ids, _ = vocab.encode("there these")
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(len(ids) + 1, vocab.vocab_size, generator=g) + 50.0
    data = b"".join(vocab.token_bytes(i) for i in ids)
    for v in range(vocab.vocab_size):
        piece = vocab.token_bytes(v)
        if piece and piece[0] in data:
            logits[:, v] += float(np.log(tiny)) - 3.0 * float(torch.rand(1, generator=g))
    eos = vocab.vocab_size - 1
    got = byte_logprobs(logits, ids, vocab, eos_id=eos, log_normaliser=log_normaliser(logits))
    assert_matches(got, reference(logits, ids, vocab, eos_id=eos))


def test_log_normaliser_in_row_chunks(monkeypatch):
    monkeypatch.setattr(running_sums_module, "_MIN_CHUNK_BYTES", 4 * 50 * 3)  # 3 rows per chunk
    logits = raw_logits(10, 50, 3.0, seed=1, offset=500.0)
    logits[4] = -math.inf  # a row without mass: -inf, as torch's logsumexp
    got = log_normaliser(logits)
    ref = torch.logsumexp(logits.double(), -1)
    assert got.dtype == torch.float32 and got[4] == -math.inf
    keep = torch.arange(10) != 4
    assert bool(((got[keep].double() - ref[keep]).abs() <= 1e-6 * ref[keep].abs().clamp_min(1)).all())


def test_refusals():
    vocab = table_vocab(SMALL)
    ids, _ = vocab.encode("the")
    logits = raw_logits(len(ids) + 1, vocab.vocab_size, 1.0, seed=0)
    with pytest.raises(ValueError, match="one value per row"):
        byte_logprobs(logits, ids, vocab, log_normaliser=log_normaliser(logits)[:-1])
    with pytest.raises(ValueError, match="mode 'exact' reads log-probabilities"):
        byte_logprobs(logits, ids, vocab, mode="exact", log_normaliser=log_normaliser(logits))


class _Batch:
    def __init__(self, vocab, texts):
        self.teacher_ids = [vocab.encode(t)[0] for t in texts]
        l_max = max(map(len, self.teacher_ids))
        self.teacher_input_ids = torch.zeros(len(texts), l_max + 1, dtype=torch.long)
        self.teacher_attention_mask = torch.ones(len(texts), l_max + 1, dtype=torch.long)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_targets_read_the_raw_logits(dtype):
    """Without `with_token_logprobs` the targets come from the raw logits (no token log-probs
    returned); with it, from the log-softmax, as before. Both match the brute force."""
    vocab = table_vocab(SMALL)
    batch = _Batch(vocab, ["the there", "here they are, these", "é"])
    logits = raw_logits(3 * batch.teacher_input_ids.shape[1], vocab.vocab_size, 2.0, seed=4, offset=60.0)
    logits = logits.view(3, -1, vocab.vocab_size).to(dtype)
    calls = []

    def forward(input_ids, attention_mask):
        calls.append(input_ids.shape)
        return logits

    eos = vocab.vocab_size - 1
    fused = teacher_byte_targets(batch, vocab, conversion="cover", teacher_forward=forward, eos_id=eos)
    plain = teacher_byte_targets(batch, vocab, conversion="cover", teacher_forward=forward, eos_id=eos,
                                 with_token_logprobs=True)
    assert len(calls) == 2 and fused.token_logprobs is None
    assert torch.equal(plain.token_logprobs, torch.log_softmax(logits.float(), -1))
    assert torch.equal(fused.mask, plain.mask)
    want, _ = pad_byte_rows([
        byte_logprobs_one_pass(plain.token_logprobs[b, : len(ids) + 1], ids, vocab, eos_id=eos)
        for b, ids in enumerate(batch.teacher_ids)])
    assert torch.equal(plain.byte_logprobs, want)
    for b, ids in enumerate(batch.teacher_ids):
        n = len(b"".join(vocab.token_bytes(i) for i in ids)) + 1
        ref = reference(logits[b, : len(ids) + 1].float(), ids, vocab, eos_id=eos)
        assert_matches(fused.byte_logprobs[b, :n], ref)
        assert_matches(plain.byte_logprobs[b, :n], ref)
    raw, lse = teacher_token_logits(forward, batch)
    assert raw is logits and lse.shape == logits.shape[:-1]  # the logits are not copied


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", ["cover", "within_token"])
def test_one_pass_over_a_batch_equals_each_text_alone(fused, mode):
    """`byte_logprobs_batch` converts every text in one pass (`one_pass_texts`): texts of unequal
    lengths, an empty one and a one-token one give, bit for bit, their conversions alone."""
    from bld_scale.convert import byte_logprobs_batch

    vocab = table_vocab(SMALL)
    texts = ["the there here, they é😀 these", "", "t", "here"]
    ids = [vocab.encode(t)[0] for t in texts]
    width = max(map(len, ids)) + 1
    logits = raw_logits(len(texts) * width, vocab.vocab_size, 3.0, seed=11, offset=30.0)
    logits = logits.view(len(texts), width, -1)
    scores = logits if fused else torch.log_softmax(logits, -1)
    lse = torch.logsumexp(logits, -1) if fused else None
    eos = vocab.vocab_size - 1
    got, mask = byte_logprobs_batch(scores, ids, vocab, eos_id=eos, mode=mode, log_normaliser=lse)
    for b, seq in enumerate(ids):
        alone = byte_logprobs(scores[b, : len(seq) + 1], seq, vocab, eos_id=eos, mode=mode,
                              log_normaliser=None if lse is None else lse[b, : len(seq) + 1])
        n = alone.shape[0]
        assert torch.equal(got[b, :n], alone) and bool(mask[b, :n].all()) and not bool(mask[b, n:].any())
        assert bool(torch.isinf(got[b, n:]).all())
    with pytest.raises(ValueError, match="one value per row"):
        byte_logprobs_batch(logits, ids, vocab, log_normaliser=torch.zeros(len(texts), width - 1))
