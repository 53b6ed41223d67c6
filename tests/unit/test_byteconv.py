"""byte_logprobs against a brute force written here from the spec, and its exact properties."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bld_scale.convert import EOT, byte_logprobs, byte_logprobs_batch
from bld_scale.evaluate import teacher_bpb, token_nll
from bld_scale.tokenize.token_bytes import TokenBytes, row_shift
from vocab_tables import SINGLE_BYTES, table_vocab


# ---------------------------------------------------------------------- the reference
def brute_force(logprobs, ids, vocab, eos_id=None, mode="cover"):
    """Direct float64 sums over the vocabulary with startswith, one offset at a time."""
    p = np.exp(logprobs.double().numpy())
    pieces = [vocab.token_bytes(i) for i in ids]
    data = b"".join(pieces)
    starts = np.cumsum([0] + [len(x) for x in pieces])[:-1]
    log_prefix = np.concatenate([[0.0], np.cumsum([math.log(p[k, ids[k]]) for k in range(len(ids))])])
    entries = [(v, vocab.token_bytes(v)) for v in range(vocab.vocab_size) if vocab.token_bytes(v)]
    startswith_cache: dict[bytes, list] = {}

    def tokens_extending(u):  # (id, next byte) of every token strictly longer than u, starting with u
        if u not in startswith_cache:
            startswith_cache[u] = [(v, b[len(u)]) for v, b in entries if len(b) > len(u) and b.startswith(u)]
        return startswith_cache[u]

    out = np.full((len(data) + 1, 257), -np.inf)
    out[len(data), 256] = 0.0
    for n in range(len(data)):
        splits = [k for k in range(len(ids)) if starts[k] <= n]
        if mode == "within_token":
            splits = [max(splits)]
        scale = max(log_prefix[k] for k in splits)
        acc = np.zeros(257)
        for k in splits:
            weight = math.exp(log_prefix[k] - scale)
            for v, b in tokens_extending(data[starts[k]:n]):
                acc[b] += weight * p[k, v]
            if starts[k] == n and eos_id is not None:
                acc[256] += weight * p[k, eos_id]
        with np.errstate(divide="ignore"):
            out[n] = np.log(acc / acc.sum())
    return out


def assert_matches(got, ref):
    got = got.double().numpy()
    # float32 output: probabilities agree to float32 rounding; log-probabilities wherever the
    # probability is not tiny (a float32 log of a value near 1e-30 is still exact to 1e-6
    # relative, but the reference's own float64 rounding in the normaliser is ~1e-16 absolute).
    np.testing.assert_allclose(np.exp(got), np.exp(ref), atol=2e-6, rtol=0)
    big = np.exp(ref) > 1e-6
    np.testing.assert_allclose(got[big], ref[big], atol=2e-5, rtol=0)


def random_logprobs(rows, vocab_size, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(rows, vocab_size, generator=g) * scale, dim=-1)


# ---------------------------------------------------------------------- small vocabularies
SMALL = SINGLE_BYTES + ["th", "the", "there", "these", "they", "re", "he", "her", "here", " the",
                        " t", "ere", "é".encode(), "😀".encode()[:2], "😀".encode()]


@pytest.mark.parametrize("mode", ["cover", "within_token"])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_small_vocab_matches_brute_force(mode, scale):
    vocab = table_vocab(SMALL)
    text = "the there here, they é😀 these"
    ids, _ = vocab.encode(text)
    lp = random_logprobs(len(ids) + 1, vocab.vocab_size, scale, seed=3)
    eos = vocab.vocab_size - 1
    got = byte_logprobs(lp, ids, vocab, eos_id=eos, mode=mode)
    assert_matches(got, brute_force(lp, ids, vocab, eos_id=eos, mode=mode))


def test_rows_sum_to_one_and_end_row_is_eot():
    vocab = table_vocab(SMALL)
    ids, _ = vocab.encode("there they theme")
    lp = random_logprobs(len(ids) + 1, vocab.vocab_size, 3.0, seed=1)
    q = byte_logprobs(lp, ids, vocab, eos_id=vocab.vocab_size - 1)
    np.testing.assert_allclose(q.double().exp().sum(-1).numpy(), 1.0, atol=1e-5)
    assert q[-1, EOT] == 0 and torch.isinf(q[-1, :EOT]).all()


def test_no_eos_means_no_eot_before_the_end():
    vocab = table_vocab(SMALL)
    ids, _ = vocab.encode("the here")
    q = byte_logprobs(random_logprobs(len(ids) + 1, vocab.vocab_size, 1.0, 0), ids, vocab)
    assert torch.isinf(q[:-1, EOT]).all()


def test_within_token_leaks_the_boundary_that_cover_keeps():
    """After the canonical token "the", cover still sees "there" in p_k; within_token does not."""
    vocab = table_vocab(SINGLE_BYTES + ["the", "there"])
    the, there = 256, 257
    ids, _ = vocab.encode("the ")
    assert ids == [the, ord(" ")]
    lp = torch.full((3, vocab.vocab_size), -1e9)
    lp[0, the] = lp[0, there] = math.log(0.5)  # p_1: "the" or "there", half each
    lp[1, ord(" ")] = 0.0  # p_2 after "the": surely a space
    cover = byte_logprobs(lp, ids, vocab, mode="cover")[3].exp()
    within = byte_logprobs(lp, ids, vocab, mode="within_token")[3].exp()
    assert within[ord(" ")] == pytest.approx(1.0) and within[ord("r")] == 0
    # cover: split at 0 with "the"+"r" (mass 0.5) and split at 3, P("the") = 0.5, then " " surely
    assert cover[ord("r")] == pytest.approx(0.5, abs=1e-6)
    assert cover[ord(" ")] == pytest.approx(0.5, abs=1e-6)


def test_byte_level_teacher_gets_its_own_distribution_back():
    vocab = table_vocab(SINGLE_BYTES)
    text = "héllo, wörld 😀"
    ids, _ = vocab.encode(text)
    eos = 256
    lp = random_logprobs(len(ids) + 1, vocab.vocab_size, 2.0, seed=7)
    q = byte_logprobs(lp, ids, vocab, eos_id=eos)
    np.testing.assert_allclose(q[:-1].numpy(), lp[:-1].numpy(), atol=2e-6)  # columns 0..255, 256 = EOS


def test_peaked_teacher_byte_likelihood_telescopes_to_token_likelihood():
    """All mass on the canonical token or on tokens whose first byte differs from the text's.

    Then no other cover exists, every in-token byte has probability 1 and every boundary byte
    has probability p_k(t_k): the byte log-likelihood equals the token one. The tolerance is
    float32 rounding of the output (~1e-7 relative per row) summed over the rows.
    """
    vocab = table_vocab(SMALL)
    text = "the there here they"
    ids, _ = vocab.encode(text)
    pieces = [vocab.token_bytes(i) for i in ids]
    g = torch.Generator().manual_seed(0)
    lp = torch.full((len(ids) + 1, vocab.vocab_size), -1e4)
    start = 0
    for k, t in enumerate(ids):
        first = pieces[k][0]
        other = [v for v in range(vocab.vocab_size) if vocab.token_bytes(v) and vocab.token_bytes(v)[0] != first]
        logits = torch.full((vocab.vocab_size,), -1e4)
        logits[other] = torch.randn(len(other), generator=g)
        logits[t] = float(torch.randn(1, generator=g)) + 3
        lp[k] = torch.log_softmax(logits, -1)
        start += len(pieces[k])
    lp[len(ids)] = torch.log_softmax(torch.randn(vocab.vocab_size, generator=g), -1)
    q = byte_logprobs(lp, ids, vocab)
    data = b"".join(pieces)
    byte_ll = float(q[torch.arange(len(data)), torch.tensor(list(data))].double().sum())
    token_ll = -token_nll(lp, ids)
    assert byte_ll == pytest.approx(token_ll, abs=len(data) * 1e-6)


def test_batched_form_gives_the_same_numbers():
    vocab = table_vocab(SMALL)
    texts = ["the there", "here they are, these", "é"]
    ids = [vocab.encode(t)[0] for t in texts]
    l_max = max(len(x) for x in ids)
    lp = random_logprobs(len(texts) * (l_max + 1), vocab.vocab_size, 2.0, 5).view(len(texts), l_max + 1, -1)
    out, mask = byte_logprobs_batch(lp, ids, vocab, eos_id=vocab.vocab_size - 1)
    for b, seq in enumerate(ids):
        single = byte_logprobs(lp[b, : len(seq) + 1], seq, vocab, eos_id=vocab.vocab_size - 1)
        n = single.shape[0]
        assert torch.equal(out[b, :n], single)
        assert mask[b, :n].all() and not mask[b, n:].any()


def test_small_chunks_give_the_same_numbers(monkeypatch):
    import bld_scale.convert.running_sums as bc

    vocab = table_vocab(SMALL)
    ids, _ = vocab.encode("the there here they these theme")
    lp = random_logprobs(len(ids) + 1, vocab.vocab_size, 2.0, 9)
    whole = byte_logprobs(lp, ids, vocab, eos_id=vocab.vocab_size - 1)
    monkeypatch.setattr(bc, "chunk_rows", lambda *a: 2)
    chunked = byte_logprobs(lp, ids, vocab, eos_id=vocab.vocab_size - 1)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


def test_bfloat16_input_is_computed_in_float32():
    vocab = table_vocab(SMALL)
    ids, _ = vocab.encode("they there")
    lp = random_logprobs(len(ids) + 1, vocab.vocab_size, 2.0, 2).bfloat16()
    got = byte_logprobs(lp, ids, vocab)
    assert_matches(got, brute_force(lp.float(), ids, vocab))


def test_bad_inputs_are_refused_clearly():
    vocab = table_vocab(SMALL)
    ids, _ = vocab.encode("the")
    lp = random_logprobs(len(ids) + 1, vocab.vocab_size, 1.0, 0)
    with pytest.raises(ValueError, match="vocab-size mismatch"):
        byte_logprobs(lp[:, :-1], ids, vocab)
    with pytest.raises(ValueError, match="L \\+ 1 rows"):
        byte_logprobs(lp[:-1], ids, vocab)
    with pytest.raises(ValueError, match="unknown conversion mode"):
        byte_logprobs(lp, ids, vocab, mode="beam")
    with pytest.raises(ValueError, match="has no bytes"):
        byte_logprobs(random_logprobs(2, vocab.vocab_size, 1.0, 0), [vocab.vocab_size - 1], vocab)


def test_empty_text():
    vocab = table_vocab(SMALL)
    q = byte_logprobs(random_logprobs(1, vocab.vocab_size, 1.0, 0), [], vocab)
    assert q.shape == (1, 257) and q[0, EOT] == 0


# ---------------------------------------------------------------------- real vocabularies
REAL_TEXT = "The theory: there,\r\n\tthey said — é😀 日本"


def _check_real(tok, text, seed, vocab_size=None, modes=("cover", "within_token")):
    vocab = TokenBytes.from_tokenizer(tok, vocab_size=vocab_size)
    ids, _ = vocab.encode(text)
    for scale in (1.0, 6.0):  # random, and peaked (a few tokens hold most of the mass)
        lp = random_logprobs(len(ids) + 1, vocab.vocab_size, scale, seed)
        for mode in modes:
            got = byte_logprobs(lp, ids, vocab, mode=mode)
            assert_matches(got, brute_force(lp, ids, vocab, mode=mode))


@pytest.mark.slow
def test_tekken_matches_brute_force():
    from bld_scale.tokenize.zoo import tekken

    _check_real(tekken(), "The theory: there, é😀 日本", seed=11, modes=("cover",))


@pytest.mark.slow
def test_mistral_sentencepiece_matches_brute_force_with_dummy_prefix():
    from bld_scale.tokenize.zoo import mistral_sentencepiece

    sp = mistral_sentencepiece()
    vocab = TokenBytes.from_tokenizer(sp)
    ids, spans = vocab.encode("there")
    assert row_shift(ids, spans, vocab) == 1  # the dummy-prefix space is row 0
    _check_real(sp, REAL_TEXT, seed=12)


def test_locally_trained_bpe_matches_brute_force():
    from bld_scale.data.corpus import load_works
    from bld_scale.tokenize.zoo import train_byte_level_bpe

    works = load_works("train")
    tok = train_byte_level_bpe([text[:30000] for text in list(works.values())[:4]], vocab_size=600)
    _check_real(tok, REAL_TEXT, seed=13)


# ---------------------------------------------------------------------- bits per byte
def test_teacher_bpb_and_gap_on_a_byte_level_teacher_are_equal():
    vocab = table_vocab(SINGLE_BYTES)
    text = "to be or not to be"
    ids, _ = vocab.encode(text)
    lp = random_logprobs(len(ids) + 1, vocab.vocab_size, 2.0, 4)
    result = teacher_bpb(lp, text, vocab, eos_id=vocab.vocab_size - 1)
    expected = token_nll(lp, ids) / (len(text) * math.log(2))
    assert result.token_bpb == pytest.approx(expected)
    # a byte-level teacher with its EOS as EOT: q_n = p_n, so both levels agree
    assert result.byte_bpb == pytest.approx(expected, rel=1e-5)
    assert result.gap == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("n_values", [3, 5000])  # the touched-cells path and the dense path
def test_logaddexp_scatter_against_a_loop(n_values):
    from bld_scale.convert.running_sums import logaddexp_scatter

    g = torch.Generator().manual_seed(n_values)
    acc = torch.randn(400, generator=g, dtype=torch.float64) * 30
    acc[torch.randperm(400, generator=g)[:150]] = -math.inf  # cells nothing reached yet
    target = torch.randint(0, 400, (n_values,), generator=g)
    value = torch.randn(n_values, generator=g, dtype=torch.float64) * 30 - 700  # tiny masses too
    value[::7] = -math.inf
    # in log space, by hand: logsumexp over the cell's old value and its values
    want = acc.clone()
    for t in range(400):
        vals = [v for v, tt in zip(value.tolist(), target.tolist()) if tt == t and math.isfinite(v)]
        if vals:
            items = vals + ([acc[t].item()] if math.isfinite(acc[t].item()) else [])
            peak = max(items)
            want[t] = peak + math.log(math.fsum(math.exp(x - peak) for x in items))
    got = acc.clone()
    logaddexp_scatter(got, target, value)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-12, atol=1e-12)
