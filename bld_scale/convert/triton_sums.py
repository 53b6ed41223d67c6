"""Running sums and range masses of one-pass conversions in Triton kernels (backend "triton").

The same numbers as `bld_scale.convert.running_sums.RunningSums`, with less memory traffic: one
kernel reads each row of log-probabilities once, gathered through the sorted-vocabulary
permutation inside the kernel, exponentiates to float32 probabilities (as the torch path does;
computed with the float64 exp, which is accurate on GPUs where the float32 one is not) and writes the
float64 running sums `S(0..size)`; a second kernel turns each edge's sorted range `[lo, hi)` into
its mass `S(hi) - S(lo)` (float64, clamped at 0). No float32 copy of the gathered row and no
float64 copy before the scan are materialised (8 bytes per entry instead of 20).

Precision: sums are float64 within a block (`tl.cumsum`) and the block totals are carried in
float64, so a range mass keeps the torch path's absolute error (~1e-15 of the row's total); the
order of the float64 additions differs from `torch.cumsum`, so results agree to that rounding,
not bit for bit. Compensated float32 was not used: float64 costs little next to the gather, and
it keeps `refine_small_masses` (which assumes float64 running sums) valid unchanged.

Fused from raw logits (`bld_scale.convert.dispatch.teacher_token_logits`): a third kernel computes
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


@triton.jit
def _running_sums_kernel(lp_ptr, lp_row_stride, perm_ptr, shift_ptr, sums_ptr, size, HAS_SHIFT: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lp_row = lp_ptr + row * lp_row_stride
    shift = tl.load(shift_ptr + row).to(tl.float32) if HAS_SHIFT else 0.0
    sums_row = sums_ptr + row * (size + 1)
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

    def load(self, logprobs: torch.Tensor, perm: torch.Tensor, shift: torch.Tensor | None = None) -> None:
        if logprobs.stride(1) != 1:
            logprobs = logprobs.contiguous()
        r = logprobs.shape[0]
        if r and self.size:
            shift_arg = self.sums if shift is None else shift.float().contiguous()  # unread without a shift
            _running_sums_kernel[(r,)](logprobs, logprobs.stride(0), perm, shift_arg, self.sums, self.size,
                                       HAS_SHIFT=shift is not None, BLOCK=_SCAN_BLOCK)
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
