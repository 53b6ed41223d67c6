r"""Exact next-byte distributions (mode "exact"): every valid cover, one extra tree-masked pass.

The rule (what "exact" sums; see docs/byte-interface.md for `cover`)
---------------------------------------------------------------------
Write `x = x[0..N)` for the token bytes of the text (`b"".join(token_bytes(t_k))`, the rows of
`byte_logprobs`), `enc` for the teacher tokenizer's own canonical encoding of a text
(`TokenBytes`' encoder: the tokenizer itself, pre-tokenizer, merges and dummy prefix included).

A *cover* of a byte string `y = x[0..n)` split at `e < n` is a token sequence `tau + [v]` with
`bytes(tau) = x[0..e)` (the complete part) and `bytes(v)` starting with `x[e..n)` (the last token,
which may run past `n`). A cover is *valid* when its complete part `tau` is a tokenization the
tokenizer produces:

    (a) tau = t_<k, a prefix of the canonical tokenization of the text, with s_k = e; or
    (b) tau = enc(x[0..e)), the canonical tokenization of the prefix itself, when x[0..e) is a
        text the tokenizer can take: it is valid UTF-8 (e is not inside a character) and, for a
        SentencePiece dummy prefix, holds the text's first byte (the encoder's bytes must equal
        x[0..e) exactly; otherwise there is no (b) context at e).

Every other complete part is excluded: it is a token sequence that the tokenizer never produces
for these bytes (for BPE, WordPiece-free SentencePiece and tiktoken alike: "encode(decode(tau))
!= tau"). The last token `v` is not filtered: every token whose bytes start with `x[e..n)` counts,
as in `cover`, with the teacher's own probability `p(v | tau)` (a trained teacher gives a
non-canonical continuation little mass; filtering it would need a tokenizer call per vocabulary
entry and is not defined for byte strings that end inside a character; the bigram test that
replaces those calls for plain BPE is wrong under a pre-tokenizer that looks ahead: GPT-2's
`\s+(?!\S)` splits "\n\n" before a word but not on its own, so the test rejects the very tokens
the tokenizer produces; `tools/bench_exact.py --bigram` measures it). So with `C_e` the (one or
two) valid complete parts at `e`:

    q_n(b)   ∝  sum_{e <= n} sum_{tau in C_e}  P(tau) · M_tau(x[e..n) + b)
    q_n(EOT) ∝  sum_{tau in C_n} P(tau) · p(EOS | tau)

normalised over the 257 outcomes; `q_N` is all EOT. Mode `cover` is the same sum with case (a)
only, so `exact` adds exactly the contexts of case (b) that are not canonical prefixes: a token
boundary inside a canonical token (or a different tokenization of a canonical prefix, where the
tokenizer's encoding is not prefix-closed). For a byte-level tokenizer (the 256 single bytes) every
(b) context is a canonical prefix and `exact` equals `cover`. This is the rule of Phan et al. 2024
(valid covers only; for BPE a valid encoding's prefixes are valid, so its complete part is
`enc(x[0..e))`) and of Hayase et al. 2025's valid covering tree, with their last-token pruning
left to the teacher. It applies to every family `TokenBytes` supports (byte-level BPE such as
GPT-2 / Llama-3 / Qwen2, SentencePiece with or without dummy prefix, tiktoken, or any encoder
given to `TokenBytes`), because it only calls the encoder.

Cost
----
The (b) contexts are `enc(x[0..e))` for the character boundaries `e` inside canonical tokens:
about (bytes per token - 1) contexts per token. Each shares its longest common token prefix with
the canonical tokenization and adds a few tokens; all of them form a tree hanging off the
canonical sequence, run in one forward with a tree attention mask (`bld_scale.tree_forward`,
chunked to `max_tokens` query positions). The sums over next tokens reuse the sorted-vocabulary
ranges and the log-space mixing of `cover`.

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

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from bld_scale.convert.one_pass import (EOT, NUM_BYTE_OUTCOMES, _logaddexp_scatter, _refine_small_masses,
                       _start_rows, _token_layout, split_edges)
from bld_scale.convert.tree_forward import iter_tree_logprobs, plan_tree
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
    data, starts = _token_layout(ids, vocab)
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


def _context_edges(rows: torch.Tensor, ctx_start: np.ndarray, log_weight: torch.Tensor, data: bytes,
                   vocab: TokenBytes, memory_bytes: int):
    """Edges (context, target byte cell, log value) of every split of every context, as in cover."""
    index = vocab.index
    c, end, node = index.walk(data, ctx_start)
    keep = end < len(data)
    c, end, node = c[keep], end[keep], node[keep]
    return split_edges(rows, c, end, node, log_weight, index, memory_bytes)


def _default_bos(teacher, eos_id):
    config = getattr(teacher, "config", None)
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    if eos_id is not None:
        return int(eos_id)
    raise ValueError("mode 'exact' runs the teacher on [BOS] + tokens: pass bos_id=")


@torch.no_grad()
def byte_logprobs_exact(logprobs: torch.Tensor, ids: Sequence[int], vocab: TokenBytes, *, teacher=None,
                        eos_id: int | None = None, bos_id: int | None = None,
                        prefix_window: int | None = 16, max_tokens: int = 4096,
                        contexts: ExactContexts | None = None, info: dict | None = None) -> torch.Tensor:
    """Exact next-byte log-probabilities `[N + 1, 257]` (see the module docstring for the rule).

    logprobs: the teacher's one-pass `[L + 1, V]` log-probabilities over `[BOS] + ids` (as for
      `cover`), or None: the tree's first forward then carries the canonical sequence too and its
      rows are used; teacher: the same model (Hugging Face causal LM or a callable, see
      `tree_forward.iter_tree_logprobs`); bos_id: the first input token (defaults to the model
      config's BOS, then EOS); max_tokens: query positions per tree forward. The tree's rows are
      consumed one forward at a time, so memory is the one-pass rows plus one forward's
      `[max_tokens, V]`. `contexts`: `exact_contexts(ids, vocab, prefix_window=...)` when the caller
      already has them (to count the forwards first). `info`, when a dict, receives counts
      (contexts, tree nodes, forwards).
    """
    if teacher is None:
        raise ValueError("mode 'exact' needs the teacher model: byte_logprobs(..., mode='exact', teacher=model)")
    ids = [int(i) for i in ids]
    bos = _default_bos(teacher, eos_id) if bos_id is None else int(bos_id)
    ctx = exact_contexts(ids, vocab, prefix_window=prefix_window) if contexts is None else contexts
    M = len(ctx.parent)
    chunks = iter(())
    if M or logprobs is None:
        chunks = iter_tree_logprobs(teacher, [bos] + ids, ctx.parent, ctx.node_token, max_tokens=max_tokens,
                                    with_prefix=logprobs is None)
    first = None
    if logprobs is None:
        first = next(chunks)
        logprobs = first.prefix
    device = logprobs.device
    data, starts, out, log_prefix = _start_rows(logprobs, ids, vocab)
    if info is not None:
        info.update(contexts=len(ctx.starts), tree_nodes=M, tokens=len(ids), bytes=len(data),
                    forwards=(1 if first is not None else 0))
    if len(data) == 0:
        return out.float()
    memory = logprobs.numel() * logprobs.element_size()  # the running sums' budget, as in `cover`
    perm = vocab.index.torch_tables(device)["perm"]

    # The canonical contexts (`cover`): EOT where each canonical prefix ends, then every split.
    if eos_id is not None:
        out[torch.as_tensor(starts, device=device), EOT] = log_prefix[: len(ids)] + logprobs[: len(ids), int(eos_id)].double()
    eot_only = out.clone()
    canon_edges = _context_edges(logprobs[: len(ids)], starts, log_prefix, data, vocab, memory)
    _logaddexp_scatter(out.view(-1), canon_edges["target"], canon_edges["value"])

    # The (b) contexts, one tree forward at a time, into their own accumulator.
    extra = torch.full_like(out, -math.inf)
    node_lp = torch.empty(M, dtype=torch.float64, device=device)  # log P(tau) up to each node
    contexts_of = _contexts_by_node(ctx, M)
    parent = np.asarray(ctx.parent, dtype=np.int64)
    node_token = np.asarray(ctx.node_token, dtype=np.int64)
    node_of = np.asarray(ctx.node_of, dtype=np.int64)
    context_start = np.asarray(ctx.starts, dtype=np.int64)
    P = len(ids) + 1
    for chunk in itertools.chain([first] if first is not None and M else [], chunks):
        if info is not None:
            info["forwards"] += chunk is not first
        rows = chunk.logprobs.to(device)
        _node_weights(node_lp, chunk.nodes, rows, parent, node_token, P, logprobs, log_prefix)
        cs = np.concatenate([contexts_of[j] for j in chunk.nodes]) if chunk.nodes.size else np.zeros(0, np.int64)
        if cs.size == 0:
            continue
        local = np.searchsorted(chunk.nodes, node_of[cs])
        c_rows = rows.index_select(0, torch.as_tensor(local, device=device))
        c_w = node_lp[torch.as_tensor(node_of[cs], device=device)]
        c_start = context_start[cs]
        if eos_id is not None:  # EOT where a valid complete tokenization ends
            _logaddexp_scatter(extra.view(-1), torch.as_tensor(c_start, device=device) * NUM_BYTE_OUTCOMES + EOT,
                               c_w + c_rows[:, int(eos_id)].double())
        edges = _context_edges(c_rows, c_start, c_w, data, vocab, memory)
        if edges["value"].numel():
            before = extra.clone()
            _logaddexp_scatter(extra.view(-1), edges["target"], edges["value"])
            # Row totals seen so far are at most the final ones, so this flags every edge the
            # final totals would flag (and perhaps a few more, summed directly all the same).
            if _refine_small_masses(torch.logaddexp(out, extra), edges, c_w, c_rows, perm):
                extra = before
                _logaddexp_scatter(extra.view(-1), edges["target"], edges["value"])
    total = torch.logaddexp(out, extra)
    if canon_edges["value"].numel() and _refine_small_masses(total, canon_edges, log_prefix, logprobs, perm):
        out = eot_only
        _logaddexp_scatter(out.view(-1), canon_edges["target"], canon_edges["value"])
        total = torch.logaddexp(out, extra)
    norm = torch.logsumexp(total, dim=1, keepdim=True)
    total = torch.where(torch.isfinite(norm), total - norm, total)
    return total.float()


def tree_forwards(ctx: ExactContexts, n_ids: int, *, max_tokens: int = 4096, with_prefix: bool = True) -> int:
    """How many teacher forwards `byte_logprobs_exact` makes for these contexts (`with_prefix`:
    logprobs=None, the canonical tokens ride in the first one)."""
    if not ctx.parent and not with_prefix:
        return 0
    return plan_tree(n_ids + 1, ctx.parent, max_tokens=max_tokens, with_prefix=with_prefix).forwards


def _contexts_by_node(ctx: ExactContexts, M: int) -> list:
    """For each tree node, the (b) contexts whose last token it holds."""
    by_node: list = [[] for _ in range(M)]
    for c, node in enumerate(ctx.node_of):
        by_node[node].append(c)
    return [np.asarray(c, dtype=np.int64) for c in by_node]


def _node_weights(node_lp, nodes, rows, parent, node_token, P, logprobs, log_prefix) -> None:
    """log P(path to node) for one forward's nodes (whole branches, ascending: parents first)."""
    device = node_lp.device
    tok = torch.as_tensor(node_token[nodes], device=device)
    is_root = parent[nodes] < P
    if is_root.any():
        r = torch.as_tensor(np.flatnonzero(is_root), device=device)
        at = torch.as_tensor(parent[nodes][is_root], device=device)
        node_lp[torch.as_tensor(nodes[is_root], device=device)] = log_prefix[at] + logprobs[at, tok[r]].double()
    up_local = np.arange(nodes.size)  # each node's parent, as a row of this forward (roots: itself)
    up_local[~is_root] = np.searchsorted(nodes, parent[nodes[~is_root]] - P)
    done = is_root.copy()
    while not done.all():  # one tree level at a time
        ready = np.flatnonzero(~done & done[up_local])
        ready_t = torch.as_tensor(ready, device=device)
        up = torch.as_tensor(parent[nodes[ready]] - P, device=device)
        node_lp[torch.as_tensor(nodes[ready], device=device)] = (
            node_lp[up] + rows[torch.as_tensor(up_local[ready], device=device), tok[ready_t]].double())
        done[ready] = True


@torch.no_grad()
def teacher_logprobs(teacher, ids: Sequence[int], bos_id: int) -> torch.Tensor:
    """The one-pass `[L + 1, V]` log-probabilities of `teacher` over `[BOS] + ids`."""
    try:
        device = next(teacher.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")
    x = torch.as_tensor([int(bos_id)] + [int(i) for i in ids], device=device)[None]
    out = teacher(input_ids=x)
    logits = getattr(out, "logits", out)[0]
    return torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
