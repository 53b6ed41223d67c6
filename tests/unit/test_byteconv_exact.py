"""Mode "exact" against a brute force written here, and the tree forward against separate runs.

The reference enumerates every token sequence whose bytes are a prefix x[0..e) of the text (all
segmentations over the vocabulary), keeps the valid complete parts by the rule of
`bld_scale.byteconv_exact` (a canonical prefix t_<k with s_k = e, or the tokenizer's own encoding
of x[0..e) when that is a text), runs the model on each kept context alone (no tree, no cache),
and sums the last token over the whole vocabulary with `startswith`, in float64.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bld_scale.convert import EOT, byte_logprobs, byte_logprobs_batch
from bld_scale.convert.exact import byte_logprobs_exact, teacher_logprobs
from bld_scale.convert.exact_contexts import exact_contexts
from bld_scale.convert.tree_forward import separate_logprobs, tree_logprobs
from bld_scale.tokenize.token_bytes import TokenBytes
from vocab_tables import SINGLE_BYTES, table_vocab


# ---------------------------------------------------------------------- models and vocabularies
def tiny_llama(vocab_size, seed=0, attn="sdpa", dtype=torch.float64, init=0.2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=init, tie_word_embeddings=False)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


SMALL = SINGLE_BYTES + ["th", "the", "there", "these", "they", "re", "he", "her", "here", " the",
                        " t", "ere", "é".encode(), "😀".encode()[:2], "😀".encode(), "😀".encode()[2:]]


# ---------------------------------------------------------------------- the reference
def brute_force_exact(model, vocab, ids, bos, eos, encode_text, shift):
    """Exact next-byte probabilities by enumeration, float64, numpy [N + 1, 257]."""
    pieces = [vocab.token_bytes(i) for i in ids]
    data = b"".join(pieces)
    N = len(data)
    starts = list(np.cumsum([0] + [len(p) for p in pieces])[:-1])
    entries = [(v, vocab.token_bytes(v)) for v in range(vocab.vocab_size) if vocab.token_bytes(v)]
    # every segmentation of every prefix x[0..e), e < N
    segs = {0: [()]}
    for e in range(1, N):
        segs[e] = [s + (v,) for e0 in range(e) for v, b in entries if b == data[e0:e] for s in segs[e0]]

    def valid(tau, e):
        if e in starts and list(tau) == list(ids[:starts.index(e)]):
            return True  # (a) a canonical prefix
        if e <= shift or (data[e] & 0xC0) == 0x80:
            return False  # x[0..e) is not a text of the tokenizer
        return list(tau) == list(encode_text(data[shift:e].decode("utf-8")))  # (b)

    acc = np.zeros((N + 1, 257))
    for e in range(N):
        for tau in segs[e]:
            if not valid(tau, e):
                continue
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([[bos, *tau]])).logits[0].double()
            lp = torch.log_softmax(logits, -1).numpy()
            log_p_tau = sum(lp[i, t] for i, t in enumerate(tau))
            p = np.exp(lp[-1] + log_p_tau)
            if eos is not None:
                acc[e, EOT] += p[eos]
            for v, b in entries:
                for n in range(e, min(N, e + len(b) - 1) + 1):
                    if n < N and len(b) > n - e and b[: n - e] == data[e:n]:
                        acc[n, b[n - e]] += p[v]
    acc[N, EOT] = 1.0
    return acc / acc.sum(1, keepdims=True)


def run_exact(model, vocab, text, bos, eos, **kw):
    ids, spans = vocab.encode(text)
    lp = teacher_logprobs(model, ids, bos)
    return ids, lp, byte_logprobs(lp, ids, vocab, eos_id=eos, mode="exact", teacher=model, bos_id=bos, **kw)


def check_against_brute_force(vocab, text, encode_text, seed=0, prefix_window=None, max_tokens=4096):
    bos = eos = vocab.vocab_size - 1
    model = tiny_llama(vocab.vocab_size, seed=seed)
    ids, lp, got = run_exact(model, vocab, text, bos, eos, prefix_window=prefix_window, max_tokens=max_tokens)
    shift = exact_contexts(ids, vocab).shift
    ref = brute_force_exact(model, vocab, ids, bos, eos, encode_text, shift)
    diff = np.abs(got.double().exp().numpy() - ref).max()
    assert diff <= 1e-5, diff
    cover = byte_logprobs(lp, ids, vocab, eos_id=eos).double().exp().numpy()
    return got, ref, cover


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("max_tokens", [4096, 6])  # one tree forward; one branch per forward
def test_tiny_vocab_matches_brute_force(max_tokens):
    vocab = table_vocab(SMALL)
    got, ref, cover = check_against_brute_force(vocab, "there the é😀h", vocab._encode_ids, seed=1,
                                                max_tokens=max_tokens)
    assert np.abs(cover - ref).max() > 1e-3  # the exact rule does add mass that cover misses
    np.testing.assert_allclose(got.double().exp().sum(-1).numpy(), 1.0, atol=1e-6)


def test_tiny_vocab_mid_character_boundary_is_not_a_text():
    """A token boundary inside "😀" (tokens 😀[:2] + 😀[2:]) is no text: no (b) context there."""
    vocab = table_vocab(SMALL)
    ids, _ = vocab.encode("a😀")
    ctx = exact_contexts(ids, vocab, prefix_window=None)
    assert all(e not in (2, 3, 4) for e in ctx.starts)


def test_locally_trained_bpe_matches_brute_force(bpe_tok):
    vocab = TokenBytes.from_tokenizer(bpe_tok, vocab_size=len(bpe_tok) + 1)  # + a BOS/EOS row

    def encode(text):
        return bpe_tok.encode(text, add_special_tokens=False)

    for text, seed in [("Thou there", 2), ("he's here.", 3)]:
        check_against_brute_force(vocab, text, encode, seed=seed)


def test_sentencepiece_dummy_prefix_matches_brute_force(sp_tok):
    vocab = TokenBytes.from_tokenizer(sp_tok, vocab_size=sp_tok.get_piece_size() + 1)

    def encode(text):
        return sp_tok.encode(text, out_type=int)

    ids, _ = vocab.encode("the theme")
    assert exact_contexts(ids, vocab).shift == 1
    check_against_brute_force(vocab, "the theme", encode, seed=4)


def test_byte_level_tokenizer_exact_equals_cover():
    vocab = table_vocab(SINGLE_BYTES)
    model = tiny_llama(vocab.vocab_size, seed=5)
    eos = bos = 256
    ids, lp, got = run_exact(model, vocab, "héllo, wörld", bos, eos)
    info = {}
    byte_logprobs_exact(lp, ids, vocab, teacher=model, eos_id=eos, bos_id=bos, info=info)
    assert info["contexts"] == 0 and info["tree_nodes"] == 0
    assert torch.equal(got, byte_logprobs(lp, ids, vocab, eos_id=eos))


@pytest.mark.parametrize("name", ["bpe", "llama3", "tekken", "gemma_sp", "gemma_hf", "mistral_sp", "mistral_hf"])
def test_prefix_window_gives_the_full_prefix_encoding(case_of, heldout_text, name):
    """The windowed prefix encodings (16 tokens back) equal the tokenizer's encoding of the whole
    prefix, for every family: BPE with and without pre-tokenizer, tiktoken, SentencePiece."""
    vocab = case_of(name).tb
    for start in (5000, 41_000):
        ids, _ = vocab.encode(heldout_text[start:start + 500])
        full = exact_contexts(ids, vocab, prefix_window=None)
        windowed = exact_contexts(ids, vocab, prefix_window=16)
        assert full.starts == windowed.starts and full.tokens == windowed.tokens
        assert len(full.starts) > len(ids) // 2  # boundaries inside tokens: many contexts


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_forward_equals_separate_forwards(attn, bpe_tok):
    vocab = TokenBytes.from_tokenizer(bpe_tok, vocab_size=len(bpe_tok) + 1)
    bos = vocab.vocab_size - 1
    model = tiny_llama(vocab.vocab_size, seed=6, attn=attn)
    ids, _ = vocab.encode("To be, or not to be, that is the question: whether 'tis nobler")
    ctx = exact_contexts(ids, vocab, prefix_window=None)
    assert len(ctx.parent) > 10
    P = len(ids) + 1
    sep = separate_logprobs(model, [[bos, *tau] for tau in ctx.tokens])
    for max_tokens in (4096, 8):  # one forward; and one branch per forward
        tree = tree_logprobs(model, [bos] + ids, ctx.parent, ctx.node_token, max_tokens=max_tokens)
        assert tree.shape == (len(ctx.parent), vocab.vocab_size)
        got = tree[torch.as_tensor(ctx.node_of)]
        # sdpa computes in float64 throughout; Llama's eager attention takes its softmax in
        # float32 even for a float64 model, so there "equal" is up to float32 rounding.
        assert (got - sep).abs().max() < (1e-10 if attn == "sdpa" else 1e-5)
    # and in float32, up to float32 rounding
    model32 = model.float()
    sep32 = separate_logprobs(model32, [[bos, *tau] for tau in ctx.tokens])
    got32 = tree_logprobs(model32, [bos] + ids, ctx.parent, ctx.node_token)[torch.as_tensor(ctx.node_of)]
    assert (got32 - sep32).abs().max() < 1e-4
    assert P == len(ids) + 1


def test_batch_and_errors():
    vocab = table_vocab(SMALL)
    model = tiny_llama(vocab.vocab_size, seed=7)
    bos = eos = vocab.vocab_size - 1
    texts = ["the there", "these"]
    ids = [vocab.encode(t)[0] for t in texts]
    l_max = max(len(x) for x in ids)
    lp = torch.full((2, l_max + 1, vocab.vocab_size), -math.inf, dtype=torch.float64)
    for b, seq in enumerate(ids):
        lp[b, : len(seq) + 1] = teacher_logprobs(model, seq, bos)
    out, mask = byte_logprobs_batch(lp, ids, vocab, eos_id=eos, mode="exact", teacher=model, bos_id=bos)
    for b, seq in enumerate(ids):
        single = byte_logprobs(lp[b, : len(seq) + 1], seq, vocab, eos_id=eos, mode="exact",
                               teacher=model, bos_id=bos)
        assert torch.equal(out[b, : single.shape[0]], single)
    with pytest.raises(ValueError, match="teacher"):
        byte_logprobs(lp[0, : len(ids[0]) + 1], ids[0], vocab, mode="exact")
    with pytest.raises(TypeError, match="only mode 'exact'"):
        byte_logprobs(lp[0, : len(ids[0]) + 1], ids[0], vocab, mode="cover", teacher=model)


def test_one_forward_without_given_logprobs_gives_the_same_numbers():
    """logprobs=None: the canonical sequence rides in the tree forward; same numbers."""
    vocab = table_vocab(SMALL)
    model = tiny_llama(vocab.vocab_size, seed=8)
    bos = eos = vocab.vocab_size - 1
    for text in ["there they é😀 here", "x", ""]:
        ids, _ = vocab.encode(text)
        lp = teacher_logprobs(model, ids, bos)
        given = byte_logprobs_exact(lp, ids, vocab, teacher=model, eos_id=eos, bos_id=bos)
        alone = byte_logprobs_exact(None, ids, vocab, teacher=model, eos_id=eos, bos_id=bos, max_tokens=12)
        assert (given.double().exp() - alone.double().exp()).abs().max() < 1e-6


class CountingTeacher(torch.nn.Module):
    """The model, recording the query length of every forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.calls = inner, inner.config, []

    def forward(self, **kw):
        self.calls.append(kw["input_ids"].shape[1])
        return self.inner(**kw)


@pytest.mark.parametrize("max_tokens", [1 << 30, 64, 8])
def test_chunked_tree_forwards_stay_bounded_and_give_the_same_numbers(max_tokens, bpe_tok):
    """Every forward holds whole branches within `max_tokens` (a lone branch may exceed it), every
    node is in one forward, and the targets do not depend on the chunking."""
    from bld_scale.convert.tree_forward import plan_tree

    vocab = TokenBytes.from_tokenizer(bpe_tok, vocab_size=len(bpe_tok) + 1)
    bos = eos = vocab.vocab_size - 1
    model = tiny_llama(vocab.vocab_size, seed=9)
    ids, _ = vocab.encode("Thou art more lovely and more temperate: rough winds do shake the buds")
    ctx = exact_contexts(ids, vocab)
    P = len(ids) + 1
    teacher = CountingTeacher(model)
    got = byte_logprobs_exact(None, ids, vocab, teacher=teacher, eos_id=eos, bos_id=bos, max_tokens=max_tokens)
    plan = plan_tree(P, ctx.parent, max_tokens=max_tokens, with_prefix=True)
    assert teacher.calls == [span + len(nodes) for span, nodes in zip(plan.spans, plan.chunks)]
    assert plan.spans[0] == P  # the first forward carries the canonical tokens
    assert sorted(np.concatenate(plan.chunks).tolist()) == list(range(len(ctx.parent)))
    for number, (span, nodes) in enumerate(zip(plan.spans, plan.chunks)):
        roots = np.unique(plan.root[nodes])
        assert span + len(nodes) <= max_tokens or len(roots) == 1
        # whole branches: every node of these roots is here
        assert set(nodes.tolist()) == set(np.flatnonzero(np.isin(plan.root, roots)).tolist())
    if max_tokens == 8:
        assert len(teacher.calls) > 10
    reference = byte_logprobs_exact(teacher_logprobs(model, ids, bos), ids, vocab, teacher=model, eos_id=eos,
                                    bos_id=bos)
    assert (got.double().exp() - reference.double().exp()).abs().max() < 1e-9


def test_sharded_teachers_get_the_same_number_of_forwards():
    """`agree_forwards` pads this rank's tree forwards up to the count the ranks agree on."""
    from bld_scale.convert.exact import exact_byte_targets
    from bld_scale.data.batch import PairTokenizer, collate

    vocab = table_vocab(SMALL)
    bos = eos = vocab.vocab_size - 1
    model = tiny_llama(vocab.vocab_size, seed=10)
    pair = PairTokenizer(vocab, vocab)
    batch = collate([pair(t) for t in ["there they", "these here the"]], 2, bos, bos)
    alone = CountingTeacher(model)
    q, mask = exact_byte_targets(alone, batch, vocab, eos, max_tokens=8)
    own = len(alone.calls)
    assert own > len(batch.teacher_ids)  # the cap splits these trees
    padded = CountingTeacher(model)
    agreed = []
    q2, mask2 = exact_byte_targets(padded, batch, vocab, eos, max_tokens=8,
                                   agree_forwards=lambda n: agreed.append(n) or n + 3)
    assert agreed == [own] and len(padded.calls) == own + 3 and padded.calls[own:] == [1, 1, 1]
    assert torch.equal(q, q2) and torch.equal(mask, mask2)


def test_vanishing_masses_take_the_direct_sums_and_still_match_brute_force(monkeypatch):
    """A teacher far too sure of other tokens: the text's masses fall below what running-sum
    differences resolve, so the conversion re-sums them directly (per tree forward and for the
    canonical rows) and must still match the brute force."""
    import bld_scale.convert.exact as bx

    taken = []
    real = bx.refine_small_masses

    def spy(*args):
        taken.append(real(*args))
        return taken[-1]

    monkeypatch.setattr(bx, "refine_small_masses", spy)
    vocab = table_vocab(SMALL)
    bos = eos = vocab.vocab_size - 1
    model = tiny_llama(vocab.vocab_size, seed=11, init=1.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # logits spread over tens of nats: the text gets vanishing masses
    ids, lp, got = run_exact(model, vocab, "there these", bos, eos, prefix_window=None, max_tokens=6)
    ref = brute_force_exact(model, vocab, ids, bos, eos, vocab._encode_ids, 0)
    assert any(taken)
    assert np.abs(got.double().exp().numpy() - ref).max() <= 1e-5


@pytest.mark.parametrize("name,text", [("mistral_sp", "the theme"), ("tekken", "There's")])
def test_real_vocabularies_match_brute_force(case_of, name, text):
    """Full-size real vocabularies (Mistral's 32k SentencePiece with its dummy prefix, Tekken's
    131k tiktoken BPE) on short strings, against the enumeration."""
    vocab = case_of(name).tb
    special = next(i for i in range(vocab.vocab_size) if vocab.token_bytes(i) is None)
    model = tiny_llama(vocab.vocab_size, seed=12)
    ids, lp, got = run_exact(model, vocab, text, special, special, prefix_window=16)
    shift = exact_contexts(ids, vocab).shift
    ref = brute_force_exact(model, vocab, ids, special, special, vocab._encode_ids, shift)
    assert np.abs(got.double().exp().numpy() - ref).max() <= 1e-5
    cover = byte_logprobs(lp, ids, vocab, eos_id=special).double().exp().numpy()
    assert np.abs(cover - ref).max() > 1e-4  # the strings have boundaries inside tokens
