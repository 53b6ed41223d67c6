"""The one place a conversion mode is chosen: one text, a padded batch, a training batch's targets.

Modes (docs/byte-interface.md): "cover" and "within_token" read one teacher forward
(`bld_scale.convert.one_pass`); "exact" also runs tree-masked forwards of the teacher model
(`bld_scale.convert.exact`). Everything that needs teacher byte distributions (the training step,
the evaluation, the tools) comes here with the mode as a string.

A packed batch (`bld_scale.data.packing`) is converted window by window on each window's slice
of the packed log-probabilities, so its targets are the padded batch's rows laid end to end.

The one-pass modes read either log-probabilities or, fused, the teacher's raw logits with each
row's log-normaliser (`teacher_token_logits`): the `[B, L, V]` log-softmax is then never written,
which is one full write of the logits saved. `teacher_byte_targets` takes the fused path whenever
its caller does not also need the token log-probabilities.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from bld_scale.convert.backends import check_backend, log_normaliser_function
from bld_scale.convert.byte_rows import check_logprobs, pad_byte_rows
from bld_scale.convert.exact import BATCH_CHUNK_TOKENS, byte_logprobs_exact, exact_byte_targets
from bld_scale.convert.one_pass import byte_logprobs_one_pass, one_pass_texts
from bld_scale.data.packing import padded_teacher_view
from bld_scale.tokenize.token_bytes import TokenBytes

MODES = ("cover", "within_token", "exact")
# Modes whose targets come from the one teacher forward over the canonical tokens alone.
ONE_PASS_MODES = ("cover", "within_token")
# `(input_ids, attention_mask)`, or `(input_ids, None, position_ids)` for a packed batch (which
# the callable must forward with use_cache=False: see bld_scale.data.packing) -> logits.
TeacherForward = Callable[..., torch.Tensor]


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown conversion mode {mode!r}; choose one of {', '.join(MODES)} "
                         "('exact' needs the teacher model: see the exact-mode docs)")


@torch.no_grad()
def byte_logprobs(logprobs: torch.Tensor, ids: Sequence[int], vocab: TokenBytes, *,
                  eos_id: int | None = None, mode: str = "cover", backend: str = "torch",
                  log_normaliser: torch.Tensor | None = None, **exact) -> torch.Tensor:
    """Next-byte log-probabilities `[N + 1, 257]` of the teacher over one text.

    logprobs: `[L + 1, V]` teacher log-probabilities (float32 or bfloat16; computed in float32 /
      float64), row k = distribution of the token after BOS and the first k tokens of `ids`.
    ids: the L canonical teacher tokens of the text; vocab: their `TokenBytes`.
    eos_id: the teacher's end-of-sequence token; None gives EOT no mass before the end.
    mode: "cover" (default), "within_token", or "exact" (needs `teacher=`; further keyword
      arguments go to `bld_scale.convert.exact.byte_logprobs_exact`).
    backend: "torch" (default), "triton" or "auto" (triton on CUDA tensors when triton imports):
      what computes the running sums and log-adds the edges, in every mode (`bld_scale.convert.backends`);
      same numbers to float64 rounding.
    log_normaliser: `[L + 1]` per-row logsumexp when `logprobs` holds raw logits (one-pass modes;
      see `teacher_token_logits`).
    Rows whose every outcome has zero mass (possible only with -inf logits) are all -inf.
    """
    check_mode(mode)
    check_backend(backend)
    if mode == "exact" and log_normaliser is not None:
        raise ValueError("mode 'exact' reads log-probabilities, not raw logits: drop log_normaliser= "
                         "and pass torch.log_softmax(logits, -1)")
    if mode == "exact":
        return byte_logprobs_exact(logprobs, ids, vocab, eos_id=eos_id, backend=backend, **exact)
    if exact:
        raise TypeError(f"mode {mode!r} takes no {', '.join(exact)} (only mode 'exact' does)")
    return byte_logprobs_one_pass(logprobs, ids, vocab, eos_id=eos_id, within_token=mode == "within_token",
                                  backend=backend, log_normaliser=log_normaliser)


def byte_logprobs_batch(logprobs: torch.Tensor, ids: Sequence[Sequence[int]], vocab: TokenBytes, *,
                        eos_id: int | None = None, mode: str = "cover", backend: str = "torch",
                        log_normaliser: torch.Tensor | None = None, **exact):
    """Batched `byte_logprobs`.

    logprobs: padded `[B, L_max + 1, V]`; ids: B lists of canonical tokens (row b uses its first
    `len(ids[b]) + 1` rows); log_normaliser: `[B, L_max + 1]` when `logprobs` are raw logits. Returns `(out [B, N_max + 1, 257], mask [B, N_max + 1])`, padding
    rows all -inf and False in the mask; the numbers equal `byte_logprobs` example by example.
    """
    if logprobs.dim() != 3 or logprobs.shape[0] != len(ids):
        raise ValueError(f"logprobs must be [B, L_max + 1, V] with B = len(ids) = {len(ids)}; got "
                         f"{tuple(logprobs.shape)}")
    if mode in ONE_PASS_MODES and not exact:  # all texts in one pass (one_pass_texts)
        check_backend(backend)
        width = logprobs.shape[1]
        for b, seq in enumerate(ids):
            check_logprobs(logprobs[b, : len(seq) + 1], seq, vocab, eos_id)
        lse = None if log_normaliser is None else _flat_normaliser(log_normaliser, logprobs)
        return pad_byte_rows(one_pass_texts(logprobs.reshape(-1, logprobs.shape[-1]),
                                            [(b * width, seq) for b, seq in enumerate(ids)], vocab, eos_id=eos_id,
                                            within_token=mode == "within_token", backend=backend,
                                            log_normaliser=lse))
    rows = [byte_logprobs(logprobs[b, : len(seq) + 1], seq, vocab, eos_id=eos_id, mode=mode, backend=backend,
                          log_normaliser=None if log_normaliser is None else log_normaliser[b, : len(seq) + 1],
                          **exact)
            for b, seq in enumerate(ids)]
    return pad_byte_rows(rows)


def byte_logprobs_packed(logprobs: torch.Tensor, batch, vocab: TokenBytes, *, eos_id: int | None = None,
                         mode: str = "cover", backend: str = "torch",
                         log_normaliser: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`byte_logprobs` of each window of a packed batch, on its own slice of the packed row.

    logprobs: `[1, T, V]` over the packed teacher row (`log_normaliser` `[1, T]` when raw logits). Returns `(out [1, R, 257], mask [1, R])`,
    the windows' rows end to end (`batch.packing.byte_row_bounds`).
    """
    bounds = batch.packing.teacher_bounds
    check_mode(mode)
    check_backend(backend)
    if mode not in ONE_PASS_MODES:
        raise ValueError(f"byte_logprobs_packed converts the one-pass modes {ONE_PASS_MODES}; mode {mode!r} "
                         "goes through teacher_byte_targets")
    for b, ids in enumerate(batch.teacher_ids):
        check_logprobs(logprobs[0, bounds[b]:bounds[b + 1]], ids, vocab, eos_id)
    lse = None if log_normaliser is None else _flat_normaliser(log_normaliser, logprobs)
    rows = one_pass_texts(logprobs[0], [(bounds[b], ids) for b, ids in enumerate(batch.teacher_ids)], vocab,
                          eos_id=eos_id, within_token=mode == "within_token", backend=backend, log_normaliser=lse)
    return _end_to_end(rows, batch)


def _flat_normaliser(log_normaliser: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    if tuple(log_normaliser.shape) != tuple(logprobs.shape[:-1]):
        raise ValueError(f"log_normaliser must hold one value per row of the logits, shape "
                         f"{tuple(logprobs.shape[:-1])}; got {tuple(log_normaliser.shape)}")
    return log_normaliser.reshape(-1)


def _end_to_end(rows, batch) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.cat(list(rows), dim=0).unsqueeze(0)
    if out.shape[1] != batch.packing.byte_row_bounds[-1]:  # the layout's rows must be the conversion's
        raise RuntimeError(f"the packed windows' conversions have {out.shape[1]} byte rows but their layout "
                           f"expects {batch.packing.byte_row_bounds[-1]}")
    return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)


def _teacher_logits(teacher_forward: TeacherForward, batch) -> torch.Tensor:
    packing = getattr(batch, "packing", None)
    args = (batch.teacher_input_ids, batch.teacher_attention_mask) if packing is None else \
        (batch.teacher_input_ids, None, packing.teacher_position_ids)
    with torch.no_grad():
        logits = teacher_forward(*args)
        return getattr(logits, "logits", logits)


def teacher_token_logits(teacher_forward: TeacherForward, batch, backend: str = "torch"):
    """The teacher's raw one-pass logits (as the model returns them: float32 or bfloat16, not
    copied) and their float32 per-row log-normaliser `[B, L_max + 1]` (`[1, T]` packed): what
    the fused one-pass conversion reads instead of `teacher_token_logprobs`."""
    logits = _teacher_logits(teacher_forward, batch)
    lse = log_normaliser_function(backend, logits.device)(logits.reshape(-1, logits.shape[-1]))
    return logits, lse.view(logits.shape[:-1])


def teacher_token_logprobs(teacher_forward: TeacherForward, batch) -> torch.Tensor:
    """The teacher's one-pass `[B, L_max + 1, V]` token log-probabilities (float32) over a batch.

    `teacher_forward(input_ids, attention_mask)` returns logits (or an output with `.logits`);
    `batch` needs `teacher_input_ids` and `teacher_attention_mask`. A packed batch gives `[1, T, V]`
    from `teacher_forward(input_ids, None, position_ids)`.
    """
    with torch.no_grad():
        return torch.log_softmax(_teacher_logits(teacher_forward, batch).float(), dim=-1)


class TeacherTargets(NamedTuple):
    byte_logprobs: torch.Tensor  # [B, N_max + 1, 257], padding rows -inf
    mask: torch.Tensor  # [B, N_max + 1], True on a text's rows
    token_logprobs: torch.Tensor | None  # [B, L_max + 1, V] when the one-pass forward was made


def teacher_byte_targets(batch, vocab: TokenBytes, *, conversion: str, teacher_forward: TeacherForward | None,
                         teacher_model=None, eos_id: int | None = None,
                         exact_chunk_tokens: int = BATCH_CHUNK_TOKENS,
                         agree_forwards: Callable[[int], int] | None = None,
                         with_token_logprobs: bool = False, backend: str = "torch") -> TeacherTargets:
    """The teacher's next-byte targets of a padded (or packed) batch, for any conversion mode.

    batch: anything with `teacher_input_ids`, `teacher_attention_mask` (`[B, L_max + 1]`, BOS
      first) and `teacher_ids` (B lists of canonical tokens), e.g. a `DistillBatch`.
    teacher_forward: `(input_ids, attention_mask) -> logits`, the one-pass forward the modes in
      `ONE_PASS_MODES` read. teacher_model: the module (or engine) behind it, which mode "exact"
      calls with tree masks, at most `exact_chunk_tokens` query positions per forward (the
      canonical tokens ride in the first one, so exact makes no one-pass forward).
    agree_forwards: for a sharded teacher, maps this rank's count of exact-mode forwards to the
      count every rank makes (see `exact.exact_byte_targets`).
    with_token_logprobs: make the one-pass forward in mode "exact" too (before the tree
      forwards), for callers that also need the teacher's token log-probabilities.
    backend: what computes the running sums and the log-add of every mode ("torch", "triton", "auto":
      see `byte_logprobs`; recipe key distill.conversion_backend).
    Returns `TeacherTargets(byte_logprobs, mask, token_logprobs)`; `token_logprobs` is None when
    no one-pass forward was made, or when the one-pass modes read the raw logits (fused: whenever
    `with_token_logprobs` is False). A packed batch (`batch.packing` set) gives `[1, R, 257]` / `[1, T, V]`
    (its windows end to end); mode "exact" then makes its tree forwards window by window, as for a
    padded batch.
    """
    packed = getattr(batch, "packing", None) is not None
    check_mode(conversion)
    check_backend(backend)
    logprobs = scores = lse = None
    if conversion in ONE_PASS_MODES or with_token_logprobs:
        if teacher_forward is None:
            raise ValueError(f"conversion {conversion!r} reads the teacher's forward: pass teacher_forward=")
        if conversion in ONE_PASS_MODES and not with_token_logprobs:  # fused: raw logits + normalisers
            scores, lse = teacher_token_logits(teacher_forward, batch, backend)
        else:
            logprobs = scores = teacher_token_logprobs(teacher_forward, batch)
    if conversion == "exact":
        if teacher_model is None:
            raise ValueError("conversion 'exact' needs the teacher model (teacher_model=...)")
        view = padded_teacher_view(batch) if packed else batch
        q, mask = exact_byte_targets(teacher_model, view, vocab, eos_id, max_tokens=exact_chunk_tokens,
                                     agree_forwards=agree_forwards, backend=backend)
        if packed:
            lengths = mask.sum(dim=1).tolist()
            q, mask = _end_to_end((q[b, :n] for b, n in enumerate(lengths)), batch)
    elif packed:
        q, mask = byte_logprobs_packed(scores, batch, vocab, eos_id=eos_id, mode=conversion, backend=backend,
                                       log_normaliser=lse)
    else:
        q, mask = byte_logprobs_batch(scores, batch.teacher_ids, vocab, eos_id=eos_id, mode=conversion,
                                      backend=backend, log_normaliser=lse)
    return TeacherTargets(q, mask, logprobs)
