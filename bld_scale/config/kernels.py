"""What the student's fused kernels (Liger Kernel, `student.liger_fused_ce`, `student.liger_layers`)
need from this machine, asked before any model loads.

Liger's kernels are Triton kernels. On a CUDA device they compile; on a CPU they run only under
the Triton interpreter (`TRITON_INTERPRET=1` set before triton is first imported: exact, slow,
for tests). Found with liger-kernel 0.8.5 and triton 3.9: the fused linear cross-entropy and
RoPE kernels run in the interpreter; RMSNorm and SwiGLU do not (they call `.to()` on a float
argument, which the interpreter passes as a Python float), so `student.liger_layers` needs CUDA.
"""
from __future__ import annotations

import os

from bld_scale.config.schema import Recipe, RecipeError

LIGER_INSTALL = "pip install liger-kernel==0.8.5, with --no-deps if pip would replace your torch"
# The methods whose only use of the student's token logits is the token cross-entropy.
FUSED_CE_METHODS = ("ce", "bld")


def liger_problem(needs_cuda: bool) -> str | None:
    """Why Liger's kernels cannot run here (None: they can): the package must import, and a CUDA
    device be present (or, unless `needs_cuda`, the Triton interpreter be on)."""
    try:
        import liger_kernel.ops  # noqa: F401  (the kernels; a broken install fails here)
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and err.name == "liger_kernel":
            return "the liger_kernel package is not installed"
        return f"liger_kernel fails to import ({err})"
    import torch

    if torch.cuda.is_available():
        return None
    if needs_cuda:
        return "no CUDA device is available (Liger's RMSNorm and SwiGLU do not run in the Triton interpreter)"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device is available (on a CPU only the Triton interpreter, TRITON_INTERPRET=1, runs them)"
    return None


def liger_value_problems(r: Recipe) -> list[tuple[str, bool, str]]:
    """Rules for `checks._check_values` (key, holds, message): what the fused CE cannot serve."""
    return [
        ("student.liger_fused_ce", not r.student.liger_fused_ce or r.distill.method in FUSED_CE_METHODS,
         f"fuses the token head into the cross-entropy of methods {' and '.join(FUSED_CE_METHODS)} only "
         f"(distill.method {r.distill.method!r} reads the token logits themselves); set it to false"),
        ("student.liger_fused_ce", not r.student.liger_fused_ce or r.parallel.sequence_parallel == 1,
         "is not implemented with parallel.sequence_parallel > 1 (the loss is reduced over the group from "
         "the token logits); set it to false or parallel.sequence_parallel=1"),
    ]


def validate_liger(recipe: Recipe) -> None:
    """Refuse a Liger option this machine cannot run, naming the key and the fix."""
    for key, needs_cuda in (("student.liger_fused_ce", False), ("student.liger_layers", True)):
        if getattr(recipe.student, key.split(".")[1]) and (problem := liger_problem(needs_cuda)) is not None:
            where = "a CUDA device" if needs_cuda else "a CUDA device (or TRITON_INTERPRET=1 on a CPU, for tests)"
            raise RecipeError(f"{key}: Liger Kernel needs the liger_kernel package and {where}, but {problem}; "
                              f"set {key}=false, or run on a GPU machine with it installed: {LIGER_INSTALL}")
