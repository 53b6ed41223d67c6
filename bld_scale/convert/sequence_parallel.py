"""Sequence-parallel byte targets: each rank converts its own teacher rows, rows move by byte offset.

The collectives of the scheme in `bld_scale.convert.shard_plan`, for a batch of windows at once:
1. one all-gather of a float64 per window and rank (its canonical tokens' log-probability sum),
   from which each rank takes the exclusive prefix sum `log P(t_<k0)`; mode exact adds one float64
   per tree root (the weight of an extra context's first token, sent by the rank holding its row);
2. local: each rank's partial byte rows over its range (`shard_rows.partial_one_pass_rows`; mode
   exact: `shard_exact.partial_exact_rows`, whose tree forwards run on the rank, counts agreed);
3. one all-to-all (`all_to_all_single`, which gloo and NCCL both run) that delivers every byte
   row a rank's student slots read, from every rank whose tokens reach it (1036 bytes a row);
4. local: the pieces log-added and normalised (`shard_plan.combine_rows`).
The teacher's `[rows, V]` log-probabilities never leave their rank. Every rank holds the whole
batch (token ids, offsets: small); only the models' sequence positions are split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from bld_scale.convert.byte_rows import token_layout
from bld_scale.convert.exact_contexts import exact_contexts
from bld_scale.convert.shard_exact import (context_owners, exact_forwards, owner_of_rows, partial_exact_rows,
                                           root_values, tree_roots)
from bld_scale.convert.shard_plan import (PACKED_WIDTH, combine_rows, contribution_range, exclusive_prefix,
                                          pack_rows, routing_plan)
from bld_scale.convert.shard_rows import canonical_logprobs, partial_one_pass_rows
from bld_scale.tokenize.token_bytes import TokenBytes

SEQUENCE_PARALLEL_MODES = ("cover", "within_token", "exact")


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's place in its sequence-parallel group: `rank` of `size`; `group` the process
    group (None: the default group, when the whole world is one SP group)."""

    rank: int
    size: int
    group: object = None


def _all_gather(t: torch.Tensor, sp: SequenceGroup) -> torch.Tensor:
    if sp.size == 1:
        return t.unsqueeze(0)
    out = [torch.empty_like(t) for _ in range(sp.size)]
    dist.all_gather(out, t, group=sp.group)
    return torch.stack(out)


def _all_to_all_rows(send: list[torch.Tensor], recv_counts: list[int], sp: SequenceGroup, device) -> list[torch.Tensor]:
    """Packed rows to every rank of the group (`send[dst]`), rows from every rank back (`recv_counts[src]`)."""
    if sp.size == 1:
        return send
    flat = torch.cat(send) if send else torch.zeros((0, PACKED_WIDTH), device=device)
    out = torch.empty((sum(recv_counts), PACKED_WIDTH), dtype=flat.dtype, device=device)
    dist.all_to_all_single(out, flat.contiguous(), output_split_sizes=list(recv_counts),
                           input_split_sizes=[int(s.shape[0]) for s in send], group=sp.group)
    return list(out.split(list(recv_counts)))


def sequence_parallel_rows(local_logprobs: torch.Tensor, teacher_ids: Sequence[Sequence[int]], vocab: TokenBytes,
                           teacher_bounds: Sequence[int], wanted: Sequence[Sequence[np.ndarray]], sp: SequenceGroup, *,
                           eos_id: int | None = None, mode: str = "cover", backend: str = "torch",
                           teacher_model=None, bos_ids: Sequence[int] | None = None, max_tokens: int = 4096,
                           agree_forwards: Callable[[int], int] | None = None) -> list[torch.Tensor]:
    """The normalised byte rows `[len(wanted[b][sp.rank]), 257]` (float32) of each window b that
    this rank's student slots read: the numbers `byte_logprobs` gives for the unsplit window.

    local_logprobs: `[B, k1 - k0, V]`, this rank's slice `[k0, k1) = teacher_bounds[rank:rank + 2]`
      of each window's teacher rows `[BOS] + t_1..t_L` (the same split for every window, as
      Ulysses splits a padded batch; rows past a window's end are ignored).
    teacher_ids: each window's canonical tokens (every rank has them all).
    wanted: `wanted[b][r]`, ascending unique byte rows rank r reads from window b (every rank's).
    Mode exact: `teacher_model` runs the tree forwards of the extra contexts that start inside this
    rank's tokens (`shard_exact`), `bos_ids` each window's first teacher input, at most
    `max_tokens` query positions a forward; `agree_forwards(n)` (a collective: the most over the
    ranks that share the teacher) pads them with one-token forwards, as `exact.exact_byte_targets`.
    Collective over `sp.group`: every rank of the group calls it with the same batch.
    """
    if mode not in SEQUENCE_PARALLEL_MODES:
        raise ValueError(f"sequence-parallel conversion runs modes {', '.join(SEQUENCE_PARALLEL_MODES)}; "
                         f"got {mode!r} (set parallel.sequence_parallel: 1 for it)")
    if len(teacher_bounds) != sp.size + 1:
        raise ValueError(f"teacher_bounds has {len(teacher_bounds)} entries for {sp.size} ranks (need size + 1)")
    device = local_logprobs.device
    k0, k1 = int(teacher_bounds[sp.rank]), int(teacher_bounds[sp.rank + 1])
    layouts = [token_layout(ids, vocab) for ids in teacher_ids]
    exact = mode == "exact"
    if exact and (teacher_model is None or bos_ids is None):
        raise ValueError("sequence-parallel mode 'exact' needs teacher_model= and bos_ids=")
    contexts = [exact_contexts(ids, vocab) for ids in teacher_ids] if exact else [None] * len(teacher_ids)
    owned = [np.flatnonzero(context_owners(ctx, layouts[b][1], teacher_bounds) == sp.rank) if exact else None
             for b, ctx in enumerate(contexts)]
    forwards = sum(exact_forwards(ctx, owned[b], len(teacher_ids[b]), max_tokens)
                   for b, ctx in enumerate(contexts)) if exact else 0
    # agreed before any forward: the agreement is itself a collective (as in exact.exact_byte_targets)
    agreed = agree_forwards(forwards) if exact and agree_forwards is not None else forwards
    # one all-gather: per window, this rank's canonical log-probability sum, then (exact) the
    # weights of the tree roots whose canonical row it holds
    parts = []
    for b, ids in enumerate(teacher_ids):
        parts.append(canonical_logprobs(local_logprobs[b], ids, k0).sum().reshape(1))
        if exact:
            parts.append(root_values(local_logprobs[b], ids, contexts[b], k0, k1))
    mine = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    gathered = _all_gather(mine, sp)  # [size, B (+ roots)]
    sends, recv_counts, plans, made = _local_rows(gathered, local_logprobs, teacher_ids, vocab, teacher_bounds,
                                                  wanted, sp, layouts, contexts, owned, eos_id=eos_id, mode=mode,
                                                  backend=backend, teacher_model=teacher_model, bos_ids=bos_ids,
                                                  max_tokens=max_tokens)
    if made != forwards:
        raise RuntimeError(f"sequence-parallel exact conversion made {made} tree forwards but planned {forwards}")
    if exact:  # a sharded teacher needs as many forwards on every rank
        for _ in range(agreed - forwards):
            with torch.no_grad():
                teacher_model(input_ids=torch.as_tensor([[int(bos_ids[0])]], device=device))
    received = _all_to_all_rows(sends, recv_counts, sp, device)
    out, taken = [], [0] * sp.size
    for b, plan in enumerate(plans):
        pieces = []
        for src in range(sp.size):
            rows = plan[src][sp.rank]
            pieces.append((rows, received[src][taken[src]:taken[src] + len(rows)]))
            taken[src] += len(rows)
        out.append(combine_rows(np.asarray(wanted[b][sp.rank]), pieces, len(layouts[b][0]), device))
    return out


def _local_rows(gathered, local_logprobs, teacher_ids, vocab, teacher_bounds, wanted, sp, layouts, contexts, owned, *,
                eos_id, mode, backend, teacher_model, bos_ids, max_tokens):
    """This rank's partial rows of every window, packed per destination; what it receives; the plans."""
    device = local_logprobs.device
    k0 = int(teacher_bounds[sp.rank])
    exact = mode == "exact"
    column, forwards = 0, 0
    send: list[list[torch.Tensor]] = [[] for _ in range(sp.size)]
    recv_counts = [0] * sp.size
    plans = []
    for b, ids in enumerate(teacher_ids):
        data, starts = layouts[b]
        sums = gathered[:, column].double()
        before = exclusive_prefix(sums, sp.rank)
        column += 1
        ranges = [contribution_range(starts, len(data), int(teacher_bounds[r]), int(teacher_bounds[r + 1]),
                                     vocab.max_token_len) for r in range(sp.size)]
        plan = routing_plan(ranges, wanted[b])
        plans.append(plan)
        lo, hi = ranges[sp.rank]
        if exact:
            ctx = contexts[b]
            n_roots = tree_roots(ctx, len(ids)).size
            roots = gathered[:, column:column + n_roots]
            column += n_roots
            holder = owner_of_rows(np.asarray(ctx.parent, dtype=np.int64)[tree_roots(ctx, len(ids))], teacher_bounds)
            # each root's weight: the exclusive prefix of the rank holding its row, plus what that rank sent
            prefixes = torch.cat([sums.new_zeros(1), torch.cumsum(sums, 0)[:-1]])
            holder_t = torch.as_tensor(holder, device=device)
            root_lp = prefixes[holder_t] + roots.double()[holder_t, torch.arange(n_roots, device=device)]
            acc, made = partial_exact_rows(local_logprobs[b], ids, vocab, k0, before, lo, hi, ctx=ctx, contexts=owned[b],
                                           root_lp=root_lp, teacher=teacher_model, bos_id=int(bos_ids[b]),
                                           eos_id=eos_id, max_tokens=max_tokens, backend=backend)
            forwards += made
        else:
            acc = partial_one_pass_rows(local_logprobs[b], ids, vocab, k0, before, lo, hi, eos_id=eos_id,
                                        within_token=mode == "within_token", backend=backend)
        for dst in range(sp.size):
            rows = plan[sp.rank][dst]
            send[dst].append(pack_rows(acc.index_select(0, torch.as_tensor(rows - lo, device=device))))
        for src in range(sp.size):
            recv_counts[src] += len(plan[src][sp.rank])
    empty = torch.zeros((0, PACKED_WIDTH), device=device)
    return [torch.cat(parts) if parts else empty for parts in send], recv_counts, plans, forwards
