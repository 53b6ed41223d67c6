"""The byte rows every conversion mode fills: the 257 outcomes, the text's token bytes, the start.

A conversion of one text returns `[N + 1, 257]` log-probabilities: row `n` is the next-byte
distribution after the first `n` bytes of `b"".join(token_bytes(t_k))`, columns 0..255 the bytes
and column `EOT` the end of the text; row `N` puts all its mass on EOT. A SentencePiece teacher's
dummy-prefix space is one extra row in front of the text (`bld_scale.tokenize.token_bytes.row_shift`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from bld_scale.tokenize.token_bytes import TokenBytes

EOT = 256
NUM_BYTE_OUTCOMES = 257


def token_layout(ids: Sequence[int], vocab: TokenBytes) -> tuple[bytes, np.ndarray]:
    """The tokens' bytes joined, and the offset where each token starts."""
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


def start_rows(logprobs: torch.Tensor, ids: Sequence[int], vocab: TokenBytes,
               log_normaliser: torch.Tensor | None = None):
    """Common start of every mode: token bytes and starts, the output with its all-EOT last row,
    and log P(t_<k) for k = 0..L (float64: prefix probabilities underflow fast).

    log_normaliser: when given, `logprobs` holds raw logits and row k's log-probabilities are
    `logprobs[k] - log_normaliser[k]` (`gather_logprobs`)."""
    device = logprobs.device
    data, starts = token_layout(ids, vocab)
    out = torch.full((len(data) + 1, NUM_BYTE_OUTCOMES), -math.inf, dtype=torch.float64, device=device)
    out[len(data), EOT] = 0.0
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=device)
    canon = gather_logprobs(logprobs, torch.arange(len(ids), device=device), ids_t, log_normaliser)
    log_prefix = torch.cat([canon.new_zeros(1), torch.cumsum(canon, 0)])
    return data, starts, out, log_prefix


def gather_logprobs(logprobs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                    log_normaliser: torch.Tensor | None = None) -> torch.Tensor:
    """float64 log-probabilities at (rows, cols): of log-probabilities, or of raw logits when their
    rows' log-normaliser is given (then `logit - logsumexp(row)`)."""
    vals = logprobs[rows, cols].double()
    return vals if log_normaliser is None else vals - log_normaliser[rows].double()


def check_logprobs(logprobs: torch.Tensor, ids: Sequence[int], vocab: TokenBytes, eos_id) -> None:
    """Refuse, with the fix, one-pass log-probabilities that do not belong to these ids and vocab."""
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


def normalise_rows(out: torch.Tensor) -> torch.Tensor:
    """Normalise each row over the 257 outcomes (float32 out); rows without any mass stay -inf."""
    norm = torch.logsumexp(out, dim=1, keepdim=True)
    return torch.where(torch.isfinite(norm), out - norm, out).float()


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
