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

Byte rows are indexed by the tokens' bytes `b"".join(token_bytes(t_k))`. A SentencePiece teacher's
dummy-prefix space is one extra row in front of the text (see `row_shift`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from bld_scale.tokenize.token_bytes import TokenBytes

EOT = 256
NUM_BYTE_OUTCOMES = 257
MODES = ("cover", "within_token", "exact")  # "exact": bld_scale.byteconv_exact
# Extra working memory allowed per chunk of rows, as a fraction of the logits' own size.
_CHUNK_MEMORY_FRACTION = 0.2
_MIN_CHUNK_BYTES = 64 << 20


def row_shift(ids: Sequence[int], spans: Sequence[tuple[int, int]], vocab: TokenBytes) -> int:
    """Rows of `byte_logprobs` before the text's byte 0: 1 for a dummy-prefix space, else 0."""
    if not ids:
        return 0
    first = vocab.token_bytes(ids[0]) or b""
    return len(first) - (spans[0][1] - spans[0][0])


def _token_layout(ids: Sequence[int], vocab: TokenBytes) -> tuple[bytes, np.ndarray]:
    pieces = []
    for pos, i in enumerate(ids):
        piece = vocab.token_bytes(int(i)) if 0 <= int(i) < vocab.vocab_size else None
        if piece is None:
            raise ValueError(
                f"{vocab.name}: ids[{pos}] = {int(i)} has no bytes (a special or padding token); "
                "byte_logprobs takes the text's canonical tokens only, without BOS/EOS: pass the "
                "ids from TokenBytes.encode(text)")
        pieces.append(piece)
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(pieces) else np.zeros(0, np.int64)
    return b"".join(pieces), starts.astype(np.int64)


def _start_rows(logprobs: torch.Tensor, ids: Sequence[int], vocab: TokenBytes):
    """Common start of every mode: token bytes and starts, the output with its all-EOT last row,
    and log P(t_<k) for k = 0..L (float64: prefix probabilities underflow fast)."""
    device = logprobs.device
    data, starts = _token_layout(ids, vocab)
    out = torch.full((len(data) + 1, NUM_BYTE_OUTCOMES), -math.inf, dtype=torch.float64, device=device)
    out[len(data), EOT] = 0.0
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=device)
    canon = logprobs[torch.arange(len(ids), device=device), ids_t].double()
    log_prefix = torch.cat([canon.new_zeros(1), torch.cumsum(canon, 0)])
    return data, starts, out, log_prefix


def _check_inputs(logprobs: torch.Tensor, ids: Sequence[int], vocab: TokenBytes, eos_id, mode):
    if mode not in MODES:
        raise ValueError(f"unknown conversion mode {mode!r}; choose one of {', '.join(MODES)} "
                         "('exact' needs the teacher model: see the exact-mode docs)")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [L + 1, V]; got shape {tuple(logprobs.shape)}")
    if logprobs.shape[0] != len(ids) + 1:
        raise ValueError(f"logprobs has {logprobs.shape[0]} rows but ids has {len(ids)} tokens: "
                         "row k is the distribution after BOS and the first k tokens, so L + 1 rows "
                         "are needed (include the row after the last token)")
    if logprobs.shape[1] != vocab.vocab_size:
        raise ValueError(
            f"vocab-size mismatch: the teacher's logits have {logprobs.shape[1]} columns but "
            f"{vocab.name} describes {vocab.vocab_size} rows; pass the tokenizer that belongs to "
            "this teacher, with TokenBytes.from_tokenizer(tok, vocab_size=<model vocab size>) when "
            "the embedding is padded")
    if eos_id is not None and not 0 <= int(eos_id) < vocab.vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab.vocab_size})")


def _splits(data: bytes, starts: np.ndarray, vocab: TokenBytes, mode: str):
    """(k, n, node) for every split of every offset n < N: prefix data[s_k:n] is trie node."""
    index = vocab.index
    k, end, node = index.walk(data, starts, max_end=len(data))
    keep = end < len(data)  # row N is all EOT
    if mode == "within_token":
        # only the canonical token holding offset n: s_k <= n < e_k
        token_end = np.append(starts[1:], len(data))
        keep &= end < token_end[k]
    return k[keep], end[keep], node[keep]


def _chunk_rows(num_rows: int, sorted_size: int, logits_bytes: int) -> int:
    budget = max(int(_CHUNK_MEMORY_FRACTION * logits_bytes), _MIN_CHUNK_BYTES)
    per_row = (max(sorted_size, 1) + 1) * (4 + 8 + 8)  # float32 values, float64 copy and sums
    return int(max(1, min(num_rows, budget // per_row)))


@torch.no_grad()
def byte_logprobs(logprobs: torch.Tensor, ids: Sequence[int], vocab: TokenBytes, *,
                  eos_id: int | None = None, mode: str = "cover", **exact) -> torch.Tensor:
    """Next-byte log-probabilities `[N + 1, 257]` of the teacher over one text.

    logprobs: `[L + 1, V]` teacher log-probabilities (float32 or bfloat16; computed in float32 /
      float64), row k = distribution of the token after BOS and the first k tokens of `ids`.
    ids: the L canonical teacher tokens of the text; vocab: their `TokenBytes`.
    eos_id: the teacher's end-of-sequence token; None gives EOT no mass before the end.
    mode: "cover" (default), "within_token", or "exact" (needs `teacher=`; further keyword
      arguments go to `bld_scale.byteconv_exact.byte_logprobs_exact`).
    Rows whose every outcome has zero mass (possible only with -inf logits) are all -inf.
    """
    _check_inputs(logprobs, ids, vocab, eos_id, mode)
    if mode == "exact":
        from bld_scale.convert.exact import byte_logprobs_exact

        return byte_logprobs_exact(logprobs, ids, vocab, eos_id=eos_id, **exact)
    if exact:
        raise TypeError(f"mode {mode!r} takes no {', '.join(exact)} (only mode 'exact' does)")
    device = logprobs.device
    data, starts, out, log_prefix = _start_rows(logprobs, ids, vocab)
    if not data:
        return out.float()

    if eos_id is not None:  # EOT at canonical boundaries n = s_k
        eot = log_prefix[: len(ids)] + logprobs[: len(ids), int(eos_id)].double()
        out[torch.as_tensor(starts, device=device), EOT] = eot

    split_k, split_n, split_node = _splits(data, starts, vocab, mode)
    index = vocab.index
    memory = logprobs.numel() * logprobs.element_size()
    edges = split_edges(logprobs[: len(ids)], split_k, split_n, split_node, log_prefix, index, memory)
    if edges["value"].numel():
        tables = index.torch_tables(device)
        eot_only = out.clone()
        _logaddexp_scatter(out.view(-1), edges["target"], edges["value"])
        if _refine_small_masses(out, edges, log_prefix, logprobs, tables["perm"]):
            out = eot_only
            _logaddexp_scatter(out.view(-1), edges["target"], edges["value"])
    # Normalise over the 257 outcomes; rows without any mass stay -inf.
    norm = torch.logsumexp(out, dim=1, keepdim=True)
    out = torch.where(torch.isfinite(norm), out - norm, out)
    return out.float()


# A difference of float64 running sums of a distribution is exact to about this much, absolutely.
_RUNNING_SUM_ERROR = 1e-15
# An edge is recomputed directly when that error could move its row by more than this, relatively.
_REFINE_TOLERANCE = 1e-9


def _refine_small_masses(out, edges, log_prefix, logprobs, perm) -> bool:
    """Recompute, by direct float64 sums, the masses too small for running-sum differences.

    A mass below ~1e-15 is lost in `S(hi) - S(lo)`. It matters only when its whole row n is made
    of such masses (a teacher that gave the text's tokens vanishing probability); those edges
    are found from the first pass's row totals and summed directly. Realistic teachers need none.
    """
    row_total = torch.logsumexp(out, dim=1)
    n = edges["target"] // NUM_BYTE_OUTCOMES
    bound = log_prefix[edges["k"]] + math.log(_RUNNING_SUM_ERROR) - row_total[n]
    flagged = torch.nonzero(bound > math.log(_REFINE_TOLERANCE)).flatten()
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
        vals = logprobs[k[sl][seg], pos].double().exp()
        mass[sl] = torch.zeros(w.numel(), dtype=torch.float64, device=out.device).index_add_(0, seg, vals)
    edges["value"][flagged] = torch.log(mass) + log_prefix[k]
    return True


def split_edges(rows: torch.Tensor, split_row: np.ndarray, split_end: np.ndarray, split_node: np.ndarray,
                log_weight: torch.Tensor, index, memory_bytes: int) -> dict:
    """One edge per (split, next byte): `log_weight[row] + log M_row(prefix + byte)` and its cell.

    Split s reads distribution `rows[split_row[s]]` at the trie node `split_node[s]` and feeds
    output row `split_end[s]`. Returns tensors `k` (row), `lo`, `hi` (sorted range), `target`
    (flat output cell) and `value`, shared by `cover` and `exact`.
    """
    device = rows.device
    tables = index.torch_tables(device)
    counts = index.child_count[split_node]
    order = np.argsort(split_row, kind="stable")
    split_row, split_end, split_node, counts = split_row[order], split_end[order], split_node[order], counts[order]
    edge_offsets = np.concatenate([[0], np.cumsum(counts)])
    sorted_size = index.perm.size
    chunk = _chunk_rows(rows.shape[0], sorted_size, memory_bytes)
    running = _RunningSums(chunk, sorted_size, device)
    edges = {"k": [], "lo": [], "hi": [], "target": [], "value": []}
    for k0 in range(0, rows.shape[0], chunk):
        k1 = min(k0 + chunk, rows.shape[0])
        p0, p1 = np.searchsorted(split_row, [k0, k1])
        if p0 == p1:
            continue
        running.load(rows[k0:k1], tables["perm"])
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


class _RunningSums:
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

    def load(self, logprobs: torch.Tensor, perm: torch.Tensor) -> None:
        r = logprobs.shape[0]
        vals = self.values[:r]
        if logprobs.dtype == vals.dtype:
            torch.index_select(logprobs, 1, perm, out=vals)
        else:
            vals.copy_(logprobs.index_select(1, perm))
        vals.exp_()
        self.wide[:r, 1:].copy_(vals)
        torch.cumsum(self.wide[:r], dim=1, out=self.sums[:r])

    def mass(self, row: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        flat = self.sums.view(-1)
        base = row * (self.size + 1)
        return (flat.index_select(0, base + hi) - flat.index_select(0, base + lo)).clamp_min(0.0)


def _logaddexp_scatter(acc: torch.Tensor, target: torch.Tensor, value: torch.Tensor) -> None:
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


def byte_logprobs_batch(logprobs: torch.Tensor, ids: Sequence[Sequence[int]], vocab: TokenBytes, *,
                        eos_id: int | None = None, mode: str = "cover", **exact):
    """Batched `byte_logprobs` for the pipeline.

    logprobs: padded `[B, L_max + 1, V]`; ids: B lists of canonical tokens (row b uses its first
    `len(ids[b]) + 1` rows). Returns `(out [B, N_max + 1, 257], mask [B, N_max + 1])`, padding
    rows all -inf and False in the mask; the numbers equal `byte_logprobs` example by example.
    """
    if logprobs.dim() != 3 or logprobs.shape[0] != len(ids):
        raise ValueError(f"logprobs must be [B, L_max + 1, V] with B = len(ids) = {len(ids)}; got "
                         f"{tuple(logprobs.shape)}")
    rows = [byte_logprobs(logprobs[b, : len(seq) + 1], seq, vocab, eos_id=eos_id, mode=mode, **exact)
            for b, seq in enumerate(ids)]
    return pad_byte_rows(rows)


def pad_byte_rows(rows: Sequence[torch.Tensor]):
    """Stack per-text `[N_b + 1, 257]` rows into `(out [B, N_max + 1, 257], mask [B, N_max + 1])`."""
    n_max = max(r.shape[0] for r in rows)
    device = rows[0].device
    out = torch.full((len(rows), n_max, NUM_BYTE_OUTCOMES), -math.inf, device=device)
    mask = torch.zeros((len(rows), n_max), dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
        mask[b, : r.shape[0]] = True
    return out, mask
