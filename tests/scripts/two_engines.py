"""Prototype: a frozen ZeRO-3 teacher and a ZeRO-3 student in one process, a few real steps.

Loss = student CE + 0.5 * token KL(teacher || student) on random ids (shared vocabulary). The
global batch is fixed and cut the same way for any world size, so per-step losses must agree
between 1 and N ranks up to floating-point reduction order. Rank 0 writes per-step values to
--out as JSON. Placeholder for launch/distill.py; the engine functions are the real ones.

    torchrun --nproc_per_node 2 tests/scripts/two_engines.py --out /tmp/r.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # run from anywhere

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bld_scale.config import load_recipe
from bld_scale.parallelize import (build_ds_config, build_student_engine, build_teacher_engine,
                                   init_distributed, teacher_ds_config)

VOCAB, SEQ = 128, 16


def tiny_llama(seed: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)  # same seed on every rank: identical replicas before sharding
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--ds", default="zero3")
    ap.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = ap.parse_args()

    t0 = time.time()
    rank, world = init_distributed()
    t_init = time.time() - t0
    per_rank = args.global_batch // world
    assert per_rank * world == args.global_batch and per_rank % args.micro == 0, "batch must divide"
    accum = per_rank // args.micro
    recipe = load_recipe(None, [f"train.micro_batch_size={args.micro}", f"train.grad_accum={accum}",
                                f"train.max_steps={args.steps}", "train.warmup_steps=2",
                                "train.lr=3e-3", "train.precision=auto", f"deepspeed.config={args.ds}"],
                         check_paths=False)
    ds_cfg = build_ds_config(recipe, world)

    teacher = build_teacher_engine(tiny_llama(1, 64, 2), teacher_ds_config(ds_cfg, "auto"))
    student = build_student_engine(tiny_llama(2, 32, 2), recipe, ds_cfg)
    dtype = torch.bfloat16 if ds_cfg["bf16"]["enabled"] else torch.float32
    dev = student.device

    gen = torch.Generator().manual_seed(1234)
    probe = torch.randint(0, VOCAB, (1, SEQ), generator=gen).to(dev)

    def teacher_probe() -> float:
        with torch.no_grad():
            return float(teacher(input_ids=probe).logits.float().sum())

    probe_before = teacher_probe()
    records = []
    t_steps = time.time()
    # One fixed global batch, revisited every step: the loss must then fall (a live optimizer).
    batch = torch.randint(0, VOCAB, (args.global_batch, SEQ + 1), generator=gen)
    for step in range(args.steps):
        lr = student.get_lr()[0]  # the LR this step uses (read before the scheduler advances)
        mine = batch[rank * per_rank:(rank + 1) * per_rank].to(dev)  # this rank's share
        sums = torch.zeros(3, dtype=torch.float64)
        for a in range(accum):
            mb = mine[a * args.micro:(a + 1) * args.micro]
            x, y = mb[:, :-1], mb[:, 1:]
            with torch.no_grad():
                t_logits = teacher(input_ids=x).logits.float()
            s_logits = student(input_ids=x).logits.float()
            ce = F.cross_entropy(s_logits.reshape(-1, VOCAB), y.reshape(-1))
            t_logp, s_logp = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
            kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
            loss = ce + 0.5 * kl
            student.backward(loss)  # the engine scales by 1/accum
            student.step()  # optimizer + LR step only at the accumulation boundary
            sums += torch.tensor([loss.item(), ce.item(), kl.item()], dtype=torch.float64)
        dist.all_reduce(sums)  # micro-batches are equal-sized: mean of means = global mean
        sums /= accum * world
        gn = student.get_global_grad_norm()
        records.append({"step": step, "loss": sums[0].item(), "ce": sums[1].item(),
                        "kl": sums[2].item(), "lr": lr,
                        "grad_norm": None if gn is None else float(gn)})
        if rank == 0:
            print(json.dumps(records[-1]), flush=True)
    t_steps = time.time() - t_steps
    probe_after = teacher_probe()
    frozen = all(not p.requires_grad for p in teacher.module.parameters())
    if rank == 0:
        out = {"world": world, "accum": accum, "micro": args.micro, "dtype": str(dtype),
               "steps": records, "teacher_probe": [probe_before, probe_after],
               "teacher_frozen": frozen, "init_s": t_init, "steps_s": t_steps,
               "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
