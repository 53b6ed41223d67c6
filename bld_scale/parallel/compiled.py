"""`torch.compile` of the student (`train.compile`, `train.compile_backend`).

DeepSpeed's own `engine.compile(backend=...)`, called once the engine is built, rather than
`torch.compile` of the model before `deepspeed.initialize`: by then ZeRO has registered its
parameter hooks, which DeepSpeed marks `torch.compiler.disable` (the gathers and releases stay
eager, graph breaks around them) and the engine knows it is compiled (its DeepCompile and compiled
autograd switches read that). It compiles the engine's module, the whole `Student` (backbone and
byte head): nn.Module.compile, so the state dict keeps its names (no `_orig_mod.` prefix) and
checkpoints, resume and export are unchanged.

Mode: torch's default. "reduce-overhead" (CUDA graphs) is not offered: ZeRO-3 gathers each
parameter into a fresh buffer every forward, which a captured graph cannot follow. Shapes vary
from batch to batch (windows tokenize to different lengths): after the first recompilation torch
marks them dynamic, so the first steps compile a few times, then no more.
"""
from __future__ import annotations

BACKENDS = ("inductor", "aot_eager", "eager")


def compile_student(engine, backend: str = "inductor") -> None:
    """Compile the student inside its DeepSpeed `engine` with `backend` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"train.compile_backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    engine.compile(backend=backend)
