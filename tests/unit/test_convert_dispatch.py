"""The dispatch (`byte_logprobs(mode=...)`, `byte_logprobs_batch`, `teacher_byte_targets`) gives
exactly what each mode's own module gives when called directly."""
from __future__ import annotations

import pytest
import torch

from bld_scale.convert import MODES, byte_logprobs, byte_logprobs_batch, teacher_byte_targets
from bld_scale.convert.byte_rows import pad_byte_rows
from bld_scale.convert.exact import byte_logprobs_exact, exact_byte_targets
from bld_scale.convert.one_pass import byte_logprobs_one_pass
from bld_scale.data.batch import PairTokenizer, collate
from tiny_models import tiny_llama
from vocab_tables import SINGLE_BYTES, table_vocab

PIECES = SINGLE_BYTES + ["th", "the", "there", "these", "they", "re", "he", "her", "here", " the", " t", "ere"]
TEXTS = ["there the here", "these they", "her"]


class CountingTeacher(torch.nn.Module):
    """The model, recording the shape of every call and whether it had an attention mask."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.calls = inner, inner.config, []

    def forward(self, **kw):
        self.calls.append((tuple(kw["input_ids"].shape), kw.get("attention_mask") is not None
                           and kw["attention_mask"].dim() == 2))
        return self.inner(**kw)


@pytest.fixture(scope="module")
def setup():
    vocab = table_vocab(PIECES)
    eos = bos = vocab.vocab_size - 1
    model = tiny_llama(vocab.vocab_size, seed=3)
    pair = PairTokenizer(vocab, vocab)
    batch = collate([pair(t) for t in TEXTS], 2, bos, bos)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=batch.teacher_input_ids,
                                     attention_mask=batch.teacher_attention_mask).logits.float(), -1)
    return vocab, eos, bos, model, batch, lp


def test_one_text_each_mode_equals_its_module(setup):
    vocab, eos, bos, model, batch, lp = setup
    for b, ids in enumerate(batch.teacher_ids):
        rows = lp[b, : len(ids) + 1]
        cover = byte_logprobs(rows, ids, vocab, eos_id=eos, mode="cover")
        within = byte_logprobs(rows, ids, vocab, eos_id=eos, mode="within_token")
        exact = byte_logprobs(rows, ids, vocab, eos_id=eos, mode="exact", teacher=model, bos_id=bos)
        assert torch.equal(cover, byte_logprobs_one_pass(rows, ids, vocab, eos_id=eos))
        assert torch.equal(within, byte_logprobs_one_pass(rows, ids, vocab, eos_id=eos, within_token=True))
        assert torch.equal(exact, byte_logprobs_exact(rows, ids, vocab, teacher=model, eos_id=eos, bos_id=bos))
        if b == 0:  # boundaries inside tokens: the three rules differ, so the mode reached its module
            assert not torch.equal(cover, within) and not torch.equal(cover, exact)


def test_batch_each_mode_equals_its_module(setup):
    vocab, eos, bos, model, batch, lp = setup
    for mode in MODES:
        kw = {"teacher": model, "bos_id": bos} if mode == "exact" else {}
        out, mask = byte_logprobs_batch(lp, batch.teacher_ids, vocab, eos_id=eos, mode=mode, **kw)
        rows = []
        for b, ids in enumerate(batch.teacher_ids):
            one = lp[b, : len(ids) + 1]
            rows.append(byte_logprobs_exact(one, ids, vocab, eos_id=eos, **kw) if mode == "exact" else
                        byte_logprobs_one_pass(one, ids, vocab, eos_id=eos, within_token=mode == "within_token"))
        want, want_mask = pad_byte_rows(rows)
        assert torch.equal(out, want) and torch.equal(mask, want_mask)


@pytest.mark.parametrize("mode", ["cover", "within_token"])
def test_training_targets_of_one_pass_modes(setup, mode):
    vocab, eos, bos, model, batch, lp = setup
    teacher = CountingTeacher(model)
    q, mask, token_lp = teacher_byte_targets(
        batch, vocab, conversion=mode, eos_id=eos, with_token_logprobs=True,
        teacher_forward=lambda ids, m: teacher(input_ids=ids, attention_mask=m).logits)
    assert len(teacher.calls) == 1  # the one-pass forward only
    assert torch.equal(token_lp, lp)
    want, want_mask = pad_byte_rows([
        byte_logprobs_one_pass(lp[b, : len(ids) + 1], ids, vocab, eos_id=eos, within_token=mode == "within_token")
        for b, ids in enumerate(batch.teacher_ids)])
    assert torch.equal(q, want) and torch.equal(mask, want_mask)
    # without the token log-probabilities: fused from the raw logits (test_byteconv_fused), the same
    # distributions to float32 rounding
    q_fused, mask_fused, none = teacher_byte_targets(
        batch, vocab, conversion=mode, eos_id=eos,
        teacher_forward=lambda ids, m: teacher(input_ids=ids, attention_mask=m).logits)
    assert none is None and len(teacher.calls) == 2 and torch.equal(mask_fused, mask)
    assert float((q_fused.double().exp() - q.double().exp()).abs().max()) <= 2e-6


def test_training_targets_of_exact_mode(setup):
    vocab, eos, bos, model, batch, lp = setup
    direct_teacher = CountingTeacher(model)
    want, want_mask = exact_byte_targets(direct_teacher, batch, vocab, eos, max_tokens=8,
                                         agree_forwards=lambda n: n + 2)
    teacher = CountingTeacher(model)
    q, mask, token_lp = teacher_byte_targets(
        batch, vocab, conversion="exact", eos_id=eos, teacher_model=teacher, exact_chunk_tokens=8,
        agree_forwards=lambda n: n + 2,
        teacher_forward=lambda ids, m: teacher(input_ids=ids, attention_mask=m).logits)
    assert torch.equal(q, want) and torch.equal(mask, want_mask)
    assert token_lp is None and teacher.calls == direct_teacher.calls  # no one-pass forward
    assert teacher.calls[-2:] == [((1, 1), False)] * 2  # the agreed padding forwards

    # with the token log-probabilities: the one-pass forward first, then the same tree forwards
    teacher.calls.clear()
    q2, mask2, token_lp = teacher_byte_targets(
        batch, vocab, conversion="exact", eos_id=eos, teacher_model=teacher, exact_chunk_tokens=8,
        agree_forwards=lambda n: n + 2, with_token_logprobs=True,
        teacher_forward=lambda ids, m: teacher(input_ids=ids, attention_mask=m).logits)
    assert teacher.calls[0] == (tuple(batch.teacher_input_ids.shape), True)
    assert teacher.calls[1:] == direct_teacher.calls
    assert torch.equal(token_lp, lp) and torch.equal(q2, q) and torch.equal(mask2, mask)


def test_targets_refuse_bad_requests_clearly(setup):
    vocab, eos, bos, model, batch, lp = setup
    with pytest.raises(ValueError, match="unknown conversion mode 'beam'"):
        teacher_byte_targets(batch, vocab, conversion="beam", teacher_forward=lambda i, m: None)
    with pytest.raises(ValueError, match="needs the teacher model"):
        teacher_byte_targets(batch, vocab, conversion="exact", teacher_forward=lambda i, m: None)
    with pytest.raises(ValueError, match="pass teacher_forward"):
        teacher_byte_targets(batch, vocab, conversion="cover", teacher_forward=None)
    with pytest.raises(TypeError, match="only mode 'exact'"):
        byte_logprobs(lp[0, : len(batch.teacher_ids[0]) + 1], batch.teacher_ids[0], vocab, teacher=model)
