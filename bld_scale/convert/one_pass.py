"""Teacher next-token distributions -> next-byte distributions (the `cover` rule).

For a text `x` (bytes `0..N`) tokenized canonically as `t_1..t_L` with starts `s_k`, and the
teacher's rows `p_k = p(. | BOS, t_<k)`, the next-byte distribution at offset `n` is

    q_n(b)   ∝  sum_{k: s_k <= n}  P(t_<k) · M_k(x[s_k..n) + b)          (mode "cover")
    q_n(EOT) ∝  P(t_<k) · p_k(EOS)   when n = s_k is a canonical boundary

with `M_k(u)` the mass `p_k` puts on tokens whose bytes start with `u`. Mode "within_token" keeps
only the canonical token that holds offset `n` (the largest `s_k <= n`), which leaks the teacher's
token boundaries into the targets; it is kept for comparison. Both are normalised over the 257
outcomes (256 bytes + EOT, column `EOT`); row `N` puts all its mass on EOT.

How it stays at the cost of one pass over the logits:
* The vocabulary is sorted by bytes once (`TokenBytes.index`), so every `M_k(u + b)` is the
  difference of two entries of `C_k`, the running sum of `p_k` in sorted order: one gather, exp
  and cumsum per row (float64, so that small masses survive the subtraction).
* The prefixes `x[s_k..n)` that some token starts with are found by walking the index's trie along
  the text from every start at once; the walk stops where no token continues, which is exactly
  the window of the longest token (`n + 1 - s_k <= max token length`): no approximation.
* The children of a trie node are the next bytes `b` with non-zero `M_k(u + b)`; their ranges tile
  the node's range, so each (k, n) split costs one gather per child.
* Splits are mixed in log space (prefix probabilities underflow after a few tokens); rows are
  processed in chunks of positions so the extra memory stays a small fraction of the logits.

Byte rows are indexed by the tokens' bytes `b"".join(token_bytes(t_k))` (`byte_rows`). A
SentencePiece teacher's dummy-prefix space is one extra row in front of the text
(`bld_scale.tokenize.token_bytes.row_shift`). Most callers go through
`bld_scale.convert.dispatch.byte_logprobs(..., mode=...)`, which picks this module or `exact`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from bld_scale.convert.backends import running_sums_class
from bld_scale.convert.byte_rows import EOT, check_logprobs, gather_logprobs, normalise_rows, start_rows
from bld_scale.convert.running_sums import logaddexp_scatter, refine_small_masses, split_edges
from bld_scale.tokenize.token_bytes import TokenBytes


def one_pass_splits(data: bytes, starts: np.ndarray, vocab: TokenBytes, *, within_token: bool = False):
    """(k, n, node) for every split of every offset n < N: prefix data[s_k:n] is trie node."""
    index = vocab.index
    k, end, node = index.walk(data, starts, max_end=len(data))
    keep = end < len(data)  # row N is all EOT
    if within_token:
        # only the canonical token holding offset n: s_k <= n < e_k
        token_end = np.append(starts[1:], len(data))
        keep &= end < token_end[k]
    return k[keep], end[keep], node[keep]


@torch.no_grad()
def byte_logprobs_one_pass(logprobs: torch.Tensor, ids: Sequence[int], vocab: TokenBytes, *,
                           eos_id: int | None = None, within_token: bool = False,
                           backend: str = "torch", log_normaliser: torch.Tensor | None = None) -> torch.Tensor:
    """Next-byte log-probabilities `[N + 1, 257]` of mode "cover" (or "within_token").

    logprobs: `[L + 1, V]` teacher log-probabilities (float32 or bfloat16; computed in float32 /
      float64), row k = distribution of the token after BOS and the first k tokens of `ids`.
    ids: the L canonical teacher tokens of the text; vocab: their `TokenBytes`.
    eos_id: the teacher's end-of-sequence token; None gives EOT no mass before the end.
    within_token: keep only the canonical token holding each offset (mode "within_token").
    backend: "torch", "triton" or "auto": what computes the running sums (`bld_scale.convert.backends`).
    log_normaliser: `[L + 1]` logsumexp of each row when `logprobs` holds the teacher's raw logits
      (float32 or bfloat16): the conversion then reads the logits once and never writes their
      log-softmax (`bld_scale.convert.dispatch.teacher_token_logits`).
    Rows whose every outcome has zero mass (possible only with -inf logits) are all -inf.
    """
    check_logprobs(logprobs, ids, vocab, eos_id)
    device = logprobs.device
    running_sums = running_sums_class(backend, device)
    if log_normaliser is not None and tuple(log_normaliser.shape) != (logprobs.shape[0],):
        raise ValueError(f"log_normaliser must hold one value per row of the logits, shape "
                         f"({logprobs.shape[0]},); got {tuple(log_normaliser.shape)}")
    data, starts, out, log_prefix = start_rows(logprobs, ids, vocab, log_normaliser)
    if not data:
        return out.float()

    if eos_id is not None:  # EOT at canonical boundaries n = s_k
        rows = torch.arange(len(ids), device=device)
        eot = log_prefix[: len(ids)] + gather_logprobs(logprobs, rows, torch.full_like(rows, int(eos_id)),
                                                       log_normaliser)
        out[torch.as_tensor(starts, device=device), EOT] = eot

    split_k, split_n, split_node = one_pass_splits(data, starts, vocab, within_token=within_token)
    index = vocab.index
    memory = logprobs.numel() * logprobs.element_size()
    edges = split_edges(logprobs[: len(ids)], split_k, split_n, split_node, log_prefix, index, memory,
                        running_sums=running_sums, log_normaliser=log_normaliser)
    if edges["value"].numel():
        tables = index.torch_tables(device)
        eot_only = out.clone()
        logaddexp_scatter(out.view(-1), edges["target"], edges["value"])
        if refine_small_masses(out, edges, log_prefix, logprobs, tables["perm"], log_normaliser):
            out = eot_only
            logaddexp_scatter(out.view(-1), edges["target"], edges["value"])
    return normalise_rows(out)
