"""One rank's partial byte rows of mode `exact` under sequence parallelism.

The canonical contexts are `cover`'s (`shard_rows.partial_one_pass_rows`). The extra contexts of
`bld_scale.convert.exact` (a valid tokenization of `x[0..e)` that is not a canonical prefix) are
split by where they start: context `e` belongs to the rank that holds the teacher row of the
canonical token containing `e`, and that rank runs the tree-masked forwards of its contexts only
(the sub-tree of their nodes, `sub_tree`). A context's weight `P(tau)` starts at its root node,
`log P(t_<a) + log p(tau_a | t_<a)`, read from teacher row `a`, which may sit on an earlier rank:
the rank holding row `a` sends it in the same all-gather as the prefix sums (`root_values`,
relative to its own first token; the receiver adds that rank's exclusive prefix).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from bld_scale.convert.backends import log_add_splits
from bld_scale.convert.byte_rows import EOT, NUM_BYTE_OUTCOMES, token_layout
from bld_scale.convert.exact import _contexts_by_node, _node_weights
from bld_scale.convert.exact_contexts import ExactContexts
from bld_scale.convert.running_sums import logaddexp_scatter
from bld_scale.convert.shard_rows import canonical_logprobs, partial_one_pass_rows
from bld_scale.convert.tree_forward import iter_tree_logprobs, plan_tree
from bld_scale.tokenize.token_bytes import TokenBytes


def owner_of_rows(rows: np.ndarray, bounds: Sequence[int]) -> np.ndarray:
    """The rank whose teacher slice `[bounds[r], bounds[r + 1])` holds each row."""
    return np.searchsorted(np.asarray(bounds[1:]), np.asarray(rows, dtype=np.int64), side="right")


def context_owners(ctx: ExactContexts, starts: np.ndarray, bounds: Sequence[int]) -> np.ndarray:
    """Rank that converts each extra context: the one holding the canonical token that contains its start."""
    token = np.searchsorted(starts, np.asarray(ctx.starts, dtype=np.int64), side="right") - 1
    return owner_of_rows(token, bounds)


def tree_roots(ctx: ExactContexts, n_ids: int) -> np.ndarray:
    """The tree nodes that hang off a canonical prefix position (their parent is a row < L + 1)."""
    return np.flatnonzero(np.asarray(ctx.parent, dtype=np.int64) < n_ids + 1)


def root_values(local_logprobs: torch.Tensor, ids: Sequence[int], ctx: ExactContexts, k0: int, k1: int) -> torch.Tensor:
    """float64 per root node: `log P(t_k0..t_<a) + log p(tau_a | t_<a)` where this rank holds row
    `a` (its first token's exclusive prefix still to add), 0 elsewhere."""
    roots = tree_roots(ctx, len(ids))
    out = torch.zeros(roots.size, dtype=torch.float64, device=local_logprobs.device)
    anchor = np.asarray(ctx.parent, dtype=np.int64)[roots]
    mine = np.flatnonzero((anchor >= k0) & (anchor < k1))
    if mine.size:
        canon = canonical_logprobs(local_logprobs, ids, k0)
        before = torch.cat([canon.new_zeros(1), torch.cumsum(canon, 0)])
        a = torch.as_tensor(anchor[mine] - k0, device=out.device)
        tok = torch.as_tensor(np.asarray(ctx.node_token, dtype=np.int64)[roots[mine]], device=out.device)
        out[torch.as_tensor(mine, device=out.device)] = before[a] + local_logprobs[a, tok].double()
    return out


def sub_tree(ctx: ExactContexts, contexts: np.ndarray, P: int):
    """The nodes the given contexts need (their paths), renumbered ascending: `(old node of each
    new one, parent, token)` of the sub-tree, parents before children as `plan_tree` wants."""
    parent = np.asarray(ctx.parent, dtype=np.int64)
    keep = np.zeros(parent.size, dtype=bool)
    for node in np.asarray(ctx.node_of, dtype=np.int64)[contexts]:
        while not keep[node]:
            keep[node] = True
            if parent[node] < P:
                break
            node = parent[node] - P
    old = np.flatnonzero(keep)
    new_of = np.full(parent.size, -1, dtype=np.int64)
    new_of[old] = np.arange(old.size)
    sub_parent = np.where(parent[old] < P, parent[old], P + new_of[np.maximum(parent[old] - P, 0)])
    return old, sub_parent, np.asarray(ctx.node_token, dtype=np.int64)[old]


def exact_forwards(ctx: ExactContexts, contexts: np.ndarray, n_ids: int, max_tokens: int) -> int:
    """Tree forwards this rank makes for its contexts (counted before any is made)."""
    if contexts.size == 0:
        return 0
    _, parent, _ = sub_tree(ctx, contexts, n_ids + 1)
    return plan_tree(n_ids + 1, parent, max_tokens=max_tokens).forwards


@torch.no_grad()
def partial_exact_rows(local_logprobs: torch.Tensor, ids: Sequence[int], vocab: TokenBytes, k0: int,
                       prefix_before, lo: int, hi: int, *, ctx: ExactContexts, contexts: np.ndarray,
                       root_lp: torch.Tensor, teacher, bos_id: int, eos_id: int | None = None,
                       max_tokens: int = 4096, backend: str = "torch") -> tuple[torch.Tensor, int]:
    """Unnormalised log rows `[hi - lo, 257]` of mode exact for this rank, and its tree forwards.

    contexts: the extra contexts this rank converts (`context_owners`); root_lp: the full
    `log P(tau up to each root)` (float64, indexed like `tree_roots`); teacher: the model
    `bld_scale.convert.tree_forward` calls; backend: what computes the running sums and the log-add.
    """
    acc = partial_one_pass_rows(local_logprobs, ids, vocab, k0, prefix_before, lo, hi, eos_id=eos_id, backend=backend)
    if contexts.size == 0:
        return acc, 0
    device = acc.device
    data, _ = token_layout(ids, vocab)
    P = len(ids) + 1
    old, parent, tokens = sub_tree(ctx, contexts, P)
    node_lp = torch.empty(old.size, dtype=torch.float64, device=device)
    root_slot = {int(n): i for i, n in enumerate(tree_roots(ctx, len(ids)))}
    is_root = parent < P
    node_lp[torch.as_tensor(np.flatnonzero(is_root), device=device)] = root_lp[
        torch.as_tensor([root_slot[int(n)] for n in old[is_root]], dtype=torch.long, device=device)]
    new_of = {int(n): i for i, n in enumerate(old)}
    by_node = _contexts_by_node(ExactContexts(shift=ctx.shift, node_of=[new_of[int(ctx.node_of[c])] for c in contexts]),
                                old.size)
    starts_c = np.asarray(ctx.starts, dtype=np.int64)[contexts]
    extra = torch.full_like(acc, -math.inf)
    index, memory = vocab.index, local_logprobs.numel() * local_logprobs.element_size()
    forwards = 0
    for chunk in iter_tree_logprobs(teacher, [int(bos_id)] + [int(i) for i in ids], parent, tokens,
                                    max_tokens=max_tokens):
        forwards += 1
        rows = chunk.logprobs.to(device)
        # down the tree from the roots, whose weights came with the all-gather
        _node_weights(node_lp, chunk.nodes, rows, parent, tokens, P, None, None, roots_given=True)
        cs = np.concatenate([by_node[j] for j in chunk.nodes]) if chunk.nodes.size else np.zeros(0, np.int64)
        if cs.size == 0:
            continue
        node_of = np.asarray([new_of[int(ctx.node_of[contexts[c]])] for c in cs], dtype=np.int64)
        c_rows = rows.index_select(0, torch.as_tensor(np.searchsorted(chunk.nodes, node_of), device=device))
        c_w = node_lp[torch.as_tensor(node_of, device=device)]
        c_start = starts_c[cs]
        if eos_id is not None:
            logaddexp_scatter(extra.view(-1), torch.as_tensor(c_start - lo, device=device) * NUM_BYTE_OUTCOMES + EOT,
                              c_w + c_rows[:, int(eos_id)].double())
        c, end, node = index.walk(data, c_start)
        keep = end < len(data)
        extra = log_add_splits(extra, c_rows, c[keep], end[keep] - lo, node[keep], c_w, index, memory, backend=backend,
                               totals_with=acc)
    return torch.logaddexp(acc, extra), forwards

