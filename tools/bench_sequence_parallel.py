"""Benchmark the sequence-parallel conversion on CPU: per-rank memory and time for N = 1, 2.

One window of L canonical Tekken tokens (V = 131,072) of the held-out Shakespeare, with the
synthetic language-model-like log-probabilities of `tools/bench_byteconv.py`. For each N, N gloo
processes (torch.multiprocessing) each hold only their teacher rows `[k0, k1)` (the rows are built
whole, sliced and the whole freed before measuring) and convert them:
* N = 1: `byte_logprobs` on the whole window (what `parallel.sequence_parallel: 1` runs);
* N = 2: `convert.sequence_parallel.sequence_parallel_rows`, the student slots split at another
  byte than the teacher rows (half the bytes + 7), so rows move both ways and straddle.
Printed per rank, all in one run: the peak of teacher log-probabilities + conversion (Linux VmHWM
after `/proc/self/clear_refs`, over the RSS before the log-probabilities existed), the median wall
time of the conversion over the repeats, and the byte rows and bytes each rank receives from the
other (the all-to-all) plus the all-gather's. The SP=2 overhead is the slowest rank's time at N = 2
over the time at N = 1, and the sum of both ranks' CPU times over N = 1's (the total work, which
a loaded machine does not distort).

    python tools/bench_sequence_parallel.py                 # L = 2048, 3 repeats (~2 min on 2 cores)
    python tools/bench_sequence_parallel.py --length 4096 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_byteconv as bb  # noqa: E402  (the inputs and the peak-RSS probe)
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _rss_bytes() -> int:
    return (bb._status_kib("VmRSS") or 0) * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, size: int, port: int, length: int, repeats: int, results) -> None:
    import torch.distributed as dist

    from bld_scale.convert import byte_logprobs
    from bld_scale.convert.byte_rows import token_layout
    from bld_scale.convert.sequence_parallel import SequenceGroup, sequence_parallel_rows
    from bld_scale.convert.shard_plan import (PACKED_ROW_BYTES, contribution_range, even_bounds,
                                              routing_plan)

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        vocab, _ = bb.load_vocab()
        bb._warm_up(vocab, "cpu")
        ids = bb.load_windows(vocab, length, 1)[0]
        data, starts = token_layout(ids, vocab)
        bounds = even_bounds(length + 1, size)
        k0, k1 = bounds[rank], bounds[rank + 1]
        cut = len(data) // 2 + 7  # the student's split: not at the teacher's
        wanted = [[np.arange(0, len(data) + 1)]] if size == 1 else [[np.arange(0, cut), np.arange(cut, len(data) + 1)]]
        base = _rss_bytes()
        full = bb.make_logprobs([ids], vocab.vocab_size, "cpu")[0]
        local = full[k0:k1].clone() if size > 1 else full
        del full
        dist.barrier()
        sp = SequenceGroup(rank, size)

        def convert():
            if size == 1:
                return byte_logprobs(local, ids, vocab, eos_id=bb.TEKKEN_EOS)
            return sequence_parallel_rows(local[None], [ids], vocab, bounds, wanted, sp, eos_id=bb.TEKKEN_EOS)

        bb._reset_peak_rss()
        times, cpu = [], []
        for i in range(repeats):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            out = convert()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            if i == 0:
                peak = bb._peak_rss_bytes() - base
            del out
        ranges = [contribution_range(starts, len(data), bounds[r], bounds[r + 1], vocab.max_token_len)
                  for r in range(size)]
        plan = routing_plan(ranges, wanted[0])
        received = sum(len(plan[src][rank]) for src in range(size) if src != rank)
        results[rank] = dict(rank=rank, rows=[k0, k1], logits_bytes=local.numel() * 4, peak_bytes=int(peak),
                             seconds=statistics.median(times), times=times,
                             cpu_seconds=statistics.median(cpu), byte_rows=len(data) + 1,
                             rows_received=received, bytes_received=received * PACKED_ROW_BYTES,
                             all_gather_bytes=8 * size, halo_rows=max(0, ranges[0][1] - ranges[1][0]) if size > 1 else 0)
    finally:
        dist.destroy_process_group()


def measure(size: int, length: int, repeats: int) -> list[dict]:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(size, _free_port(), length, repeats, results), nprocs=size)
        return [dict(results[r]) for r in range(size)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=2048, help="teacher tokens in the window")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    runs = {n: measure(n, args.length, args.repeats) for n in (1, 2)}
    print(f"one window of {args.length} Tekken tokens ({runs[1][0]['byte_rows'] - 1} bytes), V = 131072, CPU, "
          f"1 thread per rank, median of {args.repeats}")
    print("N  rank  teacher rows   log-probs MB  peak MB (log-probs + conversion)  wall s  CPU s  rows in  kB in")
    for n, ranks in runs.items():
        for r in ranks:
            print(f"{n}  {r['rank']:4d}  {r['rows'][0]:5d}-{r['rows'][1]:<6d} {r['logits_bytes'] / 1e6:12.1f}  "
                  f"{r['peak_bytes'] / 1e6:33.1f}  {r['seconds']:6.2f}  {r['cpu_seconds']:5.2f}  {r['rows_received']:7d}  "
                  f"{r['bytes_received'] / 1e3:5.0f}")
    one, two = runs[1][0], runs[2]
    peak_ratio = max(r["peak_bytes"] for r in two) / one["peak_bytes"]
    slowest = max(r["seconds"] for r in two)
    print(f"per-rank peak at N=2 / N=1: {peak_ratio:.2f} (1/N = 0.50); halo: {two[0]['halo_rows']} byte rows")
    work = sum(r["cpu_seconds"] for r in two) / one["cpu_seconds"]
    print(f"SP=2 over SP=1: slowest rank {slowest / one['seconds']:.2f}x the wall time; both ranks' CPU time "
          f"together {work:.2f}x SP=1's (the overhead: partial rows, packing, the collectives)")
    if args.json:
        Path(args.json).write_text(json.dumps({"length": args.length, "runs": runs, "peak_ratio": peak_ratio,
                                               "time_ratio": slowest / one["seconds"], "cpu_work_ratio": work}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
