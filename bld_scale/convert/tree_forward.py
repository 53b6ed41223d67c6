"""One teacher forward over a prefix and a tree of continuations (a tree-shaped attention mask).

The exact byte conversion (`bld_scale.convert.exact`) needs the teacher's next-token
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
alone is longer (or the prefix itself, when the forward carries it). Nodes are grouped into
branches (a root node and everything under it), sorted by anchor; a chunk carries whole branches
and only the prefix up to its largest anchor, so a chunk repeats at most that much of the prefix.
`iter_tree_logprobs` hands the chunks out one at a time, so a caller that consumes each chunk
before asking for the next (`byteconv_exact` does) never holds more than one chunk's `[Q, V]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

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


@dataclass
class TreeChunk:
    """One forward's share of the tree: `nodes` (ascending node numbers) and their log-softmax
    rows `logprobs [len(nodes), V]`; `prefix` is `[P, V]` after every prefix position when this
    forward carried the whole prefix (`with_prefix`), else None."""

    nodes: np.ndarray
    logprobs: torch.Tensor
    prefix: torch.Tensor | None = None


@dataclass
class TreePlan:
    """Shape of a tree and how its nodes are split into forwards (`chunks`: node arrays, and the
    prefix positions `spans[i]` each forward carries)."""

    P: int
    root: np.ndarray  # root node of each node's branch
    depth: np.ndarray  # position id of each node
    chunks: list
    spans: list

    @property
    def forwards(self) -> int:
        return len(self.chunks)


def plan_tree(P: int, parent: Sequence[int], *, max_tokens: int = 4096, with_prefix: bool = False) -> TreePlan:
    """Split the nodes of a tree hanging off a `P`-token prefix into forwards of whole branches.

    `with_prefix`: the first forward carries the whole prefix (its rows are the one-pass
    log-probabilities) and the branches that still fit; a tree without nodes is then one forward.
    """
    parent = np.asarray(parent, dtype=np.int64)
    M = parent.size
    if np.any(parent < 0) or np.any((parent >= P) & (parent - P >= np.arange(M))):
        raise ValueError("tree nodes must come after their parent (parent[j] < P, or parent[j] - P < j)")
    root = np.empty(M, dtype=np.int64)
    depth = np.empty(M, dtype=np.int64)
    for j in range(M):
        p = parent[j]
        if p < P:
            root[j], depth[j] = j, p + 1
        else:
            root[j], depth[j] = root[p - P], depth[p - P] + 1
    anchor = parent[root]  # prefix position each branch hangs off
    roots = np.unique(root)
    roots = roots[np.argsort(anchor[roots], kind="stable")]
    members: dict[int, list[int]] = {}
    for j in range(M):
        members.setdefault(int(root[j]), []).append(j)
    groups, cur, cur_nodes = [], [], 0
    prefix_floor = P if with_prefix else 0  # the first forward carries the whole prefix
    for r in roots:
        size = len(members[int(r)])
        need = max(int(anchor[r]) + 1, prefix_floor if not groups else 0) + cur_nodes + size
        if cur and need > max_tokens:
            groups.append(cur)
            cur, cur_nodes = [], 0
        cur.append(int(r))
        cur_nodes += size
    if cur or with_prefix:
        groups.append(cur)
    chunks, spans = [], []
    for number, group in enumerate(groups):
        nodes = np.sort(np.concatenate([np.asarray(members[r], dtype=np.int64) for r in group])
                        if group else np.zeros(0, dtype=np.int64))  # ascending: parents first
        span = int(anchor[group].max()) + 1 if group else 0
        chunks.append(nodes)
        spans.append(P if with_prefix and number == 0 else span)
    return TreePlan(P=P, root=root, depth=depth, chunks=chunks, spans=spans)


@torch.no_grad()
def iter_tree_logprobs(teacher, prefix_ids: Sequence[int], parent: Sequence[int], tokens: Sequence[int], *,
                       max_tokens: int = 4096, dtype: torch.dtype | None = None,
                       with_prefix: bool = False) -> Iterator[TreeChunk]:
    """The teacher's log-softmax after every tree node, one forward (`TreeChunk`) at a time.

    teacher: a Hugging Face causal LM (or any callable taking `input_ids [1, Q]`,
      `attention_mask [1, 1, Q, Q]` (float, additive), `position_ids [1, Q]` and returning logits
      or an object with `.logits`).
    prefix_ids: the shared prefix `[BOS] t_1 .. t_A` (P = A + 1 ids).
    parent: for node j, its parent: `0 <= parent[j] < P` a prefix position (the node is a root
      hanging off that position), `parent[j] >= P` the node `parent[j] - P`, which must come
      earlier (`parent[j] - P < j`).
    tokens: the node's token id.
    max_tokens: the most query positions one forward takes (memory bound); whole branches only.
    with_prefix: the first chunk also carries `prefix` (the rows after every prefix position).
    """
    prefix_ids = np.asarray(prefix_ids, dtype=np.int64)
    parent = np.asarray(parent, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)
    plan = plan_tree(prefix_ids.size, parent, max_tokens=max_tokens, with_prefix=with_prefix)
    model_dtype, device = _model_dtype_device(teacher)
    dtype = dtype or model_dtype
    neg = torch.finfo(dtype).min
    P, M = plan.P, parent.size
    for number, (nodes, A) in enumerate(zip(plan.chunks, plan.spans)):
        carries_prefix = with_prefix and number == 0
        if nodes.size == 0:  # only the prefix: a plain causal forward
            ids = torch.as_tensor(prefix_ids, device=device)[None]
            prefix_lp = _log_softmax(_call_teacher(teacher, ids, None, None)[0])
            yield TreeChunk(nodes, prefix_lp.new_zeros((0, prefix_lp.shape[-1])), prefix_lp)
            continue
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
        pos = torch.as_tensor(np.concatenate([np.arange(A), plan.depth[nodes]]), device=device)
        logits = _call_teacher(teacher, ids[None], mask[None, None].to(device), pos[None])[0]
        yield TreeChunk(nodes, _log_softmax(logits[A:]), _log_softmax(logits[:A]) if carries_prefix else None)


def tree_logprobs(teacher, prefix_ids: Sequence[int], parent: Sequence[int], tokens: Sequence[int], *,
                  max_tokens: int = 4096, dtype: torch.dtype | None = None,
                  with_prefix: bool = False):
    """All of `iter_tree_logprobs` at once: `[M, V]` in node order (and `[P, V]` with `with_prefix`,
    as `(nodes, prefix)`). Holds every row: for tests, benchmarks and small trees."""
    out = prefix_lp = None
    M = len(parent)
    for chunk in iter_tree_logprobs(teacher, prefix_ids, parent, tokens, max_tokens=max_tokens, dtype=dtype,
                                    with_prefix=with_prefix):
        if chunk.prefix is not None:
            prefix_lp = chunk.prefix
        if out is None:
            out = chunk.logprobs.new_empty((M, chunk.logprobs.shape[-1]))
        out[torch.as_tensor(chunk.nodes, device=out.device)] = chunk.logprobs
    if out is None:
        out = torch.zeros((0, 0))
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
