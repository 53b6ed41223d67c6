"""The extra contexts of mode "exact" (case (b) of the rule in `bld_scale.convert.exact`) and the
tree of teacher forwards that runs them.

For each character boundary `e` inside a canonical token, the context is `enc(x[0..e))`, the
tokenizer's own encoding of the prefix (when its bytes are exactly `x[0..e)`). Contexts share their
longest common token prefix with the canonical tokens and hang off it as a tree (`parent`,
`node_token`), which `bld_scale.convert.tree_forward` runs; `tree_forwards` counts its forwards
before any is made (a sharded teacher's ranks agree on that count first).

`prefix_window` (tokens, default 16): `enc(x[0..e))` is computed as `t_<j + enc(x[s_j..e))` with
`j` that many canonical tokens before `e` (all contexts in one batch call to the tokenizer).
That equals the full encoding whenever the tokenizer's split at `s_j` is stable (a pre-token
boundary, far enough back for BPE merges), so a window starts at a token that begins with a
space where one is near (a word boundary in every family here); under a SentencePiece dummy
prefix it must, and is encoded without that space (the dummy prefix gives it back). A window whose encoding does not repeat the
canonical tokens over its first half is not stable (Tekken's pre-tokenizer joins "'I" alone but
not after "--"), and that context is encoded whole; the tests check windowed == whole on
held-out text for byte-level BPE, Llama-3-style BPE, Tekken, Gemma and Mistral SentencePiece.
`None` encodes the whole prefix every time (quadratic in the text length).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from bld_scale.convert.byte_rows import token_layout
from bld_scale.convert.tree_forward import plan_tree
from bld_scale.tokenize.token_bytes import TokenBytes


@dataclass
class ExactContexts:
    """The (b) contexts of one text and the tree that runs them."""

    shift: int  # rows before the text's byte 0 (SentencePiece dummy prefix)
    starts: list = field(default_factory=list)  # e of each extra context
    tokens: list = field(default_factory=list)  # its full token tuple tau
    anchor: list = field(default_factory=list)  # longest common prefix with the canonical ids
    node_of: list = field(default_factory=list)  # tree node holding its last token
    parent: list = field(default_factory=list)  # tree: prefix position, or P + node
    node_token: list = field(default_factory=list)


def _detect_shift(ids, data: bytes, vocab: TokenBytes) -> int:
    for shift in (0, 1):
        if shift and data[:1] != b" ":
            break
        try:
            text = data[shift:].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if [int(i) for i in vocab._encode_ids(text)] == [int(i) for i in ids]:
            return shift
    raise ValueError(f"{vocab.name}: mode 'exact' needs the text's canonical tokens (from "
                     "TokenBytes.encode(text)); these ids are not what the tokenizer produces for "
                     "their own bytes")


def _encode_many(vocab: TokenBytes, pieces: list) -> list:
    """(ids, their bytes) of each byte string, in one batch call to the tokenizer."""
    table = vocab.all_token_bytes()
    out = []
    for ids in vocab.encode_ids_batch([piece.decode("utf-8") for piece in pieces]):
        try:  # a row without bytes (or outside the model) can never match the text
            got = b"".join([table[i] or b"\0\0" for i in ids])
        except IndexError:
            got = None
        out.append((ids, got))
    return out


def prefix_encodings(vocab: TokenBytes, ids: Sequence[int], data: bytes, starts: np.ndarray, shift: int,
                     prefix_window: int | None) -> dict:
    """For each split `e` where x[0..e) is a text of the tokenizer (case (b)): (enc(x[0..e)) as
    token ids, a length it surely shares with `ids`). Two batch calls to the tokenizer at most."""
    # not inside a character, not before the text (the empty text has no tokens and, with a dummy
    # prefix, no byte-exact encoding)
    splits = [e for e in range(max(1, shift + 1), len(data)) if (data[e] & 0xC0) != 0x80]
    found: dict = {}
    full = splits
    if prefix_window is not None:
        windows, agree = [], []
        for e in splits:
            k = int(np.searchsorted(starts, e, side="right")) - 1  # token holding (or starting at) e
            j = max(0, k - int(prefix_window))
            # Start at a token that begins with a space (a word boundary for every family here;
            # under a dummy prefix the space it gives back), looking at most prefix_window tokens
            # further back; else, without a dummy prefix, where we were, at a character.
            w = j
            while w > 0 and data[starts[w]] != 0x20 and w > j - int(prefix_window):
                w -= 1
            if w == 0 or data[starts[w]] == 0x20:
                j = w
            elif shift:
                j = 0
            while j > 0 and (data[starts[j]] & 0xC0) == 0x80:
                j -= 1
            windows.append(j)
            agree.append(0 if j == 0 else max(1, (k - j) // 2))
        encoded = _encode_many(vocab, [data[starts[j] + shift:e] for e, j in zip(splits, windows)])
        full = []
        for e, j, h, (local, got) in zip(splits, windows, agree, encoded):
            # The window must start where the text's own tokenization does: far from e the
            # prefix's encoding is the text's, so the window's first half must repeat the
            # canonical tokens (a pre-tokenizer can tie the window's first token to the bytes
            # before it, e.g. Tekken splits "--'I" as "'", "I" but "'I" alone as one token).
            if got == data[starts[j]:e] and list(local[:h]) == list(ids[j:j + h]):
                found[e] = (list(ids[:j]) + local, j)
            else:  # ask the tokenizer about the whole prefix
                full.append(e)
    for e, (tau, got) in zip(full, _encode_many(vocab, [data[shift:e] for e in full])):
        if got == data[:e]:
            found[e] = (tau, 0)
    return found


def exact_contexts(ids: Sequence[int], vocab: TokenBytes, *, prefix_window: int | None = 16) -> ExactContexts:
    """Every (b) context of the rule that is not a canonical prefix, and the tree that runs them."""
    ids = [int(i) for i in ids]
    data, starts = token_layout(ids, vocab)
    shift = _detect_shift(ids, data, vocab)
    ctx = ExactContexts(shift=shift)
    boundary = {int(s): k for k, s in enumerate(starts)}
    P = len(ids) + 1
    trie: dict[tuple, int] = {}
    encodings = prefix_encodings(vocab, ids, data, starts, shift, prefix_window)
    for e in sorted(encodings):
        tau, a = encodings[e]
        k = boundary.get(e)
        if k is not None and len(tau) == k and tau[a:] == ids[a:k]:
            continue  # the canonical prefix: already a `cover` context
        limit = min(len(tau), len(ids))
        while a < limit and tau[a] == ids[a]:
            a += 1
        parent = a  # prefix position of [BOS] t_1..t_a
        for tok in tau[a:]:
            key = (parent, tok)
            node = trie.get(key)
            if node is None:
                node = len(ctx.parent)
                trie[key] = node
                ctx.parent.append(parent)
                ctx.node_token.append(tok)
            parent = P + node
        ctx.starts.append(e)
        ctx.tokens.append(tuple(tau))
        ctx.anchor.append(a)
        ctx.node_of.append(parent - P)
    return ctx


def tree_forwards(ctx: ExactContexts, n_ids: int, *, max_tokens: int = 4096, with_prefix: bool = True) -> int:
    """How many teacher forwards `byte_logprobs_exact` makes for these contexts (`with_prefix`:
    logprobs=None, the canonical tokens ride in the first one)."""
    if not ctx.parent and not with_prefix:
        return 0
    return plan_tree(n_ids + 1, ctx.parent, max_tokens=max_tokens, with_prefix=with_prefix).forwards
