"""Expected student tokens/s per GPU of a BLD run on G GPUs per node x N nodes, and where communication goes.

    python tools/estimate_throughput.py [--pair qwen2-1.5b:llama-1b|llama-8b:llama-1b] [--gpus-per-node 8]
        [--nodes 1] [--windows 4] [--window-bytes 8192] [--efficiency 0.5] [--plain-tokens-per-s X]
        [--intra-gbps 360] [--inter-gbps 50] [--sequence-parallel 1]

A planning model, not a measurement. Per GPU and optimizer step (one micro-batch of `--windows`
windows, no gradient accumulation):

- compute: 2·N_teacher·T_teacher + 6·N_student·T_student FLOPs at `--efficiency` x the dense bf16
  peak (989 TFLOP/s, H100/H200), plus the conversion as one read and write of the teacher's fp32
  logits at HBM speed (4.8 TB/s; the goal of the conversion-kernel issue). With
  `--plain-tokens-per-s` (a plain loop's measured rate on one GPU, e.g. tools/gpu_check.py's
  `plain_tokens_per_s`) the measured step time replaces this estimate.
- communication, by ZeRO's own accounting (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
  Toward Training Trillion Parameter Models", section 7: stage 3 moves 3 x the parameters per step,
  1.5 x data parallelism's all-reduce): a ZeRO-3 student all-gathers its bf16 parameters in the
  forward and again in the backward and reduce-scatters bf16 gradients (3 x 2 bytes x N_student);
  a ZeRO-3 teacher (`teacher.placement: zero3`) all-gathers its bf16 parameters on every forward
  (2 bytes x N_teacher); a replicated teacher moves nothing. Each collective moves (G·N - 1)/(G·N)
  of its size per GPU; at `--intra-gbps` inside one node and, with more than one node, at
  `--inter-gbps` (the per-GPU inter-node link, 400 Gb/s InfiniBand = 50 GB/s), the slower one
  bounding a flat ring. DeepSpeed's ZeRO++ (Wang et al. 2023: quantised weights, a secondary
  intra-node partition, quantised gradients) cuts the inter-node volume 4x; shown as its own row.
- sequence parallelism (DeepSpeed Ulysses): per layer 4 all-to-alls of the activations in the forward
  (q, k, v, output) and 4 in the backward for the student, 4 for the teacher's forward; each GPU
  sends (P-1)/P of its T/P x hidden bf16 slice.

Step time: `overlapped` assumes DeepSpeed's prefetch hides communication behind compute (max of
the two); `serial` adds them. MFU = FLOPs / step time / peak.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from bld_scale.train.throughput import peak_bf16_tflops, step_flops  # noqa: E402

PEAK_TFLOPS = peak_bf16_tflops("H200")  # dense bf16, as the pipeline's mfu takes it
HBM_TBPS = 4.8  # H200


@dataclasses.dataclass(frozen=True)
class Model:
    params: float  # all parameters (embeddings included: ZeRO moves them all)
    layers: int
    hidden: int
    vocab: int
    bytes_per_token: float  # on English web text


MODELS = {
    "qwen2-1.5b": Model(1.54e9, 28, 1536, 151_936, 4.4),
    "llama-8b": Model(8.03e9, 32, 4096, 128_256, 4.4),
    "llama-1b": Model(1.04e9, 16, 2048, 32_768, 3.7),  # Llama-3.2-1B shape with Mistral's 32k tokenizer, tied
}


@dataclasses.dataclass
class Cluster:
    gpus_per_node: int = 8
    nodes: int = 1
    intra_gbps: float = 360.0  # NCCL bus bandwidth inside an NVLink node, GB/s per GPU
    inter_gbps: float = 50.0  # per GPU across nodes (400 Gb/s)
    sequence_parallel: int = 1

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def seconds(self, nbytes: float) -> float:
        """A collective moving `nbytes` of data in all: each GPU sends (G - 1)/G of it."""
        if self.gpus == 1:
            return 0.0
        bw = self.intra_gbps if self.nodes == 1 else min(self.intra_gbps, self.inter_gbps)
        return nbytes * (self.gpus - 1) / self.gpus / (bw * 1e9)


def step_estimate(teacher: Model, student: Model, cluster: Cluster, windows: int, window_bytes: int,
                  efficiency: float, placement: str, zero_pp: bool = False,
                  plain_tokens_per_s: float | None = None) -> dict:
    """One row of the table: seconds and bytes per step per GPU, tokens/s and MFU (module docstring)."""
    t_tokens = windows * window_bytes / teacher.bytes_per_token
    s_tokens = windows * window_bytes / student.bytes_per_token
    flops = step_flops(teacher.params, t_tokens, student.params, s_tokens)
    if plain_tokens_per_s:
        compute = s_tokens / plain_tokens_per_s
    else:
        conversion = 2 * t_tokens * teacher.vocab * 4 / (HBM_TBPS * 1e12)
        compute = flops / (efficiency * PEAK_TFLOPS * 1e12) + conversion
    volume = {"student_zero3": 3 * 2 * student.params,
              "teacher_zero3": 2 * teacher.params if placement == "zero3" else 0.0}
    scale = 0.25 if zero_pp and cluster.nodes > 1 else 1.0  # ZeRO++'s 4x, across nodes only
    comm = {k: cluster.seconds(v) * scale for k, v in volume.items()}
    sp = cluster.sequence_parallel
    if sp > 1:  # Ulysses all-to-alls stay inside the node (SP groups are consecutive ranks)
        per_layer = lambda m, tokens: 4 * 2 * (tokens / sp) * m.hidden * (sp - 1) / sp  # noqa: E731
        nbytes = 2 * student.layers * per_layer(student, s_tokens) + teacher.layers * per_layer(teacher, t_tokens)
        comm["ulysses"] = nbytes / (cluster.intra_gbps * 1e9)
        compute /= sp
        flops /= sp
        s_tokens /= sp
    total_comm = sum(comm.values())
    result = {"compute_s": compute, "comm_s": comm, "comm_bytes": volume}
    for name, seconds in (("overlapped", max(compute, total_comm)), ("serial", compute + total_comm)):
        result[name] = {"step_s": seconds, "tokens_per_s": s_tokens / seconds,
                        "mfu": flops / seconds / (PEAK_TFLOPS * 1e12)}
    return result


def table(args) -> str:
    teacher_name, student_name = args.pair.split(":")
    teacher, student = MODELS[teacher_name], MODELS[student_name]
    lines = [f"{teacher_name} teacher -> {student_name} student, {args.windows} x {args.window_bytes} B windows "
             f"per GPU per step, efficiency {args.efficiency:g}"
             + (f", plain loop measured at {args.plain_tokens_per_s:g} tokens/s" if args.plain_tokens_per_s else ""),
             f"{'GPUs':>10} {'teacher':>8} {'ZeRO++':>6} {'compute s':>9} {'student comm':>12} "
             f"{'teacher comm':>12} {'tokens/s/GPU overlapped':>23} {'serial':>7} {'MFU ovl':>7} {'serial':>7}"]
    for nodes in sorted({1, args.nodes}):
        cluster = Cluster(args.gpus_per_node, nodes, args.intra_gbps, args.inter_gbps, args.sequence_parallel)
        for placement in ("zero3", "replicate"):
            for zpp in ((False, True) if nodes > 1 else (False,)):
                e = step_estimate(teacher, student, cluster, args.windows, args.window_bytes, args.efficiency,
                                  placement, zpp, args.plain_tokens_per_s)
                o, s = e["overlapped"], e["serial"]
                lines.append(f"{f'{nodes}x{args.gpus_per_node}':>10} {placement:>8} {('yes' if zpp else '-'):>6} "
                             f"{e['compute_s']:>9.3f} {e['comm_s']['student_zero3']:>12.3f} "
                             f"{e['comm_s']['teacher_zero3']:>12.3f} {o['tokens_per_s']:>23,.0f} "
                             f"{s['tokens_per_s']:>7,.0f} {o['mfu']:>7.1%} {s['mfu']:>7.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="llama-8b:llama-1b", help=f"teacher:student, from {', '.join(MODELS)}")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=4, help="also shown: one node")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window-bytes", type=int, default=8192)
    p.add_argument("--efficiency", type=float, default=0.5, help="fraction of the bf16 peak the matmuls reach")
    p.add_argument("--plain-tokens-per-s", type=float, default=None)
    p.add_argument("--intra-gbps", type=float, default=360.0)
    p.add_argument("--inter-gbps", type=float, default=50.0)
    p.add_argument("--sequence-parallel", type=int, default=1)
    args = p.parse_args(argv)
    pair = args.pair.split(":")
    if len(pair) != 2 or any(m not in MODELS for m in pair):
        p.error(f"--pair {args.pair!r}: give teacher:student from {', '.join(MODELS)}")
    print(table(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
