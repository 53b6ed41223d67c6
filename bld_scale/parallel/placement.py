"""Where the frozen teacher lives: `teacher.placement` zero3 | replicate | auto.

- zero3: a DeepSpeed ZeRO-3 inference engine (`engines.build_teacher_engine`): each GPU holds
  1/N of the parameters and every forward all-gathers each layer (and every rank must make as many
  forwards as the others).
- replicate: the whole teacher, in its dtype, on every rank's device: a plain eval-mode module
  without gradients and without DeepSpeed (`ReplicatedTeacher`). No gathers, no per-forward
  collective; costs the teacher's full size on each GPU.
- auto: replicate when the whole teacher fits on the GPU beside the student's share and one
  micro-batch's activations, by `bld_scale.parallel.memory`'s arithmetic with the margin below;
  else zero3. On CPU, zero3 (today's behaviour: replicating would hold one teacher per rank in
  the same host memory, and the CPU runs are tests and demos whose numbers must not move).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

PLACEMENTS = ("zero3", "replicate", "auto")
# `auto` replicates when (teacher + student states + activations) x (1 + MARGIN) + RESERVED <= the
# GPU's memory: the activation figures are +-20 % planning numbers, and the CUDA context, NCCL
# buffers and allocator fragmentation (typically 1-2 GB) are in none of them.
MARGIN = 0.2
RESERVED_BYTES = 3e9


class Placement(NamedTuple):
    name: str  # "zero3" or "replicate"
    reason: str  # one line for the log


class ReplicatedTeacher(torch.nn.Module):
    """The whole teacher on this rank's device, called like the ZeRO-3 engine: `teacher(**inputs)`,
    and `teacher.module` is the HF model (what Ulysses, dskd and the exact conversion read)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True):  # frozen: stays in eval mode whatever a caller asks
        return super().train(False)


def replicate_teacher(model: torch.nn.Module, device: torch.device) -> ReplicatedTeacher:
    """`model` frozen (no gradients, eval mode) on `device`, wrapped as `ReplicatedTeacher`."""
    model.requires_grad_(False)
    return ReplicatedTeacher(model.to(device)).eval()


def replicated_parts(estimate: dict) -> dict:
    """Bytes one GPU holds with the whole teacher on it, by part, from `memory.estimate`'s dict: the
    replicated teacher, the student's states (for its offload), one micro-batch's activations."""
    return {"teacher": estimate["teacher"]["states"]["replicate"]["gpu"],
            "student states": estimate["student"]["states"][estimate["student"]["offload"]]["gpu"],
            "activations": sum(estimate["activations"].values())}


def fits_replicated(estimate: dict, gpu_bytes: float) -> tuple[bool, str]:
    """Whether `auto` replicates on a GPU of `gpu_bytes`, and the arithmetic, in words (GB = 1e9 bytes)."""
    parts = replicated_parts(estimate)
    total = sum(parts.values()) * (1 + MARGIN) + RESERVED_BYTES
    fits = total <= gpu_bytes
    words = (" + ".join(f"{k} {v / 1e9:.1f}" for k, v in parts.items())
             + f", x{1 + MARGIN:g} + {RESERVED_BYTES / 1e9:g} reserved = {total / 1e9:.1f} GB "
             + f"{'<=' if fits else '>'} {gpu_bytes / 1e9:.1f} GB")
    return fits, words


def choose_placement(requested: str, on_gpu: bool, estimate=None, gpu_bytes: int | None = None) -> Placement:
    """The placement a run uses. `estimate`: a callable returning `memory.estimate`'s dict (called
    only for `auto` on a GPU); `gpu_bytes`: the GPU's total memory."""
    if requested not in PLACEMENTS:
        raise ValueError(f"unknown teacher.placement {requested!r}; choose one of {', '.join(PLACEMENTS)}")
    if requested != "auto":
        return Placement(requested, "teacher.placement set in the recipe")
    if not on_gpu:
        return Placement("zero3", "auto on CPU keeps the sharded teacher (one copy per rank would share host memory)")
    fits, words = fits_replicated(estimate(), gpu_bytes)
    return Placement("replicate" if fits else "zero3", f"auto: {words}")


def placement_for(recipe, world: int, teacher_config, student_config: dict, device: torch.device) -> Placement:
    """`recipe.teacher.placement` resolved for this run: `teacher_config` (the teacher's config
    object or dict), `student_config` (the student's config dict with its vocab_size), `device`
    this rank's. The GPUs per node are the launcher's LOCAL_WORLD_SIZE (else the visible GPUs)."""
    import os

    from bld_scale.parallel import memory

    on_gpu = device.type == "cuda"

    def numbers() -> dict:
        per_node = min(world, int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or torch.cuda.device_count() or 1)
        return memory.estimate(recipe, max(1, world // per_node), per_node, teacher_config, student_config,
                               sequence_parallel=recipe.parallel.sequence_parallel)

    gpu_bytes = torch.cuda.get_device_properties(device).total_memory if on_gpu else None
    return choose_placement(recipe.teacher.placement, on_gpu, numbers, gpu_bytes)
