"""One rank's partial byte rows under sequence parallelism (rule `cover` / `within_token`).

`partial_one_pass_rows` is `bld_scale.convert.one_pass.byte_logprobs_one_pass` restricted to the
canonical tokens whose teacher rows this rank holds, without the final normalisation: the
unnormalised float64 log sums over byte rows `[lo, hi)` (`shard_plan.contribution_range`), to be
log-added with the other ranks' and normalised where the rows are read (`shard_plan.combine_rows`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from bld_scale.convert.backends import log_add_splits
from bld_scale.convert.byte_rows import EOT, NUM_BYTE_OUTCOMES, token_layout
from bld_scale.convert.shard_plan import token_ends
from bld_scale.tokenize.token_bytes import TokenBytes


def canonical_logprobs(local_logprobs: torch.Tensor, ids: Sequence[int], k0: int) -> torch.Tensor:
    """float64 log p(t_k) of the canonical tokens whose rows this rank holds (rows `k0..`)."""
    n = max(0, min(k0 + local_logprobs.shape[0], len(ids)) - k0)
    ids_t = torch.as_tensor(np.asarray(ids[k0:k0 + n], dtype=np.int64), device=local_logprobs.device)
    return local_logprobs[torch.arange(n, device=local_logprobs.device), ids_t].double()


@torch.no_grad()
def partial_one_pass_rows(local_logprobs: torch.Tensor, ids: Sequence[int], vocab: TokenBytes, k0: int,
                          prefix_before: torch.Tensor | float, lo: int, hi: int, *, eos_id: int | None = None,
                          within_token: bool = False, backend: str = "torch") -> torch.Tensor:
    """Unnormalised log rows `[hi - lo, 257]` (float64) of the tokens `k0..` held in `local_logprobs`.

    local_logprobs: this rank's teacher rows `[k0, k1)` of the window's `[L + 1, V]` (rows past the
      last canonical token, and padding, are ignored); prefix_before: log P(t_<k0), the exclusive
      prefix sum over the group (`shard_plan.exclusive_prefix`); `[lo, hi)`: this rank's
      `contribution_range`. Log-adding every rank's rows and normalising gives `byte_logprobs`.
    """
    device = local_logprobs.device
    acc = torch.full((max(hi - lo, 0), NUM_BYTE_OUTCOMES), -math.inf, dtype=torch.float64, device=device)
    canon = canonical_logprobs(local_logprobs, ids, k0)
    n_tok = canon.numel()
    if n_tok == 0 or hi <= lo:
        return acc
    data, starts = token_layout(ids, vocab)
    rows = local_logprobs[:n_tok]
    prefix = torch.as_tensor(prefix_before, dtype=torch.float64, device=device)
    log_prefix = prefix + torch.cat([canon.new_zeros(1), torch.cumsum(canon, 0)[:-1]])
    mine = starts[k0:k0 + n_tok]
    if eos_id is not None:  # EOT at the canonical boundaries this rank's tokens start at
        acc[torch.as_tensor(mine - lo, device=device), EOT] = log_prefix + rows[:, int(eos_id)].double()
    index = vocab.index
    k, end, node = index.walk(data, mine, max_end=len(data))
    keep = end < len(data)
    if within_token:
        keep &= end < token_ends(starts, len(data))[k0 + k]
    k, end, node = k[keep], end[keep], node[keep]
    if np.any(end >= hi):
        raise AssertionError(f"a split ends at byte row {int(end.max())}, past this rank's range end {hi}")
    memory = local_logprobs.numel() * local_logprobs.element_size()
    # local row totals are at most the group's, so this flags every edge the unsplit run would
    return log_add_splits(acc, rows, k, end - lo, node, log_prefix, index, memory, backend=backend)
