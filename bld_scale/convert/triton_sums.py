"""Running sums, edge masses and their log-add into the byte rows in Triton kernels (backend "triton").

The same numbers as `bld_scale.convert.running_sums` (`RunningSums`, `split_edges`,
`logaddexp_scatter`), with fewer launches and less memory traffic. Per chunk of teacher rows,
two launches: the running sums, then the edges and their log-add (`bld_scale.convert.backends.
TritonSplits` lays the splits out and calls them).

Running sums (`TritonRunningSums.load`): one kernel reads each row of log-probabilities once,
gathered through the sorted-vocabulary permutation inside the kernel, exponentiates to float32
probabilities (as the torch path does; computed with the float64 exp, which is accurate on GPUs
where the float32 one is not) and writes the float64 running sums `S(0..size)`, of the listed rows only when given (a padded batch's padding
rows feed no output and are never read). No float32 copy of the gathered row and no float64 copy
before the scan are materialised (8 bytes per entry instead of 20). `TritonRunningSums.mass` (a
kernel that turns sorted ranges `[lo, hi)` into masses `S(hi) - S(lo)`) serves `split_edges`'s
interface; the conversions use the log-add kernel instead.

Precision: sums are float64 within a block (`tl.cumsum`) and the block totals are carried in
float64, so a range mass keeps the torch path's absolute error (~1e-15 of the row's total); the
order of the float64 additions differs from `torch.cumsum`, so results agree to that rounding,
not bit for bit. Compensated float32 was not used: float64 costs little next to the gather, and
it keeps `refine_small_masses` (which assumes float64 running sums) valid unchanged.

Edges and log-add (`triton_log_add_splits`): a kernel runs one program per output byte row
that a chunk of teacher rows feeds (its splits grouped on the host, CSR-style), so each program
owns its row's 257 cells and no atomics are needed. For each split `(k, node)` feeding the row it
reads the node's children (`child_start`, `child_count`; their `node_lo`, `node_hi`, `node_byte`),
their masses `S_k(hi) - S_k(lo)` from the float64 running sums, and log-adds
`log(mass) + log_weight[k]` into the cells of their bytes, in float64 (`max + log(exp + exp)`, as
`running_sums.logaddexp_scatter` does for all of a cell's values at once: equal to float64
rounding). The edge list `split_edges` builds is never materialised. Children of one node have
distinct bytes, so one split's read-modify-write of the row touches each cell once; a barrier
orders it before the next split's. Masses too small for a difference of running sums are found
and redone on the host side (`TritonSplits.flagged_rows`, the torch code).

Fused from raw logits (`bld_scale.convert.dispatch.teacher_token_logits`): one more kernel computes
each row's log-normaliser in one read (a running max and float64 sum of exps per lane), and the
running-sums kernel subtracts it in float32 as it reads the row (as `log_softmax` would), so the
logits are read twice and the `[B, L, V]` log-softmax is never written.

Triton decides whether to interpret (`TRITON_INTERPRET=1`, which runs the kernels on CPU tensors,
slowly) when it defines a kernel, its own standard-library ones at `import triton`: the variable
must be set before triton is first imported. This module is imported only when the backend is
used (`bld_scale.convert.backends`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_SCAN_BLOCK = 1024
_EDGE_BLOCK = 1024
_CHILD_BLOCK = 256  # a trie node has at most 256 children (one per next byte)
_ROW_WIDTH = 257  # the output's outcomes: 256 bytes and EOT


@triton.jit
def _running_sums_kernel(lp_ptr, lp_row_stride, perm_ptr, shift_ptr, sums_ptr, size, rows_ptr,
                         HAS_SHIFT: tl.constexpr, PICK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    out = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + out) if PICK_ROWS else out  # PICK_ROWS: sums of the listed rows only
    lp_row = lp_ptr + row * lp_row_stride
    shift = tl.load(shift_ptr + row).to(tl.float32) if HAS_SHIFT else 0.0
    sums_row = sums_ptr + out * (size + 1)
    tl.store(sums_row, tl.zeros((), dtype=tl.float64))  # S(0) = 0
    carry = tl.zeros((), dtype=tl.float64)
    for start in range(0, size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < size
        col = tl.load(perm_ptr + offs, mask=inside, other=0)
        lp = tl.load(lp_row + col, mask=inside, other=0.0).to(tl.float32)
        if HAS_SHIFT:  # raw logits: their log-softmax, in float32 as torch's, never written
            lp = lp - shift
        lp = lp.to(tl.float64)
        # float32 probabilities as the torch path, but from an accurate exp: Triton's float32 exp
        # on GPUs is ex2.approx(x * log2 e), off by ~|x| ulp; its float64 exp is libdevice's
        p = tl.where(inside, tl.exp(lp).to(tl.float32).to(tl.float64), 0.0)
        s = tl.cumsum(p, axis=0) + carry
        tl.store(sums_row + 1 + offs, s, mask=inside)
        carry = tl.max(tl.where(inside, s, 0.0), axis=0)  # the block's last sum (sums never decrease)


@triton.jit
def _log_normaliser_kernel(x_ptr, x_row_stride, out_ptr, size, BLOCK: tl.constexpr):
    # one read of the row: a running (max, sum of exp relative to it) per lane, combined at the end;
    # exp and sums in float64 (accurate exp on GPUs, as in the running sums)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    peak = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < size, other=float("-inf")).to(tl.float32)
        new_peak = tl.maximum(peak, x)
        safe = tl.where(new_peak == float("-inf"), 0.0, new_peak)  # lanes that saw only -inf
        total = total * tl.exp((peak - safe).to(tl.float64)) + tl.exp((x - safe).to(tl.float64))
        peak = new_peak
    row_peak = tl.max(peak, axis=0)
    safe_row = tl.where(row_peak == float("-inf"), 0.0, row_peak)
    row_total = tl.sum(total * tl.exp((peak - safe_row).to(tl.float64)), axis=0)
    tl.store(out_ptr + row, (safe_row + tl.log(row_total)).to(tl.float32))


@triton.jit
def _range_mass_kernel(sums_ptr, row_ptr, lo_ptr, hi_ptr, out_ptr, n, size, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    base = tl.load(row_ptr + offs, mask=inside, other=0) * (size + 1)
    s_hi = tl.load(sums_ptr + base + tl.load(hi_ptr + offs, mask=inside, other=0), mask=inside, other=0.0)
    s_lo = tl.load(sums_ptr + base + tl.load(lo_ptr + offs, mask=inside, other=0), mask=inside, other=0.0)
    tl.store(out_ptr + offs, tl.maximum(s_hi - s_lo, 0.0), mask=inside)


@triton.jit
def _split_log_add_kernel(sums_ptr, seg_ptr, seg_row_ptr, split_offset_ptr, split_weight_ptr, split_child_ptr,
                          split_count_ptr, node_lo_ptr, node_hi_ptr, node_byte_ptr, acc_ptr, seg0,
                          ROW_WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    seg = seg0 + tl.program_id(0)
    first = tl.load(seg_ptr + seg)
    last = tl.load(seg_ptr + seg + 1)
    acc_row = acc_ptr + tl.load(seg_row_ptr + seg) * ROW_WIDTH
    lanes = tl.arange(0, BLOCK)
    for s in range(first, last):  # the splits feeding this output row, ascending teacher row
        sums_row = sums_ptr + tl.load(split_offset_ptr + s)
        inside = lanes < tl.load(split_count_ptr + s)
        child = tl.load(split_child_ptr + s) + lanes
        lo = tl.load(node_lo_ptr + child, mask=inside, other=0)
        hi = tl.load(node_hi_ptr + child, mask=inside, other=0)
        byte = tl.load(node_byte_ptr + child, mask=inside, other=0)
        mass = tl.maximum(tl.load(sums_row + hi, mask=inside, other=0.0)
                          - tl.load(sums_row + lo, mask=inside, other=0.0), 0.0)
        value = tl.log(mass) + tl.load(split_weight_ptr + s)
        # only finite values, as logaddexp_scatter (a zero mass adds nothing; NaN weights are dropped)
        take = inside & (tl.abs(value) < float("inf"))
        # volatile: never from a non-coherent cache; the previous split's stores are this load's input
        old = tl.load(acc_row + byte, mask=take, other=float("-inf"), volatile=True)
        peak = tl.maximum(old, value)  # finite where taken: value is
        tl.store(acc_row + byte, peak + tl.log(tl.exp(old - peak) + tl.exp(value - peak)), mask=take)
        tl.debug_barrier()  # this split's writes are seen by the next split's reads of the row


def triton_log_add_splits(acc: torch.Tensor, sums: torch.Tensor, seg0: int, seg1: int, seg_ptr: torch.Tensor,
                          seg_row: torch.Tensor, split_offset: torch.Tensor, split_weight: torch.Tensor,
                          split_child: torch.Tensor, split_count: torch.Tensor, tables: dict) -> None:
    """Log-add into `acc [rows, 257]` (float64, in place) every edge of the splits of segments
    `seg0..seg1-1`, one program per segment. Segment g is output row `seg_row[g]` (unique among
    them) and its splits `seg_ptr[g]..seg_ptr[g+1]-1`; split s reads the running sums at
    `sums.view(-1)[split_offset[s]:]` (`TritonRunningSums.sums`, float64), adds its weight
    `split_weight[s]` (float64) and covers the children `split_child[s]..+split_count[s]` of its
    trie node (`tables`: the index's `torch_tables`). Index arrays int64."""
    if seg1 <= seg0:
        return
    if not acc.is_contiguous() or acc.dtype != torch.float64 or acc.shape[-1] != _ROW_WIDTH:
        raise ValueError(f"acc must be a contiguous float64 [rows, {_ROW_WIDTH}] tensor")
    _split_log_add_kernel[(seg1 - seg0,)](sums, seg_ptr, seg_row, split_offset, split_weight, split_child,
                                          split_count, tables["node_lo"], tables["node_hi"], tables["node_byte"],
                                          acc, seg0, ROW_WIDTH=_ROW_WIDTH, BLOCK=_CHILD_BLOCK)


def triton_log_normaliser(logits: torch.Tensor) -> torch.Tensor:
    """float32 `logsumexp` of each row of `[R, V]` logits (float32 or bfloat16), one read per row."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        _log_normaliser_kernel[(logits.shape[0],)](logits, logits.stride(0), out, logits.shape[1], BLOCK=_SCAN_BLOCK)
    return out


class TritonRunningSums:
    """`RunningSums`'s interface (`load`, `mass`) on the Triton kernels."""

    def __init__(self, rows: int, size: int, device):
        self.size = size
        self.sums = torch.empty((rows, size + 1), dtype=torch.float64, device=device)

    def load(self, logprobs: torch.Tensor, perm: torch.Tensor, shift: torch.Tensor | None = None,
             rows: torch.Tensor | None = None) -> None:
        """Running sums of `logprobs` (minus `shift` per row, for raw logits) in sorted order, one
        row of `self.sums` per row; `rows` (int64): of those rows of `logprobs` only, in that order
        (a padded batch's padding rows, which feed no output, are never read)."""
        if logprobs.stride(1) != 1:
            logprobs = logprobs.contiguous()
        r = logprobs.shape[0] if rows is None else rows.numel()
        if r and self.size:
            shift_arg = self.sums if shift is None else shift.float().contiguous()  # unread without a shift
            _running_sums_kernel[(r,)](logprobs, logprobs.stride(0), perm, shift_arg, self.sums, self.size,
                                       self.sums if rows is None else rows, HAS_SHIFT=shift is not None,
                                       PICK_ROWS=rows is not None, BLOCK=_SCAN_BLOCK)
        elif r:
            self.sums[:r, 0] = 0.0

    def mass(self, row: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        n = row.numel()
        out = torch.empty(n, dtype=torch.float64, device=self.sums.device)
        if n:
            _range_mass_kernel[(triton.cdiv(n, _EDGE_BLOCK),)](self.sums, row.contiguous(), lo.contiguous(),
                                                               hi.contiguous(), out, n, self.size,
                                                               BLOCK=_EDGE_BLOCK)
        return out
