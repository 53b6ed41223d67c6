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
canonical sequence, run in one forward with a tree attention mask (`bld_scale.convert.tree_forward`,
chunked to `max_tokens` query positions). The sums over next tokens reuse the sorted-vocabulary
ranges and the log-space mixing of `cover`.

Which contexts, and how their prefix encodings are found: `bld_scale.convert.exact_contexts`.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np
import torch

from bld_scale.convert.backends import TritonSplits, log_add_splits, resolve_backend
from bld_scale.convert.byte_rows import EOT, NUM_BYTE_OUTCOMES, check_logprobs, normalise_rows, pad_byte_rows, start_rows
from bld_scale.convert.exact_contexts import ExactContexts, exact_contexts, tree_forwards
from bld_scale.convert.running_sums import logaddexp_scatter, refine_small_masses, split_edges
from bld_scale.convert.tree_forward import iter_tree_logprobs
from bld_scale.tokenize.token_bytes import TokenBytes


# Query positions per tree forward of `exact_byte_targets` (the training step's batches); the recipe
# sets it with distill.exact_chunk_tokens.
BATCH_CHUNK_TOKENS = 16384


def _context_splits(ctx_start: np.ndarray, data: bytes, vocab: TokenBytes):
    """(context, end, trie node) of every split of every context, as in cover."""
    c, end, node = vocab.index.walk(data, ctx_start)
    keep = end < len(data)
    return c[keep], end[keep], node[keep]


def _context_edges(rows: torch.Tensor, ctx_start: np.ndarray, log_weight: torch.Tensor, data: bytes,
                   vocab: TokenBytes, memory_bytes: int):
    """Edges (context, target byte cell, log value) of every split of every context, as in cover."""
    return split_edges(rows, *_context_splits(ctx_start, data, vocab), log_weight, vocab.index, memory_bytes)


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
                        contexts: ExactContexts | None = None, info: dict | None = None,
                        backend: str = "torch") -> torch.Tensor:
    """Exact next-byte log-probabilities `[N + 1, 257]` (see the module docstring for the rule).

    logprobs: the teacher's one-pass `[L + 1, V]` log-probabilities over `[BOS] + ids` (as for
      `cover`), or None: the tree's first forward then carries the canonical sequence too and its
      rows are used; teacher: the same model (Hugging Face causal LM or a callable, see
      `tree_forward.iter_tree_logprobs`); bos_id: the first input token (defaults to the model
      config's BOS, then EOS); max_tokens: query positions per tree forward. The tree's rows are
      consumed one forward at a time, so memory is the one-pass rows plus one forward's
      `[max_tokens, V]`. `contexts`: `exact_contexts(ids, vocab, prefix_window=...)` when the caller
      already has them (to count the forwards first). `info`, when a dict, receives counts
      (contexts, tree nodes, forwards). backend: "torch", "triton" or "auto": what computes the
      running sums and log-adds the edges, of the canonical rows and of the tree's
      (`bld_scale.convert.backends`; same numbers to float64 rounding).
    """
    if logprobs is not None:
        check_logprobs(logprobs, ids, vocab, eos_id)
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
    triton = resolve_backend(backend, device) == "triton"
    data, starts, out, log_prefix = start_rows(logprobs, ids, vocab)
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
    if triton:  # the kernels; their small masses are refined at the end, as the torch path's
        canon = TritonSplits(logprobs[: len(ids)], *_context_splits(starts, data, vocab), log_prefix, vocab.index,
                             memory)
        canon.add_to(out)
    else:
        canon_edges = _context_edges(logprobs[: len(ids)], starts, log_prefix, data, vocab, memory)
        logaddexp_scatter(out.view(-1), canon_edges["target"], canon_edges["value"])

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
            logaddexp_scatter(extra.view(-1), torch.as_tensor(c_start, device=device) * NUM_BYTE_OUTCOMES + EOT,
                              c_w + c_rows[:, int(eos_id)].double())
        extra = log_add_splits(extra, c_rows, *_context_splits(c_start, data, vocab), c_w, vocab.index, memory,
                               backend=backend, totals_with=out)
    total = torch.logaddexp(out, extra)
    if triton:
        return normalise_rows(_refine_canonical_rows(canon, out, eot_only, extra, total, log_prefix, logprobs, perm))
    if canon_edges["value"].numel() and refine_small_masses(total, canon_edges, log_prefix, logprobs, perm):
        out = eot_only
        logaddexp_scatter(out.view(-1), canon_edges["target"], canon_edges["value"])
        total = torch.logaddexp(out, extra)
    return normalise_rows(total)


def _refine_canonical_rows(canon: TritonSplits, out, eot_only, extra, total, log_prefix, logprobs, perm):
    """`total` with the canonical rows whose small masses the final totals flag redone by the torch
    code (what the torch path's `refine_small_masses` over every canonical edge changes)."""
    flagged = canon.flagged_rows(total)
    if flagged.size == 0:
        return total
    edges = canon.torch_edges(flagged)
    refine_small_masses(total, edges, log_prefix, logprobs, perm)
    at = torch.as_tensor(flagged, device=out.device)
    out[at] = eot_only[at]
    logaddexp_scatter(out.view(-1), edges["target"], edges["value"])
    return torch.logaddexp(out, extra)


def exact_byte_targets(teacher_model, batch, vocab: TokenBytes, eos_id: int | None, *,
                       max_tokens: int = BATCH_CHUNK_TOKENS, agree_forwards: Callable[[int], int] | None = None,
                       backend: str = "torch"):
    """Exact next-byte targets of a padded batch: `(out [B, N_max + 1, 257], mask [B, N_max + 1])`.

    Per text, tree-masked teacher forwards that carry the canonical tokens too (no separate
    one-pass forward), at most `max_tokens` query positions each. `batch` needs `teacher_ids`
    (B lists of canonical tokens) and `teacher_input_ids` (`[B, L_max + 1]`, BOS first).

    The number of forwards depends on the text. A sharded (ZeRO-3) teacher needs every rank to
    make the same calls in the same order, so the forwards are counted first (the contexts and
    their chunking need no model), `agree_forwards(n)` (the pipeline's: the maximum of `n` over
    ranks, itself a collective, so it comes before any forward) says how many to make, and the
    missing ones are one-token forwards whose output is dropped. Without it nothing is padded.
    backend: what computes the running sums and the log-add (`byte_logprobs_exact`).
    """
    contexts = [exact_contexts(ids, vocab) for ids in batch.teacher_ids]
    forwards = sum(tree_forwards(ctx, len(ids), max_tokens=max_tokens)
                   for ctx, ids in zip(contexts, batch.teacher_ids))
    target = forwards if agree_forwards is None else agree_forwards(forwards)
    rows, made = [], 0
    for b, (ids, ctx) in enumerate(zip(batch.teacher_ids, contexts)):
        info: dict = {}
        rows.append(byte_logprobs_exact(None, ids, vocab, teacher=teacher_model, eos_id=eos_id,
                                        bos_id=int(batch.teacher_input_ids[b, 0]), max_tokens=max_tokens,
                                        contexts=ctx, info=info, backend=backend))
        made += info["forwards"]
    if made != forwards:  # the count the ranks agreed on must be the count made
        raise RuntimeError(f"exact conversion made {made} teacher forwards but planned {forwards}")
    with torch.no_grad():
        for _ in range(target - forwards):
            teacher_model(input_ids=batch.teacher_input_ids[:1, :1])
    return pad_byte_rows(rows)


def _contexts_by_node(ctx: ExactContexts, M: int) -> list:
    """For each tree node, the (b) contexts whose last token it holds."""
    by_node: list = [[] for _ in range(M)]
    for c, node in enumerate(ctx.node_of):
        by_node[node].append(c)
    return [np.asarray(c, dtype=np.int64) for c in by_node]


def _node_weights(node_lp, nodes, rows, parent, node_token, P, logprobs, log_prefix, roots_given=False) -> None:
    """log P(path to node) for one forward's nodes (whole branches, ascending: parents first).

    roots_given: `node_lp` already holds the roots' weights (a sequence-parallel rank gets them from
    the rank holding their canonical row: `bld_scale.convert.shard_exact`)."""
    device = node_lp.device
    tok = torch.as_tensor(node_token[nodes], device=device)
    is_root = parent[nodes] < P
    if is_root.any() and not roots_given:
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
