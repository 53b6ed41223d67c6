"""Parts (a) and (b) of tools/gpu_check.py: the conversion, and one distillation step, in this process.

(a) `part_conversion`: `byte_logprobs_batch` against `torch.log_softmax` on the same `[B, L + 1, V]`
    teacher log-probabilities (interleaved repeats, median of the paired ratios; logits shaped like
    a language model's, from tools/bench_byteconv.py), the conversion's extra peak memory over the
    logits, and max |dp| between the device's conversion and a reference on a short sequence (the
    CPU's on a GPU run; on a CPU run the same CPU conversion fed float64 log-probabilities). The
    conversion runs on backend "auto" (on a GPU: the Triton kernels, running sums and the edges'
    log-add), next to the torch backend and the fused path (raw logits); the torch operators and
    Triton launches of one call of each are recorded (`launches`).
(b) `part_step`: a plain loop (no DeepSpeed) over one batch of `windows` windows: teacher forward
    (+ float32 log-softmax, as the step does), the conversion, a CE-only step and a BLD step, each a
    `bld_scale.train.step.distill_step` with the recipe's DistillConfig + backward + clip + AdamW
    (fused on GPU), under bf16 autocast on GPU (fp32 on CPU, as the recipe's precision `auto`).
    Times are medians of `repeats` rounds after `warmup` rounds, the four interleaved. On a GPU with
    liger_kernel, a fifth: the BLD step of a copy of the student with Liger Kernel's layers and fused
    token CE (`student.liger_layers`, `student.liger_fused_ce`; its own AdamW), after one step of
    both copies from the same weights compares their losses and gradients (`liger_agreement`);
    each step's peak memory is recorded (`peak_memory_bytes_by_op`). Elsewhere `liger_skipped` says why not.

Every timer synchronises the device before it starts and before it stops.
"""
from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import math
import statistics
import time

import torch

import bench_byteconv as bench
import gpu_check_assets as assets
from bld_scale.train.throughput import step_flops  # the pipeline's metrics use the same formula


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(seconds, result) of `fn()`, the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def extra_peak_bytes(fn, device: torch.device) -> tuple[int | None, str]:
    """Peak memory `fn()` adds over what is allocated before it (its result included), and how.

    CUDA: `max_memory_allocated` after `reset_peak_memory_stats`, minus `memory_allocated` before.
    CPU (Linux): the resident-set high-water mark after resetting it (`/proc/self/clear_refs`),
    minus the resident set before; approximate (the allocator may reuse freed pages).
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        sync(device)
        extra = torch.cuda.max_memory_allocated(device) - base
        del result
        return int(extra), "torch.cuda.max_memory_allocated - memory_allocated before"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None, "unavailable (no /proc/self/clear_refs)"
    base = _status_bytes("VmHWM")
    result = fn()
    peak = _status_bytes("VmHWM")
    del result
    if base is None or peak is None:
        return None, "unavailable (no VmHWM)"
    # VmHWM is max(the kernel's recorded mark, the resident set now), and the kernel records the mark
    # lazily (at unmaps, not when pages go back with madvise): a run that grows and then gives
    # memory back can read below the start's reading (CI saw -0.05x). The high water since the
    # start is at least the start, by definition.
    return max(peak, base) - base, "resident-set high-water mark (VmHWM after clear_refs), approximate"


def max_abs_dp(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |exp(a) - exp(b)| over two `[N + 1, 257]` log-probability tables (-inf is 0)."""
    return float((a.double().exp() - b.double().exp()).abs().max())


def cover_reference(logprobs: torch.Tensor, ids, vocab, eos_id: int | None) -> torch.Tensor:
    """Mode "cover" summed directly in float64 from its definition (docs/byte-interface.md), as
    `[N + 1, 257]` log-probabilities: for offset n, every canonical start s_k <= n weighs, by
    P(t_<k), the mass of the tokens whose bytes start with x[s_k..n) + b; EOT takes P(t_<k)·p_k(EOS)
    at n = s_k; row N is all EOT. The tokens starting with a prefix are found by bisection in the
    byte-sorted token list; no trie, no running sums: a check on the conversion, for short texts."""
    pieces = [vocab.token_bytes(i) for i in ids]
    data = b"".join(pieces)
    starts = [0]
    for piece in pieces[:-1]:
        starts.append(starts[-1] + len(piece))
    rows = logprobs.double().cpu()
    log_prefix = [0.0]
    for k, i in enumerate(ids):
        log_prefix.append(log_prefix[-1] + float(rows[k, i]))
    extending = _TokensExtending(vocab)
    out = torch.full((len(data) + 1, 257), -math.inf, dtype=torch.float64)
    out[len(data), 256] = 0.0
    longest = vocab.max_token_len
    for n in range(len(data)):
        # starts a token's length or more back have no token continuing the text to n + 1
        last = bisect.bisect_right(starts, n) - 1
        splits = [k for k in range(last, -1, -1) if n - starts[k] < longest] or [last]
        scale = max(log_prefix[k] for k in splits)
        acc = torch.zeros(257, dtype=torch.float64)
        for k in splits:
            weight = math.exp(log_prefix[k] - scale)
            tokens, nexts = extending(data[starts[k]:n])
            if tokens.numel():
                acc.index_add_(0, nexts, weight * rows[k].index_select(0, tokens).exp())
            if starts[k] == n and eos_id is not None:
                acc[256] += weight * math.exp(float(rows[k, eos_id]))
        out[n] = torch.log(acc / acc.sum())
    return out


class _TokensExtending:
    """(ids, next bytes) of the tokens strictly longer than a prefix u that start with u."""

    def __init__(self, vocab):
        entries = sorted((b, v) for v, b in enumerate(vocab.all_token_bytes()) if b)
        self.keys = [b for b, _ in entries]
        self.ids = torch.tensor([v for _, v in entries], dtype=torch.long)
        self.width = max(len(b) for b in self.keys)
        table = torch.full((len(entries), self.width), -1, dtype=torch.long)
        for r, b in enumerate(self.keys):
            table[r, : len(b)] = torch.tensor(list(b))
        self.table = table
        self.cache: dict[bytes, tuple] = {}

    def __call__(self, u: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        if u not in self.cache:
            lo = bisect.bisect_left(self.keys, u)
            above = u.rstrip(b"\xff")  # the first byte string past every extension of u
            hi = (bisect.bisect_left(self.keys, above[:-1] + bytes([above[-1] + 1])) if above
                  else len(self.keys))
            nexts = self.table[lo:hi, len(u)] if len(u) < self.width else torch.zeros(0, dtype=torch.long)
            keep = nexts >= 0
            self.cache[u] = (self.ids[lo:hi][keep], nexts[keep])
        return self.cache[u]


# ---------------------------------------------------------------------- (a)
def part_conversion(ws) -> dict:
    """(a): the conversion's cost over log_softmax, its extra memory, device-vs-reference max |dp|."""
    from bld_scale.convert import byte_logprobs, byte_logprobs_batch

    p, device = ws.profile, ws.device
    vocab, eos = ws.conversion_vocab()
    B, L = p.conv_batch, p.conv_length
    ws.log(f"(a) {vocab.name}: V = {vocab.vocab_size:,}; B = {B}, L = {L:,}; making the logits")
    windows = bench.load_windows(vocab, L, B)
    lp = bench.make_logprobs(windows, vocab.vocab_size, device)  # [B, L + 1, V] float32 log-probabilities
    logits_bytes = lp.numel() * lp.element_size()

    from bld_scale.convert.backends import log_normaliser_function, resolve_backend

    backend = resolve_backend("auto", device)  # triton on CUDA when it imports
    # max |dp| on a short sequence, on the backend timed below (also the warm-up: the index's tables
    # reach the device here): against the CPU's torch backend on a GPU, and on any device against
    # the float64 sums of the definition
    short, n = windows[0][: p.dp_length], p.dp_length
    here = byte_logprobs(lp[0, : n + 1], short, vocab, eos_id=eos, backend=backend).cpu()
    definition = cover_reference(lp[0, : n + 1], short, vocab, eos)
    dp_definition = max_abs_dp(here, definition)
    if device.type == "cuda":
        how = "cpu"
        reference = byte_logprobs(lp[0, : n + 1].cpu(), short, vocab, eos_id=eos)
        dp = max_abs_dp(here, reference)
    else:
        how, reference, dp = "float64 definition", definition, dp_definition
    same_support = bool(torch.equal(torch.isfinite(here), torch.isfinite(reference)))
    ws.log(f"(a) max |dp| over {here.shape[0]:,} byte rows: {device.type} vs {how} {dp:.2e}"
           + (f", vs the float64 definition {dp_definition:.2e}" if device.type == "cuda" else ""))

    norm = log_normaliser_function(backend, device)

    def fused():  # what training runs: raw logits in (these log-probabilities are valid logits)
        lse = norm(lp.view(-1, lp.shape[-1])).view(lp.shape[:-1])
        return byte_logprobs_batch(lp, windows, vocab, eos_id=eos, backend=backend, log_normaliser=lse)

    ops = {"conversion": lambda: byte_logprobs_batch(lp, windows, vocab, eos_id=eos, backend=backend),
           "conversion_torch": lambda: byte_logprobs_batch(lp, windows, vocab, eos_id=eos, backend="torch"),
           "fused": fused,
           "log_softmax": lambda: torch.log_softmax(lp, dim=-1)}
    times = bench.interleaved(ops, p.warmup + p.repeats, device)
    times = {k: v[p.warmup:] for k, v in times.items()}
    ratio = bench.paired_ratio(times, "conversion", "log_softmax")
    torch_ratio = bench.paired_ratio(times, "conversion_torch", "log_softmax")
    fused_ratio = bench.paired_ratio(times, "fused", "log_softmax")
    conv_s, soft_s = statistics.median(times["conversion"]), statistics.median(times["log_softmax"])
    fused_s = statistics.median(times["fused"])
    ws.log(f"(a) conversion ({backend}) {conv_s:.3f} s, log_softmax {soft_s:.3f} s: ratio {ratio:.2f}x; "
           f"torch backend {torch_ratio:.2f}x; fused from logits {fused_s:.3f} s = {fused_ratio:.2f}x")
    extra, method = extra_peak_bytes(ops["conversion"], device)
    fused_extra, _ = extra_peak_bytes(ops["fused"], device)
    soft_extra, _ = extra_peak_bytes(ops["log_softmax"], device)
    ws.log(f"(a) extra peak memory: conversion {_ratio(extra, logits_bytes)}, fused {_ratio(fused_extra, logits_bytes)}, "
           f"log_softmax {_ratio(soft_extra, logits_bytes)} of the logits ({logits_bytes / 2**30:.2f} GiB)")
    # torch operators and Triton launches of one call (on the triton backend: two launches per chunk
    # of teacher rows, the running sums and the edges' log-add; bench_byteconv.count_launches)
    launches = {name: bench.count_launches(ops[name])[1] for name in ("conversion", "conversion_torch", "fused")}
    ws.log("(a) launches per call: " + "; ".join(f"{name} {c['torch_ops']} torch ops + {c['triton_launches']} triton"
                                                 for name, c in launches.items()))
    text_bytes = sum(bench.n_bytes(w, vocab) for w in windows)
    return dict(vocabulary=vocab.name, V=vocab.vocab_size, B=B, L=L, text_bytes=text_bytes, launches=launches,
                conversion_s=conv_s, log_softmax_s=soft_s, conversion_ratio=ratio, times_s=times, backend=backend,
                torch_conversion_ratio=torch_ratio, fused_s=fused_s, fused_conversion_ratio=fused_ratio,
                fused_extra_memory_ratio=None if fused_extra is None else fused_extra / logits_bytes,
                positions_per_s=B * L / conv_s, logits_bytes=logits_bytes, extra_peak_bytes=extra,
                extra_memory_ratio=None if extra is None else extra / logits_bytes,
                log_softmax_extra_peak_bytes=soft_extra, memory_method=method,
                max_abs_dp=dp, dp_reference=how, dp_tokens=n, dp_same_support=same_support,
                max_abs_dp_vs_definition=dp_definition)


def _ratio(extra: int | None, whole: int) -> str:
    return "n/a" if extra is None else f"{extra / 2**20:,.0f} MiB = {extra / whole:.2f}x"


# ---------------------------------------------------------------------- (b)
def part_step(ws) -> dict:
    """(b): teacher forward, conversion, CE step and BLD step of a plain loop; MFU of the BLD step."""
    from bld_scale.convert import byte_logprobs_batch
    from bld_scale.convert.dispatch import teacher_token_logprobs
    from bld_scale.data.batch import PairTokenizer, collate
    from bld_scale.parallel.engines import param_groups
    from bld_scale.train.setup import setup_student, setup_tokenizers
    from bld_scale.train.step import distill_step

    p, device = ws.profile, ws.device
    recipe = ws.recipe(check_paths=False)
    cuda = device.type == "cuda"
    sides = setup_tokenizers(recipe, p.teacher_rows, log=ws.log)
    teacher = assets.teacher_model(p, device, torch.bfloat16 if cuda else torch.float32)
    with torch.device(device):
        student = setup_student(recipe, len(sides.student_tok))
    student.to(device).train()
    t = recipe.train
    optimizer = torch.optim.AdamW(param_groups(student, t.weight_decay), lr=t.lr, betas=(0.9, 0.95),
                                  fused=cuda or None)
    pair = PairTokenizer(sides.teacher_vocab, sides.student_vocab)
    batch = collate([pair(w) for w in assets.training_windows(p.windows, p.window_bytes)], recipe.student.K,
                    sides.teacher_bos, sides.student_bos).to(device)
    n_teacher, n_student = assets.n_parameters(teacher), assets.n_parameters(student)
    t_tokens = int(batch.teacher_attention_mask.sum())
    s_tokens = int((batch.student_labels != -100).sum())
    ws.log(f"(b) teacher {n_teacher / 1e9:.3f}B parameters, student {n_student / 1e9:.3f}B (LM + "
           f"{recipe.student.head} byte head); {p.windows} windows of {p.window_bytes:,} bytes: "
           f"{t_tokens:,} teacher / {s_tokens:,} student tokens")

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    def teacher_forward(ids, mask):
        return teacher(input_ids=ids, attention_mask=mask).logits

    def forward():
        with torch.no_grad(), autocast():
            return teacher_token_logprobs(teacher_forward, batch)

    logprobs = forward()

    def convert():
        return byte_logprobs_batch(logprobs, batch.teacher_ids, sides.teacher_vocab, eos_id=sides.teacher_eos)

    liger, liger_optimizer, liger_skipped = _liger_twin(student, t, cuda)

    def loss_and_backward(cfg, model=student, fused=False):
        with autocast():
            loss, _ = distill_step(teacher_forward, model, batch, cfg, teacher_vocab=sides.teacher_vocab,
                                   teacher_eos_id=sides.teacher_eos, fused_token_ce=fused)
        loss.backward()
        return loss.detach()

    def train_step(cfg, model=student, opt=optimizer, fused=False):
        def run():
            loss = loss_and_backward(cfg, model, fused)
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return run

    ops = {"teacher_forward": forward, "conversion": convert,
           "ce_step": train_step(dataclasses.replace(recipe.distill, method="ce")),
           "bld_step": train_step(recipe.distill)}
    losses = {"ce_step": [], "bld_step": []}
    liger_agreement = liger_error = None
    if liger is not None:  # same weights now: one BLD loss and backward of each, compared
        try:  # a Liger failure is recorded, and the plain figures are still measured
            liger_agreement = _agreement(loss_and_backward(recipe.distill), student,
                                         loss_and_backward(recipe.distill, liger, True), liger)
        except Exception as err:  # noqa: BLE001
            liger_error = f"{type(err).__name__}: {err}"
            ws.log(f"(b) the Liger step FAILED, measuring without it: {liger_error}")
            student.zero_grad(set_to_none=True)
            liger = liger_optimizer = None
    if liger is not None:
        ws.log(f"(b) Liger against plain, one BLD step from the same weights: {liger_agreement}")
        ops["bld_step_liger"] = train_step(recipe.distill, liger, liger_optimizer, fused=True)
        losses["bld_step_liger"] = []
    times = {name: [] for name in ops}
    peaks = {name: 0 for name in ops}
    for r in range(p.warmup + p.repeats):
        last = {}
        for name, fn in ops.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            last[name], out = timed(fn, device)
            if cuda:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))
            if name in losses:
                losses[name].append(float(out))
            if r >= p.warmup:
                times[name].append(last[name])
        ws.log(f"(b) round {r + 1}/{p.warmup + p.repeats}{' (warm-up)' if r < p.warmup else ''}: "
               + ", ".join(f"{k} {v:.3f} s" for k, v in last.items()))
    bad = {k: v for k, v in losses.items() if not all(math.isfinite(x) for x in v)}
    if bad:
        raise RuntimeError(f"non-finite losses in the plain loop: {bad}")
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = step_flops(n_teacher, t_tokens, n_student, s_tokens)
    achieved = flops / med["bld_step"]
    peak = assets.peak_bf16_tflops(ws.device_name) if cuda else None
    result = dict(teacher_parameters=n_teacher, student_parameters=n_student, teacher_tokens=t_tokens,
                  student_tokens=s_tokens, windows=p.windows, window_bytes=p.window_bytes,
                  precision="bf16 autocast" if cuda else "fp32", attention="sdpa",
                  **{f"{k}_s": v for k, v in med.items()}, times_s=times, losses=losses,
                  step_ratio=med["bld_step"] / (med["teacher_forward"] + med["ce_step"]),
                  conversion_share_of_bld_step=med["conversion"] / med["bld_step"],
                  step_flops=flops, achieved_tflops=achieved / 1e12, peak_bf16_tflops=peak,
                  mfu=None if peak is None else achieved / (peak * 1e12),
                  plain_tokens_per_s=s_tokens / med["bld_step"],
                  peak_memory_bytes=max(peaks.values()) if cuda else None,
                  peak_memory_bytes_by_op=peaks if cuda else None,
                  liger_skipped=liger_skipped, liger_error=liger_error, liger_agreement=liger_agreement)
    if "bld_step_liger" in med:
        liger_s = med["bld_step_liger"]
        result.update(liger_speedup=med["bld_step"] / liger_s, liger_tokens_per_s=s_tokens / liger_s,
                      liger_step_ratio=liger_s / (med["teacher_forward"] + med["ce_step"]),
                      liger_mfu=None if peak is None else flops / liger_s / (peak * 1e12))
        memory = (f"; peak memory {peaks['bld_step_liger'] / 2**30:.1f} GiB against {peaks['bld_step'] / 2**30:.1f} GiB"
                  if cuda else "")
        ws.log(f"(b) BLD step with Liger {liger_s:.3f} s against {med['bld_step']:.3f} s: "
               f"{result['liger_speedup']:.2f}x{memory}")
    return result


def _liger_twin(student, t, cuda: bool):
    """(copy of the student with Liger's layers and fused CE, its AdamW, None), or (None, None, why not)."""
    from bld_scale.config import liger_problem
    from bld_scale.parallel.engines import param_groups

    problem = liger_problem(needs_cuda=True) if cuda else "a CPU run (Liger's RMSNorm and SwiGLU need CUDA)"
    if problem is not None:
        return None, None, problem
    from bld_scale.model.fused_loss import check_fusable
    from bld_scale.model.liger_layers import apply_liger_layers

    twin = copy.deepcopy(student)
    apply_liger_layers(twin.lm)
    check_fusable(twin.lm)
    opt = torch.optim.AdamW(param_groups(twin, t.weight_decay), lr=t.lr, betas=(0.9, 0.95), fused=True)
    return twin, opt, None


def _agreement(plain_loss, plain, liger_loss, liger) -> dict:
    """Relative differences of one step's loss and of all gradients (L2), then the gradients cleared."""
    diff = sum(float((a.grad.float() - b.grad.float()).square().sum())
               for a, b in zip(plain.parameters(), liger.parameters()) if a.grad is not None)
    norm = sum(float(a.grad.float().square().sum()) for a in plain.parameters() if a.grad is not None)
    plain.zero_grad(set_to_none=True)
    liger.zero_grad(set_to_none=True)
    return {"loss_plain": float(plain_loss), "loss_liger": float(liger_loss),
            "loss_rel_diff": abs(float(liger_loss) - float(plain_loss)) / abs(float(plain_loss)),
            "grad_rel_l2_diff": math.sqrt(diff / norm) if norm else None}
