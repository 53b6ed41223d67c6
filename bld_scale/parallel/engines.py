"""DeepSpeed plumbing: process group (join, tear down), DeepSpeed JSON filled from the recipe,
the two engines.

Kept apart from the ML step (`bld_scale/step.py`): the step sees a teacher forward function and a
student module; this module decides how they are sharded. Two engines live in one process:
- the teacher: ZeRO-3 *inference* engine (deepspeed.initialize with a stage-3 config and no
  optimizer gives a parameter-partitioning-only engine, "ZeRO-Inference"); frozen, eval mode.
  Every rank must call its forward the same number of times (each forward all-gathers shards).
- the student: ZeRO-3 (or 2) training engine with AdamW, warmup + cosine LR, accumulation, clipping.
`deepspeed.init_inference` is not used: it is tensor-parallel kernel injection, not sharding, and
would replicate an 8B teacher on every GPU.
"""
from __future__ import annotations

import copy
import json
import math
import os
import socket

import torch
import torch.distributed as dist

from bld_scale.config import Recipe


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int]:
    """Join (or make) the process group; returns (rank, world_size).

    Works under `torchrun`, the `deepspeed` launcher (both export RANK/WORLD_SIZE/LOCAL_RANK/
    MASTER_*), and bare `python` (a 1-rank world on a free local port). gloo on CPU, nccl on GPU.
    """
    import deepspeed
    from datetime import timedelta

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        # No launcher: without these, deepspeed tries MPI discovery (mpi4py), which is not wanted.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if _on_gpu():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        _without_cpu_shm_allreduce()
    deepspeed.init_distributed(dist_backend="nccl" if _on_gpu() else "gloo", auto_mpi_discovery=False,
                               timeout=timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()


def _without_cpu_shm_allreduce() -> None:
    """Keep DeepSpeed from building and starting its CPU shared-memory all-reduce.

    On CPU, `deepspeed.init_distributed` JIT-compiles a C++ op (ninja + the torch headers: ~20 s
    on an idle 2-core machine, the first run on each machine) and, under the `deepspeed`
    launcher, every rank maps a 66 MB `/dev/shm/deepspeed_allreduce_buffer_*` file that DeepSpeed
    never unlinks. The op serves only DeepSpeed-Inference's `inference_all_reduce`, which training
    never calls; the buffers left by every run filled this machine's /dev/shm (RAM) until a
    compile took 18 minutes and the CI run timed out. Marking the op incompatible is the switch
    DeepSpeed itself reads (`deepspeed.comm.torch.build_shm_op`); gloo does the all-reduces.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def shutdown_distributed() -> None:
    """Destroy the process group, if this process joined one; every exit of the entry point calls it.

    Local to this rank (no collective), so a rank that refuses alone does not wait for the others.
    Without it, the interpreter exits with the backend's threads alive and the C++ runtime aborts
    ("terminate called without an active exception", exit status 134, or 250 as the DeepSpeed
    launcher reports it), losing the run's own exit code.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 on GPU, fp32 on CPU (bf16 matmuls on CPU are ~20x slower than fp32)."""
    if precision == "auto":
        return "bf16" if _on_gpu() else "fp32"
    return precision


def load_ds_json(recipe_or_path) -> dict:
    path = recipe_or_path.ds_config_path() if isinstance(recipe_or_path, Recipe) else recipe_or_path
    with open(path) as f:
        return json.load(f)


def build_ds_config(recipe: Recipe, world_size: int | None = None) -> dict:
    """The student's DeepSpeed config: the recipe's JSON with batch, clipping and precision filled.

    Values the recipe owns are always overwritten (not only "auto"), so the recipe stays the one
    source of truth for batch sizes, clipping and precision.
    """
    world_size = world_size or (dist.get_world_size() if dist.is_initialized() else 1)
    cfg = load_ds_json(recipe)
    t = recipe.train
    cfg["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    cfg["gradient_accumulation_steps"] = t.grad_accum
    cfg["train_batch_size"] = t.micro_batch_size * t.grad_accum * world_size
    cfg["gradient_clipping"] = t.grad_clip  # 0.0: DeepSpeed skips clipping
    prec = resolve_precision(t.precision)
    cfg["bf16"] = {"enabled": prec == "bf16"}
    cfg.pop("fp16", None)
    cfg.setdefault("zero_allow_untested_optimizer", True)  # we pass torch AdamW ourselves
    if not _on_gpu():
        # Offload targets "cpu", which on the CPU accelerator is where everything already is.
        z = cfg.get("zero_optimization", {})
        z.pop("offload_optimizer", None)
        z.pop("offload_param", None)
        for k in list(z):
            if k.endswith("pin_memory"):
                z.pop(k)
    _refuse_auto(cfg, "student")
    return cfg


def teacher_ds_config(student_cfg: dict, dtype: str = "auto") -> dict:
    """A ZeRO-3 inference config derived from the student's: same micro batch, no optimizer.

    The teacher is always stage 3 (even when the student runs zero2): sharding the large frozen
    model is the point. Parameter offload is kept if the student's config has it.
    """
    cfg = copy.deepcopy(student_cfg)
    for k in ("optimizer", "scheduler", "gradient_clipping", "zero_allow_untested_optimizer"):
        cfg.pop(k, None)
    z = cfg.setdefault("zero_optimization", {})
    z["stage"] = 3
    for k in ("offload_optimizer", "reduce_bucket_size", "allgather_bucket_size", "reduce_scatter"):
        z.pop(k, None)
    cfg["gradient_accumulation_steps"] = 1
    ws = max(1, student_cfg["train_batch_size"] // (student_cfg["train_micro_batch_size_per_gpu"]
                                                    * student_cfg["gradient_accumulation_steps"]))
    cfg["train_batch_size"] = student_cfg["train_micro_batch_size_per_gpu"] * ws
    prec = resolve_precision("auto" if dtype == "auto" else dtype)
    cfg["bf16"] = {"enabled": prec == "bf16"}
    cfg["fp16"] = {"enabled": prec == "fp16"}
    return cfg


def _refuse_auto(cfg: dict, what: str, path: str = "") -> None:
    """Any "auto" left would reach DeepSpeed, which only HF Trainer knows how to fill."""
    for k, v in cfg.items():
        if isinstance(v, dict):
            _refuse_auto(v, what, f"{path}{k}.")
        elif v == "auto":
            raise ValueError(f"{what} DeepSpeed config: {path}{k} is still 'auto'; set it in the JSON "
                             "or extend build_ds_config to fill it")


def build_teacher_engine(model: torch.nn.Module, ds_config: dict):
    """Frozen teacher as a ZeRO-3 inference engine (no optimizer, no grads, eval mode).

    `ds_config` is normally `teacher_ds_config(student_cfg, recipe.teacher.dtype)`.
    Call it as `with torch.no_grad(): engine(input_ids=...)`.
    """
    import deepspeed

    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        raise ValueError("the teacher engine must be ZeRO stage 3 (use teacher_ds_config)")
    if "optimizer" in ds_config:
        raise ValueError("the teacher engine takes no optimizer")
    model.requires_grad_(False)  # also tells ZeRO there are no gradient partitions to keep
    model.eval()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over `warmup_steps`, then cosine down to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D); ds_shape is the true shape under zero.Init."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_student_engine(model: torch.nn.Module, recipe: Recipe, ds_config: dict):
    """Student ZeRO training engine with AdamW + warmup/cosine LR; returns the engine.

    Optimizer: DeepSpeedCPUAdam when the optimizer is offloaded on GPU (DeepSpeed insists), else
    torch.optim.AdamW (fused on GPU). The LR schedule is a torch LambdaLR built on DeepSpeed's
    wrapped optimizer; the engine steps it once per optimizer step (every grad_accum micro-steps).
    Use: `loss = ...; engine.backward(loss); engine.step()` on every micro-batch.
    """
    import deepspeed

    t = recipe.train
    groups = param_groups(model, t.weight_decay)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
    if _on_gpu() and offload == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        optimizer = DeepSpeedCPUAdam(groups, lr=t.lr, betas=(0.9, 0.95), adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95), fused=_on_gpu() or None)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, t.warmup_steps, t.max_steps, t.min_lr_ratio))

    if recipe.student.liger_fused_ce and ds_config.get("zero_optimization", {}).get("stage") == 3:
        # the fused CE reads the token head's weight without running the head's forward, whose
        # hooks would gather it: gathered with the student's own forward instead (model.fused_loss)
        deepspeed.zero.register_external_parameter(model, model.lm.get_output_embeddings().weight)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds_config)
    engine.train()
    if t.compile:  # train.compile: after ZeRO's hooks are in place (bld_scale.parallel.compiled)
        from bld_scale.parallel.compiled import compile_student

        compile_student(engine, t.compile_backend)
    return engine
