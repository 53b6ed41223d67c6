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

import math
from typing import Sequence

import numpy as np
import torch

from bld_scale.convert.backends import log_add_splits, resolve_backend
from bld_scale.convert.byte_rows import (EOT, NUM_BYTE_OUTCOMES, check_logprobs, gather_logprobs, normalise_rows,
                                        token_layout)
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
    backend: "torch", "triton" or "auto": what computes the running sums and the log-add of the
      edges (`bld_scale.convert.backends`).
    log_normaliser: `[L + 1]` logsumexp of each row when `logprobs` holds the teacher's raw logits
      (float32 or bfloat16): the conversion then reads the logits once and never writes their
      log-softmax (`bld_scale.convert.dispatch.teacher_token_logits`).
    Rows whose every outcome has zero mass (possible only with -inf logits) are all -inf.
    """
    check_logprobs(logprobs, ids, vocab, eos_id)
    if log_normaliser is not None and tuple(log_normaliser.shape) != (logprobs.shape[0],):
        raise ValueError(f"log_normaliser must hold one value per row of the logits, shape "
                         f"({logprobs.shape[0]},); got {tuple(log_normaliser.shape)}")
    return one_pass_texts(logprobs, [(0, ids)], vocab, eos_id=eos_id, within_token=within_token,
                          backend=backend, log_normaliser=log_normaliser)[0]


@torch.no_grad()
def one_pass_texts(rows: torch.Tensor, texts: Sequence[tuple[int, Sequence[int]]], vocab: TokenBytes, *,
                   eos_id: int | None = None, within_token: bool = False, backend: str = "torch",
                   log_normaliser: torch.Tensor | None = None) -> list[torch.Tensor]:
    """`byte_logprobs_one_pass` of several texts whose teacher rows lie in one `[R, V]` tensor.

    texts: `(first_row, ids)` per text: its `len(ids) + 1` rows start at `rows[first_row]` (a
    padded batch flattened: `b * (L_max + 1)`; a packed row: each window's start). All texts go
    through one set of running sums, one edge list and one log-add, so the device work does not
    grow a Python loop per text (only the host-side trie walks are per text); the numbers are those
    of converting each text alone (the same sums per row, the same additions per cell).
    log_normaliser: `[R]`, when `rows` are raw logits. Returns one `[N_b + 1, 257]` tensor per text.
    """
    device = rows.device
    resolve_backend(backend, device)  # refuse what cannot run before any work
    layouts = [token_layout(ids, vocab) for _, ids in texts]
    first = [int(f) for f, _ in texts]
    lengths = [len(ids) for _, ids in texts]
    out_offsets = np.concatenate([[0], np.cumsum([len(data) + 1 for data, _ in layouts])])
    out = torch.full((int(out_offsets[-1]), NUM_BYTE_OUTCOMES), -math.inf, dtype=torch.float64, device=device)
    out[torch.as_tensor(out_offsets[1:] - 1, device=device), EOT] = 0.0  # each text's last row: all EOT

    # log P(t_<k) of every text, k = 0..L_b, at its rows' places (rows of no text: -inf)
    l_max = max(lengths, default=0)
    token_row = torch.as_tensor(_row_ranges(first, lengths), device=device)
    token_id = torch.as_tensor(np.concatenate([np.asarray(ids, dtype=np.int64) for _, ids in texts]), device=device)
    canon = torch.zeros((len(texts), l_max), dtype=torch.float64, device=device)
    position = np.arange(l_max + 1)[None, :]
    canon[torch.as_tensor(position[:, :-1] < np.asarray(lengths)[:, None], device=device)] = \
        gather_logprobs(rows, token_row, token_id, log_normaliser)
    prefix = torch.cat([canon.new_zeros(len(texts), 1), torch.cumsum(canon, 1)], dim=1)
    log_prefix = torch.full((rows.shape[0],), -math.inf, dtype=torch.float64, device=device)
    prefix_row = torch.as_tensor(_row_ranges(first, [n + 1 for n in lengths]), device=device)
    log_prefix[prefix_row] = prefix[torch.as_tensor(position <= np.asarray(lengths)[:, None], device=device)]

    if eos_id is not None and token_row.numel():  # EOT at canonical boundaries n = s_k
        at = np.concatenate([off + starts for off, (_, starts) in zip(out_offsets, layouts)])
        eot = log_prefix[token_row] + gather_logprobs(rows, token_row, torch.full_like(token_row, int(eos_id)),
                                                      log_normaliser)
        out[torch.as_tensor(at, device=device), EOT] = eot

    splits = [one_pass_splits(data, starts, vocab, within_token=within_token) for data, starts in layouts]
    split_k = np.concatenate([k + f for (k, _, _), f in zip(splits, first)] or [np.zeros(0, np.int64)])
    split_n = np.concatenate([n + off for (_, n, _), off in zip(splits, out_offsets)] or [np.zeros(0, np.int64)])
    split_node = np.concatenate([node for _, _, node in splits] or [np.zeros(0, np.int64)])
    memory = rows.numel() * rows.element_size()
    out = log_add_splits(out, rows, split_k, split_n, split_node, log_prefix, vocab.index, memory, backend=backend,
                         log_normaliser=log_normaliser)
    out = normalise_rows(out)
    return [out[int(a):int(b)] for a, b in zip(out_offsets[:-1], out_offsets[1:])]


def _row_ranges(first: list[int], counts: list[int]) -> np.ndarray:
    """`first[i] + 0..counts[i]-1` for every text, end to end (int64)."""
    return np.concatenate([np.arange(f, f + n, dtype=np.int64) for f, n in zip(first, counts)])
