"""Range masses from running sums, and mixing them in log space: what every mode's edges are made of.

A conversion needs, for a distribution `p_k` and a trie node `u`, the mass `M_k(u + b)` that `p_k`
puts on tokens whose bytes start with `u + b`. The vocabulary is sorted by bytes once
(`TokenBytes.index`), so that mass is the difference of two entries of the running sum of `p_k`
in sorted order (`RunningSums`), and every (row, prefix, next byte) is one *edge*
(`split_edges`): `log_weight[row] + log M`, bound for one output cell. Edges are mixed into the
output with `logaddexp_scatter`; masses too small for a difference of running sums are summed
directly (`refine_small_masses`). Rows are processed in chunks so that the extra memory stays a
small fraction of the logits (`chunk_rows`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from bld_scale.convert.byte_rows import NUM_BYTE_OUTCOMES, gather_logprobs

# Extra working memory allowed per chunk of rows, as a fraction of the logits' own size.
_CHUNK_MEMORY_FRACTION = 0.2
_MIN_CHUNK_BYTES = 64 << 20


def chunk_rows(num_rows: int, sorted_size: int, logits_bytes: int, entry_bytes: int = 4 + 8 + 8) -> int:
    """Rows whose running sums fit in a fraction of the logits' own size (at least one).

    entry_bytes: working memory per sorted-vocabulary entry of a row (torch: float32 values,
    float64 copy and sums; the Triton kernels write the float64 sums only, 8)."""
    budget = max(int(_CHUNK_MEMORY_FRACTION * logits_bytes), _MIN_CHUNK_BYTES)
    per_row = (max(sorted_size, 1) + 1) * entry_bytes
    return int(max(1, min(num_rows, budget // per_row)))


# A difference of float64 running sums of a distribution is exact to about this much, absolutely.
_RUNNING_SUM_ERROR = 1e-15
# An edge is recomputed directly when that error could move its row by more than this, relatively.
_REFINE_TOLERANCE = 1e-9


def masses_too_small(log_weight: torch.Tensor, row_total: torch.Tensor) -> torch.Tensor:
    """Whether a split's masses (weight `log_weight`, into a byte row of log total `row_total`) are
    too small for a difference of running sums: its error could move the row by more than the
    tolerance. Elementwise; the rule `refine_small_masses` applies to every edge of the split."""
    return log_weight + math.log(_RUNNING_SUM_ERROR) - row_total > math.log(_REFINE_TOLERANCE)


def refine_small_masses(out, edges, log_prefix, logprobs, perm, log_normaliser=None) -> bool:
    """Recompute, by direct float64 sums, the masses too small for running-sum differences.

    A mass below ~1e-15 is lost in `S(hi) - S(lo)`. It matters only when its whole row n is made
    of such masses (a teacher that gave the text's tokens vanishing probability); those edges
    are found from the first pass's row totals and summed directly. Realistic teachers need none.
    log_normaliser: given when `logprobs` holds raw logits (see `byte_rows.gather_logprobs`).
    """
    row_total = torch.logsumexp(out, dim=1)
    n = edges["target"] // NUM_BYTE_OUTCOMES
    flagged = torch.nonzero(masses_too_small(log_prefix[edges["k"]], row_total[n])).flatten()
    if flagged.numel() == 0:
        return False
    k, lo, hi = edges["k"][flagged], edges["lo"][flagged], edges["hi"][flagged]
    mass = torch.zeros(flagged.numel(), dtype=torch.float64, device=out.device)
    width = hi - lo
    step = max(1, int((1 << 24) // max(int(width.max()), 1)))  # bound the gathered elements
    for e0 in range(0, flagged.numel(), step):
        sl = slice(e0, e0 + step)
        w = width[sl]
        seg = torch.repeat_interleave(torch.arange(w.numel(), device=out.device), w)
        offset = torch.arange(seg.numel(), device=out.device) - torch.repeat_interleave(torch.cumsum(w, 0) - w, w)
        pos = perm[lo[sl][seg] + offset]
        vals = gather_logprobs(logprobs, k[sl][seg], pos, log_normaliser).exp()
        mass[sl] = torch.zeros(w.numel(), dtype=torch.float64, device=out.device).index_add_(0, seg, vals)
    edges["value"][flagged] = torch.log(mass) + log_prefix[k]
    return True


def scatter_edges(acc: torch.Tensor, edges: dict, log_weight: torch.Tensor, rows: torch.Tensor, perm: torch.Tensor,
                  *, totals_with: torch.Tensor | None = None,
                  log_normaliser: torch.Tensor | None = None) -> torch.Tensor:
    """`acc` with `edges` log-added, their too-small masses re-summed directly; returns the result.

    Whether a mass is too small is judged on the row totals after a first log-add (of `acc`, or of
    `logaddexp(totals_with, acc)` when other rows add to the same outputs); the flagged edges get
    their direct sums (`refine_small_masses`) and the log-add is redone from `acc` as it was.
    Totals seen so far are at most the final ones, so this flags every edge the final totals
    would flag (and perhaps a few more, summed directly all the same).
    """
    if not edges["value"].numel():
        return acc
    before = acc.clone()
    logaddexp_scatter(acc.view(-1), edges["target"], edges["value"])
    seen = acc if totals_with is None else torch.logaddexp(totals_with, acc)
    if refine_small_masses(seen, edges, log_weight, rows, perm, log_normaliser):
        acc = before
        logaddexp_scatter(acc.view(-1), edges["target"], edges["value"])
    return acc


def split_edges(rows: torch.Tensor, split_row: np.ndarray, split_end: np.ndarray, split_node: np.ndarray,
                log_weight: torch.Tensor, index, memory_bytes: int, running_sums=None,
                log_normaliser: torch.Tensor | None = None) -> dict:
    """One edge per (split, next byte): `log_weight[row] + log M_row(prefix + byte)` and its cell.

    Split s reads distribution `rows[split_row[s]]` at the trie node `split_node[s]` and feeds
    output row `split_end[s]`. Returns tensors `k` (row), `lo`, `hi` (sorted range), `target`
    (flat output cell) and `value`, shared by `cover` and `exact`. running_sums: the class that
    computes the masses (`RunningSums` by default; see `bld_scale.convert.backends`).
    log_normaliser: `[rows]`, given when `rows` holds raw logits (row k's log-probabilities are
    `rows[k] - log_normaliser[k]`): the running sums subtract it as they read each row, so no
    log-softmax of the rows is ever written.
    """
    device = rows.device
    tables = index.torch_tables(device)
    counts = index.child_count[split_node]
    order = np.argsort(split_row, kind="stable")
    split_row, split_end, split_node, counts = split_row[order], split_end[order], split_node[order], counts[order]
    edge_offsets = np.concatenate([[0], np.cumsum(counts)])
    sorted_size = index.perm.size
    chunk = chunk_rows(rows.shape[0], sorted_size, memory_bytes)
    running = (running_sums or RunningSums)(chunk, sorted_size, device)
    edges = {"k": [], "lo": [], "hi": [], "target": [], "value": []}
    for k0 in range(0, rows.shape[0], chunk):
        k1 = min(k0 + chunk, rows.shape[0])
        p0, p1 = np.searchsorted(split_row, [k0, k1])
        if p0 == p1:
            continue
        running.load(rows[k0:k1], tables["perm"], None if log_normaliser is None else log_normaliser[k0:k1])
        e0, e1 = edge_offsets[p0], edge_offsets[p1]
        pair = np.repeat(np.arange(p0, p1), counts[p0:p1])
        child = index.child_start[split_node[pair]] + (np.arange(e0, e1) - edge_offsets[pair])
        child_t = torch.as_tensor(child, device=device)
        k_t = torch.as_tensor(split_row[pair], device=device)
        # index_select, not t[idx]: measured ~30x faster for these 1-D gathers on CPU
        lo, hi = tables["node_lo"].index_select(0, child_t), tables["node_hi"].index_select(0, child_t)
        mass = running.mass(k_t - k0, lo, hi)
        edges["k"].append(k_t)
        edges["lo"].append(lo)
        edges["hi"].append(hi)
        edges["value"].append(torch.log(mass) + log_weight.index_select(0, k_t))
        edges["target"].append(torch.as_tensor(split_end[pair], device=device) * NUM_BYTE_OUTCOMES
                               + tables["node_byte"].index_select(0, child_t))
    if not edges["value"]:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return {"k": empty, "lo": empty, "hi": empty, "target": empty,
                "value": torch.zeros(0, dtype=torch.float64, device=device)}
    return {name: torch.cat(parts) for name, parts in edges.items()}


def log_normaliser(logits: torch.Tensor) -> torch.Tensor:
    """float32 `logsumexp` of each row of `[R, V]` logits, in chunks of rows: torch's logsumexp
    writes a full-size temporary, which on all rows at once would cost what the fused path saves."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    step = max(1, _MIN_CHUNK_BYTES // (4 * max(logits.shape[1], 1)))
    for r0 in range(0, logits.shape[0], step):
        torch.logsumexp(logits[r0:r0 + step].float(), dim=1, out=out[r0:r0 + step])
    return out


class RunningSums:
    """Running sums `S(i)` of p_k over the first i sorted-vocabulary entries, for a chunk of rows.

    Probabilities are exponentiated in float32 and summed in float64: a range mass
    `S(hi) - S(lo)` must keep its relative precision even when it is tiny next to the row's
    total, which a float32 scan over 10^5 entries would not (errors ~1e-6 absolute). Copying to
    float64 before the scan is measured faster than letting `cumsum` convert on the fly.
    """

    def __init__(self, rows: int, size: int, device):
        self.size = size
        self.values = torch.empty((rows, size), dtype=torch.float32, device=device)
        self.wide = torch.empty((rows, size + 1), dtype=torch.float64, device=device)
        self.wide[:, 0] = 0.0  # S(0) = 0; the rest is overwritten on every load
        self.sums = torch.empty((rows, size + 1), dtype=torch.float64, device=device)

    def load(self, logprobs: torch.Tensor, perm: torch.Tensor, shift: torch.Tensor | None = None) -> None:
        """Running sums of `exp(logprobs[:, perm] - shift[:, None])` (shift: raw logits' log-normalisers)."""
        r = logprobs.shape[0]
        vals = self.values[:r]
        if logprobs.dtype == vals.dtype:
            torch.index_select(logprobs, 1, perm, out=vals)
        else:
            vals.copy_(logprobs.index_select(1, perm))
        if shift is not None:
            vals.sub_(shift.to(vals.dtype).unsqueeze(1))
        vals.exp_()
        self.wide[:r, 1:].copy_(vals)
        torch.cumsum(self.wide[:r], dim=1, out=self.sums[:r])

    def mass(self, row: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        flat = self.sums.view(-1)
        base = row * (self.size + 1)
        return (flat.index_select(0, base + hi) - flat.index_select(0, base + lo)).clamp_min(0.0)


def logaddexp_scatter(acc: torch.Tensor, target: torch.Tensor, value: torch.Tensor) -> None:
    """acc[t] = log(exp(acc[t]) + sum of exp(value[i]) with target[i] = t), stably, in place.

    Many values (the edges of a conversion): dense over `acc` (a max-scatter, then one exp and
    log per cell), no sort. Few values (EOT entries): only the touched cells, grouped by unique.
    """
    finite = torch.isfinite(value)
    target, value = target[finite], value[finite]
    if value.numel() == 0:
        return
    if value.numel() * 8 >= acc.numel():
        peak = acc.clone()
        peak.scatter_reduce_(0, target, value, reduce="amax", include_self=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # untouched -inf cells
        total = torch.exp(acc - peak)  # 0 where acc is -inf
        total.scatter_add_(0, target, torch.exp(value - peak.index_select(0, target)))
        acc.copy_(peak + torch.log(total))  # log 0 = -inf where nothing was ever added
        return
    touched, slot = torch.unique(target, return_inverse=True)
    peak = acc[touched].clone()
    peak.scatter_reduce_(0, slot, value, reduce="amax", include_self=True)
    total = torch.exp(acc[touched] - peak)  # 0 where acc is -inf
    total.scatter_add_(0, slot, torch.exp(value - peak[slot]))
    acc[touched] = peak + torch.log(total)
