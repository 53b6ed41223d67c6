"""SortedVocabIndex: perm sorts by bytes, range(u) is the brute-force contiguous range, walk() is
the brute-force walk, child() lookups; on hand-made, random and real vocabularies."""
from __future__ import annotations

import random
from bisect import bisect_left, bisect_right
from itertools import compress
from operator import methodcaller

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bld_scale.tokenize.token_bytes import TokenBytes
from bld_scale.tokenize.vocab_index import SortedVocabIndex


# ---------------------------------------------------------------------- brute force
def brute_range(sorted_bytes, u: bytes):
    hits = list(compress(range(len(sorted_bytes)), map(methodcaller("startswith", u), sorted_bytes)))
    if not hits:
        return None
    assert hits == list(range(hits[0], hits[-1] + 1)), "prefix set is not contiguous"
    return hits[0], hits[-1] + 1


def check_range(ix, u: bytes, sorted_bytes=None):
    sorted_bytes = ix.sorted_bytes if sorted_bytes is None else sorted_bytes
    expected = brute_range(sorted_bytes, u)
    lo, hi = ix.range(u)
    if u == b"":
        assert (lo, hi) == (0, len(sorted_bytes)) and ix.node_of(u) == 0
    elif expected is None:
        assert lo == hi and ix.node_of(u) == -1, u
    else:
        assert (lo, hi) == expected, u
        node = ix.node_of(u)
        assert ix.node_depth[node] == len(u)
        if u:
            assert ix.node_byte[node] == u[-1]


def all_prefixes(token_bytes):
    out = {b""}
    for b in token_bytes:
        if b:
            out.update(b[:k] for k in range(1, len(b) + 1))
    return out


def brute_walk(token_bytes, data: bytes, starts, max_end=None):
    prefixes = all_prefixes(token_bytes)
    limit = len(data) if max_end is None else min(max_end, len(data))
    out = set()
    for k, s in enumerate(starts):
        end = s
        while data[s:end] in prefixes and end <= max(limit, s):
            out.add((k, end))
            if end >= limit:
                break
            end += 1
    return out


def check_walk(ix, token_bytes, data, starts, max_end=None):
    k, end, node = ix.walk(data, starts, max_end=max_end)
    got = list(zip(k.tolist(), end.tolist()))
    assert len(got) == len(set(got)), "walk reported a (start, end) twice"
    assert set(got) == brute_walk(token_bytes, data, starts, max_end)
    for kk, e, n in zip(k.tolist(), end.tolist(), node.tolist()):
        u = data[starts[kk]:e]
        assert n == ix.node_of(u)
        assert (int(ix.node_lo[n]), int(ix.node_hi[n])) == ix.range(u)


def check_structure(ix, token_bytes):
    """perm sorts the byte-bearing ids; every node's range is exactly its prefix's block; the
    nodes are exactly the distinct prefixes; children tile their parent and child() finds them."""
    ids = [i for i, b in enumerate(token_bytes) if b]
    assert sorted(ix.perm.tolist()) == ids
    sb = [token_bytes[i] for i in ix.perm.tolist()]
    assert sb == ix.sorted_bytes
    assert all(sb[j] <= sb[j + 1] for j in range(len(sb) - 1))
    assert ix.vocab_size == len(token_bytes)
    prefixes = all_prefixes(token_bytes)
    n_nodes, size = ix.num_nodes, len(sb)
    assert n_nodes == len(prefixes)
    lo_l, hi_l, d_l = ix.node_lo.tolist(), ix.node_hi.tolist(), ix.node_depth.tolist()
    byte_l, exact_l = ix.node_byte.tolist(), ix.node_exact.tolist()
    assert (lo_l[0], hi_l[0], d_l[0], byte_l[0], exact_l[0]) == (0, size, 0, -1, -1)
    seen = set()
    for n in range(1, n_nodes):
        lo, hi, d = lo_l[n], hi_l[n], d_l[n]
        assert 0 <= lo < hi <= size
        u = sb[lo][:d]
        assert len(u) == d and byte_l[n] == u[-1]
        assert sb[hi - 1][:d] == u  # sorted, so the ends decide contiguity
        assert lo == 0 or sb[lo - 1][:d] != u
        assert hi == size or sb[hi][:d] != u
        assert (exact_l[n] == lo) == (len(sb[lo]) == d)
        seen.add(u)
    assert seen == prefixes - {b""}
    # Children: consecutive ids in parent order, ascending bytes, tiling the parent's range after
    # the tokens equal to the parent's prefix; child(parent, byte) finds each one.
    counts = ix.child_count
    parent = np.repeat(np.arange(n_nodes), counts)
    assert parent.size == n_nodes - 1
    with_children = np.flatnonzero(counts)
    assert (ix.child_start[with_children] == 1 + np.concatenate([[0], np.cumsum(counts)])[with_children]).all()
    kids = np.arange(1, n_nodes)
    if kids.size == 0:
        return
    assert (ix.node_depth[kids] == ix.node_depth[parent] + 1).all()
    assert (ix.child(parent, ix.node_byte[kids]) == kids).all()
    same = parent[1:] == parent[:-1]
    assert (ix.node_byte[kids][1:][same] > ix.node_byte[kids][:-1][same]).all()
    assert (ix.node_lo[kids][1:][same] == ix.node_hi[kids][:-1][same]).all()
    last = np.append(~same, True)
    assert (ix.node_hi[kids][last] == ix.node_hi[parent][last]).all()
    first = np.insert(~same, 0, True)
    lengths = np.array([len(b) for b in sb], dtype=np.int64)
    for p, c in zip(parent[first].tolist(), kids[first].tolist()):
        start, stop = lo_l[p], lo_l[c]
        assert (lengths[start:stop] == d_l[p]).all() and lengths[stop] > d_l[p]


# ---------------------------------------------------------------------- hand-made vocabulary
SMALL = [None, b"a", b"ab", b"abc", b"b", b"ba", b"", None, b"a", b"\xff", b"\x00", b"\x00\x00",
         b"abd", b" ", b" the", b" th", b" ", b"\xe2\x96\x81"]


def test_small_vocabulary():
    ix = SortedVocabIndex(SMALL)
    check_structure(ix, SMALL)
    assert ix.vocab_size == len(SMALL)
    # b"" and None have no bytes and are not sorted rows.
    assert 0 not in ix.perm and 6 not in ix.perm and 7 not in ix.perm
    # Duplicates (b"a" at ids 1 and 8, b" " at 13 and 16) are both in their ranges.
    lo, hi = ix.range(b"a")
    assert sorted(ix.perm[lo:hi].tolist()) == [1, 2, 3, 8, 12]
    lo, hi = ix.range(b" ")
    assert sorted(ix.perm[lo:hi].tolist()) == [13, 14, 15, 16]
    assert ix.range(b"") == (0, len(ix.perm))
    for u in [b"", b"a", b"ab", b"abc", b"abd", b"abe", b"b", b"ba", b"bab", b"c", b"\x00",
              b"\x00\x00", b"\x00\x00\x00", b"\xff", b"\xff\x00", b" t", b" the", b" thee", b"\xe2",
              b"\xe2\x96", b"\xe2\x96\x81", b"\xe2\x96\x82"]:
        check_range(ix, u)


def test_child_lookups():
    ix = SortedVocabIndex(SMALL)
    a = ix.node_of(b"a")
    ab = ix.node_of(b"ab")
    assert ix.child(0, ord("a")) == a and ix.child(a, ord("b")) == ab
    assert ix.child(a, ord("z")) == -1
    assert ix.child(-1, ord("a")) == -1
    # Out-of-range bytes (e.g. EOT = 256) are never children, not a neighbour's child.
    for node in range(ix.num_nodes):
        assert ix.child(node, 256) == -1 and ix.child(node, -1) == -1 and ix.child(node, 1000) == -1
    # Vectorised, with broadcasting.
    nodes = np.array([0, 0, a, a, -1, ab])
    bytes_ = np.array([ord("a"), ord("q"), ord("b"), 256, ord("a"), ord("c")])
    assert ix.child(nodes, bytes_).tolist() == [a, -1, ab, -1, -1, ix.node_of(b"abc")]
    assert ix.child(0, np.array([ord("a"), ord("b"), 0])).tolist() == [a, ix.node_of(b"b"), ix.node_of(b"\x00")]


def test_walk_small():
    ix = SortedVocabIndex(SMALL)
    data = b"xabcab the\x00\x00\x00\xffab"
    starts = list(range(len(data) + 1))
    check_walk(ix, SMALL, data, starts)
    check_walk(ix, SMALL, data, [1, 1, 4])  # repeated starts are reported per start index
    check_walk(ix, SMALL, data, [1, 6], max_end=4)
    check_walk(ix, SMALL, data, [1, 6], max_end=10**6)  # a cap past the end is the end
    k, end, node = ix.walk(data, [])
    assert k.size == end.size == node.size == 0
    k, end, node = ix.walk(b"", [0])
    assert k.tolist() == [0] and end.tolist() == [0] and node.tolist() == [0]


def test_empty_and_tiny_vocabularies():
    for vocab in ([], [None, None], [b""], [b"x"], [b"x", b"x"]):
        ix = SortedVocabIndex(vocab)
        check_structure(ix, vocab)
        check_range(ix, b"x")
        check_range(ix, b"")
        check_range(ix, b"xy")
        check_walk(ix, vocab, b"xxyx", [0, 1, 2, 3, 4])


def test_torch_tables():
    torch = pytest.importorskip("torch")
    ix = SortedVocabIndex(SMALL)
    tables = ix.torch_tables("cpu")
    assert tables is ix.torch_tables("cpu")
    for name, tensor in tables.items():
        assert torch.equal(tensor, torch.as_tensor(getattr(ix, name)))


# ---------------------------------------------------------------------- random vocabularies
BYTE_STRINGS = st.binary(min_size=0, max_size=6).map(lambda b: bytes(x % 4 + 97 if x < 200 else x
                                                                       for x in b))
VOCABS = st.lists(st.one_of(st.none(), BYTE_STRINGS), max_size=60)


@settings(max_examples=120, deadline=None)
@given(vocab=VOCABS, probes=st.lists(BYTE_STRINGS, max_size=10))
def test_property_random_vocabulary(vocab, probes):
    ix = SortedVocabIndex(vocab)
    check_structure(ix, vocab)
    for u in [*probes, *(b[:k] for b in vocab if b for k in range(len(b) + 1))]:
        check_range(ix, u)


@settings(max_examples=80, deadline=None)
@given(vocab=VOCABS, data=BYTE_STRINGS.flatmap(lambda a: BYTE_STRINGS.map(lambda b: a + b * 3)),
       cap=st.one_of(st.none(), st.integers(0, 25)), seed=st.integers(0, 1000))
def test_property_walk(vocab, data, cap, seed):
    ix = SortedVocabIndex(vocab)
    rng = random.Random(seed)
    starts = sorted(rng.sample(range(len(data) + 1), k=rng.randint(0, len(data) + 1)))
    check_walk(ix, vocab, data, starts, max_end=cap)


# ---------------------------------------------------------------------- real vocabularies
REAL = {"tekken": "tekken_tok", "mistral_sp": "mistral_sp_tok", "bpe": "bpe_tok", "sp": "sp_tok"}


@pytest.fixture(scope="module")
def real_index(request):
    cache = {}

    def get(name):
        if name not in cache:
            tb = TokenBytes.from_tokenizer(request.getfixturevalue(REAL[name]))
            cache[name] = (tb, tb.index)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(REAL))
def test_real_structure(real_index, name):
    tb, ix = real_index(name)
    check_structure(ix, tb.all_token_bytes())


def test_real_vocabularies_with_duplicate_bytes(real_index):
    """Mistral's SentencePiece has 125 byte strings held by two pieces (<0x41> and 'A'); both must
    sit in every range that covers them. (Regression: duplicates used to split a prefix block.)"""
    tb, ix = real_index("mistral_sp")
    table = tb.all_token_bytes()
    assert len([b for b in table if b]) - len({b for b in table if b}) == 125
    lo, hi = ix.range(b" ")
    assert hi - lo == sum(1 for b in table if b and b.startswith(b" "))
    assert {tb.token_bytes(int(i)) for i in ix.perm[lo:hi]} == {b for b in table if b and b.startswith(b" ")}
    for u in [b"A", b" t", b" the", b"a", b"\n"]:
        check_range(ix, u)


@pytest.mark.parametrize("name", list(REAL))
def test_real_prefixes(real_index, heldout_text, name):
    tb, ix = real_index(name)
    rng = random.Random(1234)
    table = [b for b in tb.all_token_bytes() if b]
    sb = ix.sorted_bytes
    n_probes = 12 if name == "tekken" else 60
    probes = {b"", b" ", b" t", b" the", b"\n", b"\xe2\x96\x81", b"\xf0\x9f", b"zzzzzzzz", b"\x00\x01"}
    for _ in range(n_probes):
        b = rng.choice(table)
        probes.add(b[: rng.randint(0, len(b))])
    data = heldout_text[:4000].encode()
    for _ in range(n_probes // 2):
        s = rng.randrange(len(data))
        probes.add(data[s:s + rng.randint(1, 8)])
    for u in sorted(probes):
        check_range(ix, u, sb)
    # A fast independent check on many more prefixes: truncating sorted strings keeps them
    # sorted, so the block of u is a binary search on the first len(u) bytes.
    for _ in range(2000):
        b = rng.choice(table)
        u = b[: rng.randint(1, len(b))]
        lo = bisect_left(sb, u, key=lambda x: x[:len(u)])
        hi = bisect_right(sb, u, key=lambda x: x[:len(u)])
        assert hi > lo and ix.range(u) == (lo, hi)


@pytest.mark.parametrize("name", list(REAL))
def test_real_walk(real_index, heldout_text, name):
    tb, ix = real_index(name)
    text = heldout_text[10_000:10_400] + " 日本語 😀\r\n\t  x"
    data = text.encode()
    check_walk(ix, tb.all_token_bytes(), data, list(range(len(data) + 1)))
    check_walk(ix, tb.all_token_bytes(), data, [0, 5, 17, 200], max_end=40)
    # The walk reaches exactly the canonical tokens: each token's bytes are a node from its start.
    ids, spans = tb.encode(text)
    k, end, node = ix.walk(data, [a for a, _ in spans])
    reached = set(zip(k.tolist(), end.tolist()))
    for j, (i, (a, b)) in enumerate(zip(ids, spans)):
        piece = tb.token_bytes(i)
        if b - a == len(piece):
            assert (j, b) in reached
            n = node[(k == j) & (end == b)][0]
            assert i in ix.perm[ix.node_lo[n]:ix.node_hi[n]].tolist()
