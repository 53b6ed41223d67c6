"""One teacher forward over a prefix and a tree of continuations (a tree-shaped attention mask).

The exact byte conversion (`bld_scale.byteconv_exact`) needs the teacher's next-token
distribution after many contexts that share the canonical prefix `[BOS] t_1 .. t_a` and differ in a
few tokens after it. Running each context alone repeats the shared prefix each time; here they
all go into one sequence:

    input   = [BOS] t_1 .. t_A  u_1 u_2 ... u_M          (prefix, then every tree node)
    mask    : prefix positions are causal; node j attends the prefix up to its anchor position,
              its ancestors in the tree and itself (0 where allowed, the dtype's minimum elsewhere;
              a 4D float mask [1, 1, Q, Q] that Hugging Face models take as-is)
    position: prefix position i has id i; a node has id = its parent's id + 1

so the logits at node j are those of the context `[BOS] t_1..t_a, ancestors(j), j` run alone, up
to float rounding (the same keys, the same positions, the other keys masked out).

Memory: each forward holds at most `max_tokens` query positions (prefix + nodes) unless one branch
alone is longer. Nodes are grouped into branches (a root node and everything under it), sorted by
anchor; a chunk carries whole branches and only the prefix up to its largest anchor, so a chunk
repeats at most that much of the prefix.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _call_teacher(teacher, input_ids, attention_mask, position_ids) -> torch.Tensor:
    out = teacher(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits


def _model_dtype_device(teacher):
    try:
        p = next(teacher.parameters())
        return p.dtype, p.device
    except (AttributeError, StopIteration):
        return torch.float32, torch.device("cpu")


@torch.no_grad()
def tree_logprobs(teacher, prefix_ids: Sequence[int], parent: Sequence[int], tokens: Sequence[int], *,
                  max_tokens: int = 4096, dtype: torch.dtype | None = None,
                  with_prefix: bool = False):
    """Log-softmax of the teacher after every tree node, `[M, V]`.

    teacher: a Hugging Face causal LM (or any callable taking `input_ids [1, Q]`,
      `attention_mask [1, 1, Q, Q]` (float, additive), `position_ids [1, Q]` and returning logits
      or an object with `.logits`).
    prefix_ids: the shared prefix `[BOS] t_1 .. t_A` (P = A + 1 ids).
    parent: for node j, its parent: `0 <= parent[j] < P` a prefix position (the node is a root
      hanging off that position), `parent[j] >= P` the node `parent[j] - P`, which must come
      earlier (`parent[j] - P < j`).
    tokens: the node's token id.
    max_tokens: the most query positions one forward takes (memory bound); whole branches only.
    with_prefix: also return the log-softmax after every prefix position, `[P, V]` (the one-pass
      rows: the last chunk then carries the whole prefix), as `(nodes, prefix)`.
    """
    prefix_ids = np.asarray(prefix_ids, dtype=np.int64)
    parent = np.asarray(parent, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)
    P, M = prefix_ids.size, parent.size
    if M == 0:
        if not with_prefix:
            return torch.zeros((0, 0))
        _, device = _model_dtype_device(teacher)
        logits = _call_teacher(teacher, torch.as_tensor(prefix_ids, device=device)[None], None, None)[0]
        prefix_lp = _log_softmax(logits)
        return prefix_lp.new_zeros((0, prefix_lp.shape[-1])), prefix_lp
    if np.any(parent < 0) or np.any((parent >= P) & (parent - P >= np.arange(M))):
        raise ValueError("tree nodes must come after their parent (parent[j] < P, or parent[j] - P < j)")
    # Root of each node's branch, anchor (prefix position) of the branch, position id of the node.
    root = np.empty(M, dtype=np.int64)
    depth = np.empty(M, dtype=np.int64)
    for j in range(M):
        p = parent[j]
        if p < P:
            root[j], depth[j] = j, p + 1
        else:
            root[j], depth[j] = root[p - P], depth[p - P] + 1
    anchor = parent[root]  # prefix position each branch hangs off

    model_dtype, device = _model_dtype_device(teacher)
    dtype = dtype or model_dtype
    neg = torch.finfo(dtype).min

    # Chunks of whole branches, by anchor.
    roots = np.unique(root)
    roots = roots[np.argsort(anchor[roots], kind="stable")]
    members: dict[int, list[int]] = {}
    for j in range(M):
        members.setdefault(int(root[j]), []).append(j)
    chunks, cur, cur_nodes = [], [], 0
    for r in roots:
        size = len(members[int(r)])
        need = int(anchor[r]) + 1 + cur_nodes + size
        if cur and need > max_tokens:
            chunks.append(cur)
            cur, cur_nodes = [], 0
        cur.append(int(r))
        cur_nodes += size
    if cur:
        chunks.append(cur)

    out = prefix_lp = None
    for number, chunk in enumerate(chunks):
        nodes = np.concatenate([np.asarray(members[r], dtype=np.int64) for r in chunk])
        nodes.sort()  # keeps parents before children
        A = int(anchor[chunk].max()) + 1  # prefix positions this chunk needs
        last = number == len(chunks) - 1
        if with_prefix and last:
            A = P
        Q = A + nodes.size
        local = np.full(M, -1, dtype=np.int64)
        local[nodes] = A + np.arange(nodes.size)
        allowed = torch.zeros((Q, Q), dtype=torch.bool)
        allowed[:A, :A] = torch.tril(torch.ones((A, A), dtype=torch.bool))
        for j in nodes:  # parents come first, so their rows are complete
            q, p = int(local[j]), int(parent[j])
            if p < P:
                allowed[q, : p + 1] = True
            else:
                allowed[q] = allowed[int(local[p - P])]
            allowed[q, q] = True
        mask = torch.zeros((Q, Q), dtype=dtype)
        mask.masked_fill_(~allowed, neg)
        ids = torch.as_tensor(np.concatenate([prefix_ids[:A], tokens[nodes]]), device=device)
        pos = torch.as_tensor(np.concatenate([np.arange(A), depth[nodes]]), device=device)
        logits = _call_teacher(teacher, ids[None], mask[None, None].to(device), pos[None])[0]
        if with_prefix and last:
            prefix_lp = _log_softmax(logits[:A])
        lp = _log_softmax(logits[A:])
        if out is None:
            out = torch.empty((M, lp.shape[-1]), dtype=lp.dtype, device=lp.device)
        out[torch.as_tensor(nodes, device=lp.device)] = lp
    return (out, prefix_lp) if with_prefix else out


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def separate_logprobs(teacher, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Log-softmax after each context, each run alone (reference for tests and benchmarks)."""
    rows = []
    _, device = _model_dtype_device(teacher)
    for ctx in contexts:
        ids = torch.as_tensor(list(ctx), device=device)[None]
        out = teacher(input_ids=ids)
        logits = getattr(out, "logits", out)[0, -1]
        rows.append(torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16)
                                      else logits, dim=-1))
    return torch.stack(rows)
