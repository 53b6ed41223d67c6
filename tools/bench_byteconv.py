"""Benchmark the teacher-to-byte conversion (`byte_logprobs`, `byte_logprobs_batch`).

On real held-out text (the held-out Shakespeare works) tokenized with Tekken (V = 131,072), for each
length L it prints, all measured in the same run:

* time of `byte_logprobs` / time of `torch.log_softmax` on the same `[L + 1, V]` tensor (goal on a
  CPU: <= 3x), as the median over repeats of the paired ratio (the two ops are interleaved so they
  share the machine's noise), plus each op's median time;
* extra peak memory of `byte_logprobs` over the logits' own size (goal: <= 0.5x); on CPU each
  figure comes from a fresh subprocess that builds the logits, resets its peak RSS (Linux
  `/proc/self/clear_refs`; else the `ru_maxrss` after the logits exist is the baseline) and reads
  the peak after one call; `torch.log_softmax` is measured the same way as a check of the method
  (it must come out near 1.0x: its output is a copy of the logits); on CUDA
  `torch.cuda.max_memory_allocated` over `memory_allocated` before the call;
* positions (teacher tokens) per second and text bytes per second;
* the torch operators and Triton kernel launches of one call (`count_launches`: each torch
  operator is at least one kernel launch or copy on a GPU);
* the same for the batched form `byte_logprobs_batch` on `[B, L + 1, V]`;
* the fused path (what training runs: raw logits in, each row's log-normaliser computed by the
  backend, no log-softmax written), single and batched, as a ratio to the same `log_softmax`
  (goal on an H200: <= 1x) and with its extra peak memory. The synthetic rows are
  log-probabilities, which are valid logits (normaliser 0): the work is the same.

The logits are synthetic but shaped like a language model's: a fixed Zipf prior over a random
ranking of the vocabulary (`-ZIPF_S * log(1 + rank)`), per-row gaussian noise (std `NOISE_STD`),
and the canonical next token set to `logsumexp(rest) + c` with `c ~ N(BOOST_MEAN, BOOST_STD)`, so it
gets probability `sigmoid(c)` (the teacher is not absurdly surprised by the text; pure noise would
give the text ~1e-6 per token and send `byte_logprobs` down its slow refinement path). The run
prints the resulting teacher bits per token and row entropy.

Also: the build time of `TokenBytes` and its sorted-vocabulary index (built before any timing),
a profile of one L = 1,024 call (cProfile by Python function, torch.profiler by aten op), and
with `--presorted` the cost of the running sums alone -- exp + float64 cumsum without the gather
through the sorted-vocabulary permutation -- next to the same with the gather (and with an
alternative gather), i.e. what a teacher whose head emits logits in sorted-vocabulary order saves.

    python tools/bench_byteconv.py                      # CPU: L = 1024, 4096; batch 2 at L = 1024
    python tools/bench_byteconv.py --presorted --json docs/bench/byteconv_cpu.json
    python tools/bench_byteconv.py --device cuda        # GPU: L = 4096, batch 8 (skips without CUDA)
    python tools/bench_byteconv.py --device cuda --backend triton   # the Triton kernels
    TRITON_INTERPRET=1 python tools/bench_byteconv.py --count-only --lengths 64 --batch 2   # launches, CPU

Offline. The default CPU run takes about 5 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bld_scale.convert import byte_logprobs, byte_logprobs_batch, running_sums
from bld_scale.convert.backends import log_normaliser_function
from bld_scale.convert.byte_rows import token_layout
from bld_scale.convert.one_pass import one_pass_splits
from bld_scale.convert.running_sums import chunk_rows
from bld_scale.data.corpus import load_works
from bld_scale.tokenize import zoo as tokenizer_zoo
from bld_scale.tokenize.token_bytes import TokenBytes

# The conversion's own source files, for the profile.
CONVERT_FILES = ("dispatch.py", "one_pass.py", "byte_rows.py", "running_sums.py", "backends.py", "triton_sums.py",
                 "vocab_index.py")

TEKKEN_EOS = 2  # "</s>"
ZIPF_S = 1.0
NOISE_STD = 2.0
BOOST_MEAN = 0.5
BOOST_STD = 2.5
SKIP_TOKENS = 2000  # skip the Project Gutenberg header of the first held-out work
SEED = 1234


# ---------------------------------------------------------------------- inputs
def load_vocab() -> tuple[TokenBytes, dict]:
    """Tekken's TokenBytes with its index built (and its torch tables cached later per device)."""
    t0 = time.perf_counter()
    tok = tokenizer_zoo.tekken()
    t1 = time.perf_counter()
    vocab = TokenBytes.from_tokenizer(tok)
    t2 = time.perf_counter()
    index = vocab.index
    t3 = time.perf_counter()
    return vocab, dict(tokenizer_s=t1 - t0, token_bytes_s=t2 - t1, index_s=t3 - t2,
                       index_nodes=index.num_nodes, sorted_size=int(index.perm.size),
                       max_token_len=vocab.max_token_len)


def load_windows(vocab: TokenBytes, length: int, batch: int) -> list[list[int]]:
    """`batch` consecutive windows of `length` canonical Tekken tokens of the held-out works."""
    ids: list[int] = []
    for text in load_works("heldout").values():
        ids.extend(vocab.encode(text)[0])
    need = SKIP_TOKENS + length * batch
    if len(ids) < need:
        raise SystemExit(f"held-out text has {len(ids):,} Tekken tokens; L={length} x batch {batch} "
                         f"needs {need:,}")
    return [ids[SKIP_TOKENS + b * length: SKIP_TOKENS + (b + 1) * length] for b in range(batch)]


def n_bytes(ids: list[int], vocab: TokenBytes) -> int:
    return sum(len(vocab.token_bytes(i)) for i in ids)


def make_logprobs(windows: list[list[int]], vocab_size: int, device, seed: int = SEED,
                  chunk: int = 64) -> torch.Tensor:
    """`[B, L + 1, V]` float32 log-probabilities (see the module docstring), built in place in
    chunks of rows so that no full-size temporary ever exists."""
    gen_cpu = torch.Generator().manual_seed(seed)
    rank = torch.randperm(vocab_size, generator=gen_cpu)
    prior = (-ZIPF_S * torch.log1p(rank.double())).float().to(device)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    length = len(windows[0])
    out = torch.empty((len(windows), length + 1, vocab_size), dtype=torch.float32, device=device)
    for b, ids in enumerate(windows):
        ids_t = torch.as_tensor(ids, device=device)
        boost = torch.randn(length, generator=gen_cpu).to(device) * BOOST_STD + BOOST_MEAN
        for r0 in range(0, length + 1, chunk):
            r1 = min(r0 + chunk, length + 1)
            x = out[b, r0:r1]
            x.normal_(generator=gen).mul_(NOISE_STD).add_(prior)
            k1 = min(r1, length)  # rows with a canonical next token
            if k1 > r0:
                rows = torch.arange(r0, k1, device=device)
                x[rows - r0, ids_t[r0:k1]] = -math.inf
                x[rows - r0, ids_t[r0:k1]] = torch.logsumexp(x[: k1 - r0], 1) + boost[r0:k1]
            x.sub_(torch.logsumexp(x, 1, keepdim=True))
    return out


def teacher_stats(lp: torch.Tensor, windows: list[list[int]], vocab: TokenBytes) -> dict:
    ids_t = torch.as_tensor(windows[0], device=lp.device)
    canon = lp[0, torch.arange(len(windows[0]), device=lp.device), ids_t].double()
    sample = lp[0, :: max(1, lp.shape[1] // 16)].double()
    entropy = -(sample.exp() * sample).sum(1).mean()
    nats = float(-canon.sum())
    return dict(bits_per_token=nats / len(windows[0]) / math.log(2),
                bits_per_byte=nats / n_bytes(windows[0], vocab) / math.log(2),
                mean_p_canonical=float(canon.exp().mean()), entropy_nats=float(entropy))


# ---------------------------------------------------------------------- timing
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, device) -> dict:
    """Times (s) of every fn, `repeats` rounds, order rotated each round so they share the noise."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            _sync(device)
            t = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t)
    return times


def paired_ratio(times: dict, num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


# ---------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# --backend: what computes the running sums (bld_scale.convert.backends); set by main and the memory child.
BACKEND = "torch"


def _ops(lp: torch.Tensor, windows, vocab) -> dict:
    norm = log_normaliser_function(BACKEND, lp.device)

    def fused_batch():
        lse = norm(lp.view(-1, lp.shape[-1])).view(lp.shape[:-1])
        return byte_logprobs_batch(lp, windows, vocab, eos_id=TEKKEN_EOS, backend=BACKEND, log_normaliser=lse)

    return {
        "byte_logprobs": lambda: byte_logprobs(lp[0], windows[0], vocab, eos_id=TEKKEN_EOS, backend=BACKEND),
        "byte_logprobs_fused": lambda: byte_logprobs(lp[0], windows[0], vocab, eos_id=TEKKEN_EOS, backend=BACKEND,
                                                     log_normaliser=norm(lp[0])),
        "log_softmax": lambda: torch.log_softmax(lp[0], dim=-1),
        "byte_logprobs_batch": lambda: byte_logprobs_batch(lp, windows, vocab, eos_id=TEKKEN_EOS,
                                                           backend=BACKEND),
        "byte_logprobs_batch_fused": fused_batch,
        "log_softmax_batch": lambda: torch.log_softmax(lp, dim=-1),
    }


def _warm_up(vocab, device) -> None:
    """One tiny call so that lazy one-time initialisation is not counted as the op's cost."""
    vocab.index.torch_tables(device)
    small = load_windows(vocab, 16, 1)
    byte_logprobs(make_logprobs(small, vocab.vocab_size, device)[0], small[0], vocab, eos_id=TEKKEN_EOS,
                  backend=BACKEND)  # also compiles the Triton kernels


def memory_child(spec: dict) -> dict:
    """Run in a fresh process: extra peak memory of one op over the logits that already exist."""
    global BACKEND
    BACKEND = spec.get("backend", "torch")
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    vocab, _ = load_vocab()
    _warm_up(vocab, device)
    windows = load_windows(vocab, spec["length"], spec["batch"])
    lp = make_logprobs(windows, vocab.vocab_size, device)
    op = _ops(lp, windows, vocab)[spec["op"]]
    logits_bytes = (lp if "batch" in spec["op"] else lp[0]).numel() * 4
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = op()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        method = "cuda max_memory_allocated"
    else:
        reset = _reset_peak_rss()
        base = _peak_rss_bytes()  # peak so far == current RSS after a reset
        result = op()
        extra = _peak_rss_bytes() - base
        method = "VmHWM after clear_refs" if reset else "ru_maxrss after the logits exist"
    del result
    return dict(op=spec["op"], length=spec["length"], batch=spec["batch"], extra_bytes=int(extra),
                logits_bytes=int(logits_bytes), ratio=extra / logits_bytes, method=method)


def measure_memory(op: str, length: int, batch: int, device: str, threads: int) -> dict:
    spec = dict(op=op, length=length, batch=batch, device=device, threads=threads, backend=BACKEND)
    if torch.device(device).type == "cuda":  # one process is enough: the allocator's own peak
        return memory_child(spec)
    proc = subprocess.run([sys.executable, __file__, "--_memory-child", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess for {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- profile
def profile_call(lp, windows, vocab, top: int) -> dict:
    call = _ops(lp, windows, vocab)["byte_logprobs"]
    prof = cProfile.Profile()
    prof.enable()
    call()
    prof.disable()
    stream = io.StringIO()
    stats = pstats.Stats(prof, stream=stream)
    total = stats.total_tt
    rows = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        where = f"{Path(file).name}:{line}({func})" if file != "~" else func
        rows.append(dict(where=where, calls=ncalls, self_s=tottime, cum_s=cumtime))
    by_self = sorted(rows, key=lambda r: -r["self_s"])[:top]
    own = sorted((r for r in rows if r["where"].startswith(CONVERT_FILES)),
                 key=lambda r: -r["cum_s"])[:top]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as tprof:
        call()
    ops = sorted(tprof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    aten = [dict(op=e.key, calls=e.count, self_s=e.self_cpu_time_total / 1e6) for e in ops]
    aten_total = sum(e.self_cpu_time_total for e in tprof.key_averages()) / 1e6
    # The node-table lookups the conversion does per chunk (`table[child]`, aten::index) next to
    # torch.index_select on the same indices (same values), one chunk's worth of edges.
    index = vocab.index
    data, starts = token_layout(windows[0], vocab)
    _, _, node = one_pass_splits(data, starts, vocab)
    n_edges = int(index.child_count[node].sum())
    table = index.torch_tables(lp.device)["node_lo"]
    rows = _chunk_rows(lp[0], int(index.perm.size))
    per_chunk = max(1, n_edges * rows // lp.shape[1])
    child = torch.randint(1, index.num_nodes, (per_chunk,), device=lp.device)
    assert torch.equal(table[child], torch.index_select(table, 0, child))
    t = interleaved({"advanced_index": lambda: table[child],
                     "index_select": lambda: torch.index_select(table, 0, child)}, 20, lp.device)
    gather = dict(edges=n_edges, per_chunk=per_chunk,
                  advanced_index_s=statistics.median(t["advanced_index"]),
                  index_select_s=statistics.median(t["index_select"]))
    return dict(total_s=total, by_self=by_self, byteconv_functions=own, aten=aten,
                aten_total_s=aten_total, gather_1d=gather)


def print_profile(p: dict) -> None:
    print(f"\nprofile of one byte_logprobs call, L = 1,024 (cProfile total {p['total_s']:.2f} s)")
    print("  Python functions by self time (C calls included):")
    for r in p["by_self"]:
        print(f"    {r['self_s']:7.3f} s {100 * r['self_s'] / p['total_s']:5.1f}%  x{r['calls']:<5} {r['where']}")
    print("  conversion / vocab_index functions by cumulative time:")
    for r in p["byteconv_functions"]:
        print(f"    {r['cum_s']:7.3f} s {100 * r['cum_s'] / p['total_s']:5.1f}%  x{r['calls']:<5} {r['where']}")
    print(f"  aten ops by self CPU time (torch.profiler, total {p['aten_total_s']:.2f} s):")
    for r in p["aten"]:
        print(f"    {r['self_s']:7.3f} s {100 * r['self_s'] / p['aten_total_s']:5.1f}%  x{r['calls']:<5} {r['op']}")
    g = p["gather_1d"]
    print(f"  1-D gather of one chunk's {g['per_chunk']:,} edges (of {g['edges']:,}) from a node table: "
          f"table[idx] {1e6 * g['advanced_index_s']:,.0f} us vs torch.index_select "
          f"{1e6 * g['index_select_s']:,.0f} us (identical values)")


# ---------------------------------------------------------------------- presorted experiment
def _chunk_rows(lp2: torch.Tensor, sorted_size: int) -> int:
    return chunk_rows(lp2.shape[0], sorted_size, lp2.numel() * lp2.element_size())


def presorted(lp2: torch.Tensor, vocab: TokenBytes, device, repeats: int) -> dict:
    """Running sums over all rows: with the gather through the permutation (as the conversion does
    today), without any gather (logits already in sorted order), and the gather alone.

    (A fused variant -- `lp[:, perm_pad].exp_().double().cumsum_(1)` -- gives identical sums, checked
    here, but measured 1.7-3x slower than `index_select(out=)`: advanced indexing is the slow gather.)"""
    perm = vocab.index.torch_tables(device)["perm"]
    size = perm.numel()
    rows = _chunk_rows(lp2, size)
    values = torch.empty((rows, size), dtype=torch.float32, device=device)
    wide = torch.zeros((rows, size + 1), dtype=torch.float64, device=device)
    sums = torch.zeros((rows, size + 1), dtype=torch.float64, device=device)
    perm_pad = torch.cat([perm[:1], perm])  # column 0 is zeroed after the exp: S(0) = 0

    def current():  # running_sums.RunningSums.load, chunk by chunk
        for k0 in range(0, lp2.shape[0], rows):
            r = min(rows, lp2.shape[0] - k0)
            torch.index_select(lp2[k0:k0 + r], 1, perm, out=values[:r])
            values[:r].exp_()
            wide[:r, 1:].copy_(values[:r])
            torch.cumsum(wide[:r], dim=1, out=sums[:r])

    sorted_lp = lp2[:, perm].contiguous()  # what a sorted-order head would emit (made untimed)

    def no_gather():  # sorted-order logits: exp + float64 cumsum only
        for k0 in range(0, lp2.shape[0], rows):
            r = min(rows, lp2.shape[0] - k0)
            torch.exp(sorted_lp[k0:k0 + r], out=values[:r])
            wide[:r, 1:].copy_(values[:r])
            torch.cumsum(wide[:r], dim=1, out=sums[:r])

    def gather_only():
        for k0 in range(0, lp2.shape[0], rows):
            r = min(rows, lp2.shape[0] - k0)
            torch.index_select(lp2[k0:k0 + r], 1, perm, out=values[:r])

    # check the alternative gives the same sums
    r = min(rows, lp2.shape[0])
    torch.index_select(lp2[:r], 1, perm, out=values[:r])
    values[:r].exp_()
    wide[:r, 1:].copy_(values[:r])
    ref = torch.cumsum(wide[:r], dim=1)
    alt = lp2[:r][:, perm_pad].exp_().double()
    alt[:, 0] = 0.0
    alt.cumsum_(1)
    same = bool(torch.equal(ref, alt))
    del ref, alt
    fns = dict(index_select_exp_cumsum=current, exp_cumsum_only=no_gather, index_select_only=gather_only)
    times = interleaved(fns, repeats, device)
    return dict(chunk_rows=rows, same_sums=same,
                median_s={n: statistics.median(t) for n, t in times.items()},
                times_s=times)


# ---------------------------------------------------------------------- launch counts
def count_launches(fn):
    """`(result, counts)` of one call `fn()`: `torch_ops`, the torch operators it dispatches that do
    work (views excluded; on a GPU each is at least one kernel launch or copy), by name in `ops`,
    and `triton_launches`, the launches of the conversion's Triton kernels (`triton_sums`, when
    imported), by kernel in `kernels`. Torch operators that a kernel launch itself makes (the
    interpreter's copies on a CPU) are not counted. Runs on any device, the interpreter included."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    ops, kernels, inside = collections.Counter(), collections.Counter(), [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0] and not func.is_view:
                ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    launchers = {}
    triton_sums = sys.modules.get("bld_scale.convert.triton_sums")
    for name, obj in vars(triton_sums).items() if triton_sums else ():
        if name.endswith("_kernel") and hasattr(obj, "run"):
            launchers[name] = obj

    def counted(name, run):
        def launch(*args, **kwargs):
            kernels[name] += 1
            inside[0] += 1
            try:
                return run(*args, **kwargs)
            finally:
                inside[0] -= 1
        return launch

    own = {name: vars(kernel).get("run") for name, kernel in launchers.items()}
    for name, kernel in launchers.items():
        kernel.run = counted(name, kernel.run)  # `kernel[grid](...)` calls `kernel.run`
    try:
        with Count():
            result = fn()
    finally:
        for name, kernel in launchers.items():
            if own[name] is None:
                del kernel.run
            else:
                kernel.run = own[name]
    return result, dict(torch_ops=sum(ops.values()), triton_launches=sum(kernels.values()),
                        ops=dict(ops.most_common()), kernels=dict(kernels))


# ---------------------------------------------------------------------- the benchmark
def bench_length(vocab, length: int, batch: int, device: str, repeats: int, do_batch: bool,
                 do_memory: bool, do_profile: bool, do_presorted: bool, threads: int) -> dict:
    windows = load_windows(vocab, length, batch if do_batch else 1)
    t = time.perf_counter()
    lp = make_logprobs(windows, vocab.vocab_size, device)
    _sync(device)
    gen_s = time.perf_counter() - t
    res = dict(length=length, device=device, text_bytes=n_bytes(windows[0], vocab),
               logits_bytes=lp[0].numel() * 4, make_logits_s=gen_s,
               teacher=teacher_stats(lp, windows, vocab))
    st = res["teacher"]
    print(f"\nL = {length:,}: {res['text_bytes']:,} text bytes; logits [{length + 1}, {vocab.vocab_size}] "
          f"float32 = {res['logits_bytes'] / 2**20:,.0f} MiB, made in {gen_s:.1f} s; teacher "
          f"{st['bits_per_token']:.2f} bits/token = {st['bits_per_byte']:.2f} bits/byte, mean "
          f"p(canonical) {st['mean_p_canonical']:.2f}, row entropy {st['entropy_nats']:.1f} nats")

    # refinement path taken? (counted outside the timed calls; both backends refine through
    # running_sums.scatter_edges, the triton one only for the rows its kernels' totals flag)
    refine = running_sums.refine_small_masses
    taken = []
    running_sums.refine_small_masses = lambda *a, **k: taken.append(refine(*a, **k)) or taken[-1]
    try:
        out = byte_logprobs(lp[0], windows[0], vocab, eos_id=TEKKEN_EOS, backend=BACKEND)
    finally:
        running_sums.refine_small_masses = refine
    res["refined"] = bool(any(taken))
    res["finite_rows"] = float(torch.isfinite(out).any(1).float().mean())
    del out

    ops = _ops(lp, windows, vocab)
    # operators and kernel launches of one call (outside the timed calls)
    res["launches"] = {name: count_launches(ops[name])[1] for name in
                       ("byte_logprobs", "byte_logprobs_fused") + (("byte_logprobs_batch",
                                                                    "byte_logprobs_batch_fused") if do_batch else ())}
    print("  launches per call: " + "; ".join(f"{name} {c['torch_ops']} torch ops + {c['triton_launches']} "
                                              f"triton" for name, c in res["launches"].items()))
    times = interleaved({k: ops[k] for k in ("byte_logprobs", "byte_logprobs_fused", "log_softmax")}, repeats,
                        device)
    single = dict(byte_logprobs_s=statistics.median(times["byte_logprobs"]),
                  fused_s=statistics.median(times["byte_logprobs_fused"]),
                  log_softmax_s=statistics.median(times["log_softmax"]),
                  ratio=paired_ratio(times, "byte_logprobs", "log_softmax"),
                  fused_ratio=paired_ratio(times, "byte_logprobs_fused", "log_softmax"), times_s=times)
    single["positions_per_s"] = length / single["byte_logprobs_s"]
    single["bytes_per_s"] = res["text_bytes"] / single["byte_logprobs_s"]
    res["single"] = single
    print(f"  byte_logprobs       {single['byte_logprobs_s']:7.3f} s   log_softmax {single['log_softmax_s']:6.3f} s"
          f"   ratio {single['ratio']:5.2f}x (goal <= 3)   {single['positions_per_s']:,.0f} positions/s, "
          f"{single['bytes_per_s'] / 1e3:,.1f} kB/s   [refinement path: {res.get('refined')}]")
    print(f"  fused from logits   {single['fused_s']:7.3f} s   ratio {single['fused_ratio']:5.2f}x "
          f"(goal on an H200 <= 1)   {length / single['fused_s']:,.0f} positions/s")
    if do_batch:
        times_b = interleaved({k: ops[k] for k in ("byte_logprobs_batch", "byte_logprobs_batch_fused",
                                                   "log_softmax_batch")}, repeats, device)
        bat = dict(batch=batch, byte_logprobs_batch_s=statistics.median(times_b["byte_logprobs_batch"]),
                   fused_s=statistics.median(times_b["byte_logprobs_batch_fused"]),
                   log_softmax_s=statistics.median(times_b["log_softmax_batch"]),
                   ratio=paired_ratio(times_b, "byte_logprobs_batch", "log_softmax_batch"),
                   fused_ratio=paired_ratio(times_b, "byte_logprobs_batch_fused", "log_softmax_batch"),
                   times_s=times_b)
        bat["positions_per_s"] = batch * length / bat["byte_logprobs_batch_s"]
        bat["bytes_per_s"] = sum(n_bytes(w, vocab) for w in windows) / bat["byte_logprobs_batch_s"]
        res["batch"] = bat
        print(f"  batch {batch:<2}            {bat['byte_logprobs_batch_s']:7.3f} s   log_softmax "
              f"{bat['log_softmax_s']:6.3f} s   ratio {bat['ratio']:5.2f}x (goal <= 3)   "
              f"{bat['positions_per_s']:,.0f} positions/s, {bat['bytes_per_s'] / 1e3:,.1f} kB/s")
        print(f"  batch {batch:<2} fused      {bat['fused_s']:7.3f} s   ratio {bat['fused_ratio']:5.2f}x "
              f"(goal on an H200 <= 1)   {batch * length / bat['fused_s']:,.0f} positions/s")
    if do_profile:
        res["profile"] = profile_call(lp, windows, vocab, top=10)
        print_profile(res["profile"])
    if do_presorted:
        ps = presorted(lp[0], vocab, device, repeats)
        res["presorted"] = ps
        full = single["byte_logprobs_s"]
        print(f"  running sums over all {length + 1} rows ({ps['chunk_rows']} rows a chunk; the fused "
              f"advanced-index variant gives identical sums: {ps['same_sums']}):")
        for name, s in ps["median_s"].items():
            print(f"    {name:<26} {s:7.3f} s  = {s / full:5.1%} of byte_logprobs, "
                  f"{s / single['log_softmax_s']:4.2f}x log_softmax")
    del lp, ops
    if do_memory:
        mem = {}
        names = ["byte_logprobs", "byte_logprobs_fused", "log_softmax"] + (
            ["byte_logprobs_batch", "byte_logprobs_batch_fused"] if do_batch else [])
        for name in names:
            m = measure_memory(name, length, batch if "batch" in name else 1, device, threads)
            mem[name] = m
            print(f"  extra peak memory {name:<20} {m['extra_bytes'] / 2**20:8,.1f} MiB = "
                  f"{m['ratio']:.2f}x its logits ({m['logits_bytes'] / 2**20:,.0f} MiB)"
                  f"{'  (goal <= 0.5)' if name.startswith('byte') else '  (check: ~1.0 expected)'}"
                  f"  [{m['method']}]")
        res["memory"] = mem
    return res


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: skips cleanly without it)")
    parser.add_argument("--lengths", default=None,
                        help="comma-separated teacher lengths L (default 1024,4096 on cpu, 4096 on cuda)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 2 on cpu, 8 on cuda)")
    parser.add_argument("--batch-lengths", default=None,
                        help="lengths that also run the batched form (default: 1024 on cpu, all on cuda)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--no-profile", action="store_true", help="skip the L = 1,024 profile")
    parser.add_argument("--presorted", action="store_true",
                        help="also time the running sums without the sorted-vocabulary gather")
    parser.add_argument("--backend", default="torch", choices=("auto", "torch", "triton"),
                        help="conversion backend of byte_logprobs (triton: CUDA, or CPU under TRITON_INTERPRET=1)")
    parser.add_argument("--count-only", action="store_true",
                        help="only count the torch operators and Triton launches of one batched call per backend "
                             "(torch and triton; on a CPU under TRITON_INTERPRET=1, set here if triton is not yet "
                             "imported), at the first of --lengths and --batch")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    global BACKEND
    BACKEND = args.backend
    results = run_counts(args) if args.count_only else run(args)
    if args.json and results is not None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nwrote {args.json}")


def run_counts(args) -> dict:
    """--count-only: operators and launches of one `byte_logprobs_batch` call (log-probabilities
    in, and fused from logits) per backend, no timing."""
    if torch.device(args.device).type == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here: skipping the counts.")
        return {"skipped": "CUDA not available"}
    global BACKEND
    length = int((args.lengths or "64").split(",")[0])
    batch = args.batch or 2
    vocab, _ = load_vocab()
    windows = load_windows(vocab, length, batch)
    lp = make_logprobs(windows, vocab.vocab_size, args.device)
    rows = batch * (length + 1)
    logits_bytes = lp.numel() * lp.element_size()
    size = int(vocab.index.perm.size)
    out = dict(length=length, batch=batch, vocab_size=vocab.vocab_size, device=args.device,
               chunk_rows=dict(torch=chunk_rows(rows, size, logits_bytes),
                               triton=chunk_rows(batch * length, size, logits_bytes, entry_bytes=8)))
    print(f"{vocab.name}: B = {batch}, L = {length}: chunks of {out['chunk_rows']['torch']} rows (torch), "
          f"{out['chunk_rows']['triton']} rows (triton)")
    for backend in ("torch", "triton"):
        BACKEND = backend
        ops = _ops(lp, windows, vocab)
        for name in ("byte_logprobs_batch", "byte_logprobs_batch_fused"):
            _, c = count_launches(ops[name])
            out[f"{backend}/{name}"] = c
            print(f"  {backend:<6} {name:<26} {c['torch_ops']:5} torch ops, {c['triton_launches']:4} triton launches "
                  f"{c['kernels'] or ''}")
            print(f"         {dict(list(c['ops'].items())[:8])}")
    return out


def run(args) -> dict | None:
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        return run_cuda(args)
    return run_device(args, default_lengths="1024,4096", default_batch=2, default_batch_lengths="1024")


def run_cuda(args) -> dict | None:
    """The GPU version: V = 131,072, L = 4,096, batch 8 by default; skips cleanly without CUDA."""
    if not torch.cuda.is_available():
        print("CUDA is not available here: skipping the GPU benchmark.")
        return {"skipped": "CUDA not available"}
    return run_device(args, default_lengths="4096", default_batch=8, default_batch_lengths=None)


def run_device(args, default_lengths: str, default_batch: int, default_batch_lengths) -> dict:
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in (args.lengths or default_lengths).split(",")]
    batch = args.batch or default_batch
    bl = args.batch_lengths or default_batch_lengths
    batch_lengths = set(lengths) if bl is None else {int(x) for x in bl.split(",")}
    device = args.device
    vocab, built = load_vocab()
    env = dict(backend=BACKEND, torch=torch.__version__, python=platform.python_version(),
               threads=torch.get_num_threads(),
               cpu_count=os.cpu_count(), device=device,
               device_name=torch.cuda.get_device_name() if torch.device(device).type == "cuda"
               else platform.processor() or platform.machine())
    print(f"{vocab.name}: V = {vocab.vocab_size:,}; tokenizer {built['tokenizer_s']:.2f} s, TokenBytes "
          f"{built['token_bytes_s']:.2f} s, sorted-vocabulary index {built['index_s']:.2f} s "
          f"({built['index_nodes']:,} nodes, {built['sorted_size']:,} sorted tokens, max token "
          f"{built['max_token_len']} bytes) -- built once, before any timing")
    print(f"device {device} ({env['device_name']}), backend {BACKEND}, torch {env['torch']}, "
          f"{env['threads']} threads; "
          f"median of {args.repeats} interleaved repeats; ratios are medians of paired ratios")
    print(f"logits: Zipf prior s={ZIPF_S} + gaussian noise std {NOISE_STD} + canonical next token at "
          f"logsumexp(rest) + N({BOOST_MEAN}, {BOOST_STD}^2); eos_id {TEKKEN_EOS}")
    _warm_up(vocab, device)
    results = dict(env=env, build=built, logits=dict(zipf_s=ZIPF_S, noise_std=NOISE_STD,
                                                     boost_mean=BOOST_MEAN, boost_std=BOOST_STD),
                   repeats=args.repeats, lengths={})
    for length in lengths:
        results["lengths"][str(length)] = bench_length(
            vocab, length, batch, device, args.repeats, do_batch=length in batch_lengths,
            do_memory=not args.no_memory, do_profile=not args.no_profile and length == 1024,
            do_presorted=args.presorted, threads=args.threads)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    main()
