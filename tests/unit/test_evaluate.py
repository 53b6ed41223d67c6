"""Bits per byte of students and teachers from batch sums, against references computed here."""
from __future__ import annotations

import math

import pytest
import torch

from bld_scale.config import DistillConfig
from bld_scale.convert import byte_logprobs
from bld_scale.data.batch import PairTokenizer, collate
from bld_scale.evaluate import TeacherNllSums, bits_per_byte, student_nll_sums, teacher_nll_sums
from bld_scale.model.student import build_student
from bld_scale.train.step import distill_step
from tiny_models import tiny_llama
from vocab_tables import SINGLE_BYTES, table_vocab

PIECES = SINGLE_BYTES + ["th", "the", "there", "these", "they", "re", "he", "her", "here", " the", " t", "ere"]
TEXTS = ["there the here", "these they, é", "her"]


def alone_logprobs(model, bos, ids):
    """[L + 1, V] log-probabilities of the text run alone (no padding, no batch), float64."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([[bos] + list(ids)])).logits[0].double(), -1)


def forward_of(model):
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


def test_bits_per_byte():
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least one text byte"):
        bits_per_byte(1.0, 0)


def test_byte_level_teacher_sums_equal_its_token_likelihood():
    """Single-byte tokens and EOS as EOT: q_n = p_n, so byte NLL = token NLL = the hand sum."""
    vocab = table_vocab(SINGLE_BYTES)
    bos = eos = vocab.vocab_size - 1
    model = tiny_llama(vocab.vocab_size, seed=1)
    batch = collate([PairTokenizer(vocab, vocab)(t) for t in TEXTS], 2, bos, bos)
    sums = teacher_nll_sums(forward_of(model), batch, vocab, conversion="cover", eos_id=eos)
    want = 0.0
    for text in TEXTS:
        data = text.encode()
        lp = alone_logprobs(model, bos, list(data))
        want -= sum(float(lp[n, data[n]]) for n in range(len(data)))
    assert sums.n_bytes == sum(len(t.encode()) for t in TEXTS)
    assert sums.token_nll == pytest.approx(want, rel=1e-5)
    assert sums.byte_nll == pytest.approx(want, rel=1e-5)
    bpb = sums.bpb()
    assert bpb.token_bpb == pytest.approx(want / (sums.n_bytes * math.log(2)), rel=1e-5)
    assert bpb.gap == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("mode", ["cover", "within_token", "exact"])
def test_teacher_sums_equal_the_per_text_conversion(mode):
    """Batch sums (padded forward, batched targets, two batches accumulated with `into`) against
    each text alone: its own forward and `byte_logprobs`, NLLs summed by hand in float64."""
    vocab = table_vocab(PIECES)
    bos = eos = vocab.vocab_size - 1
    model = tiny_llama(vocab.vocab_size, seed=2)
    pair = PairTokenizer(vocab, vocab)
    examples = [pair(t) for t in TEXTS]
    sums = TeacherNllSums()
    for chunk in (examples[:2], examples[2:]):
        teacher_nll_sums(forward_of(model), collate(chunk, 2, bos, bos), vocab, conversion=mode,
                         teacher_model=model, eos_id=eos, exact_chunk_tokens=8, into=sums)
    tok = byte = 0.0
    for ex in examples:
        ids = ex.teacher_ids
        lp = alone_logprobs(model, bos, ids)
        kw = {"teacher": model, "bos_id": bos} if mode == "exact" else {}
        q = byte_logprobs(lp.float(), ids, vocab, eos_id=eos, mode=mode, **kw).double()
        data = b"".join(vocab.token_bytes(i) for i in ids)
        tok -= sum(float(lp[k, t]) for k, t in enumerate(ids))
        byte -= sum(float(q[n, data[n]]) for n in range(len(data)))
    assert sums.n_bytes == sum(len(t.encode()) for t in TEXTS)
    assert sums.token_nll == pytest.approx(tok, rel=1e-5)
    assert sums.byte_nll == pytest.approx(byte, rel=1e-5)


def test_student_sums_against_a_loop():
    s_vocab = table_vocab(PIECES)
    t_vocab = table_vocab(SINGLE_BYTES)
    batch = collate([PairTokenizer(t_vocab, s_vocab)(t) for t in TEXTS], 3, 256, s_vocab.vocab_size - 1)
    torch.manual_seed(4)
    student = build_student(dict(model_type="llama", vocab_size=s_vocab.vocab_size, hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2), head_kind="linear", K=3).eval()
    nll, n_bytes = student_nll_sums(student, batch)
    want = 0.0
    for b, text in enumerate(TEXTS):
        ids = [s_vocab.vocab_size - 1] + s_vocab.encode(text)[0]
        with torch.no_grad():
            lp = torch.log_softmax(student.lm(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        want -= sum(float(lp[j, ids[j + 1]]) for j in range(len(ids) - 1))
    assert n_bytes == sum(len(t.encode()) for t in TEXTS)
    assert nll == pytest.approx(want, rel=1e-5)


def test_distill_step_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="unknown distill.method 'kd'; choose one of ce, token_kd, uld, mined, dskd, alm, bld"):
        distill_step(None, None, None, DistillConfig(method="kd"))
