"""Liger Kernel's RMSNorm, RoPE and SwiGLU in one student's layers (`student.liger_layers`).

Liger's own `apply_liger_kernel_to_<family>(model=...)` patches that model's norm and MLP modules
(it binds Liger's forward to each instance), but it also replaces the norm and MLP classes and the
RoPE function in transformers' modeling module, for every model of the family built or run in the
process afterwards: here the teacher (the demo's is a Llama, like its student), and in a test
session every later model. So only the student changes here:
- norms and MLPs: Liger's function patches the instances, then every module-level name it
  replaced is put back;
- RoPE: the attention modules call the modeling module's `apply_rotary_pos_emb` by name, so each
  student attention module gets a forward that puts Liger's RoPE under that name for the length
  of its own call (activation checkpointing recomputes through the same forward), then restores
  it. The teacher's forwards never run inside a student attention call (not thread-safe against
  a teacher of the same family run concurrently in another thread of the process).

Under ZeRO-3 the patched modules are the same modules, so DeepSpeed's hooks gather their weights
as before. Same maths as the plain layers; numbers differ by float rounding (tests/gpu/test_liger_gpu.py
states the tolerance). On a CPU only the RoPE kernel runs in the Triton interpreter (see
`bld_scale.config.kernels`), which is what tests/unit/test_liger.py runs.
"""
from __future__ import annotations

import sys
import types

from torch import nn

from bld_scale.config import RecipeError, liger_problem

# model_type -> the liger_kernel.transformers function that patches it (SwiGLU MLP, RMSNorm, RoPE).
LIGER_FAMILIES = {"llama": "apply_liger_kernel_to_llama", "qwen2": "apply_liger_kernel_to_qwen2",
                  "qwen3": "apply_liger_kernel_to_qwen3", "mistral": "apply_liger_kernel_to_mistral"}
_ABSENT = object()


def liger_layers_problem(lm: nn.Module) -> str | None:
    """Why `lm`'s layers cannot take Liger's kernels (None: they can)."""
    config = lm.config.get_text_config()
    if config.model_type not in LIGER_FAMILIES:
        return f"the student is a {config.model_type!r} model; Liger's layers here serve {', '.join(LIGER_FAMILIES)}"
    if getattr(config, "hidden_act", None) not in ("silu", "swish"):
        return f"the student's MLP activation is {config.hidden_act!r}; Liger's SwiGLU computes silu"
    return None


def apply_liger_layers(lm: nn.Module, *, rms_norm: bool = True, swiglu: bool = True, rope: bool = True) -> None:
    """Give this model's norms, MLPs and attention RoPE Liger's kernels; nothing else in the process
    changes. Refuses (RecipeError naming `student.liger_layers`) a model family or machine it
    cannot serve; `rms_norm`/`swiglu`/`rope` choose the kernels (tests run RoPE alone on a CPU)."""
    problem = liger_layers_problem(lm) or liger_problem(needs_cuda=rms_norm or swiglu)
    if problem is not None:
        raise RecipeError(f"student.liger_layers: {problem}; set student.liger_layers=false")
    import liger_kernel.transformers as liger

    modeling = sys.modules[type(lm).__module__]
    before = dict(vars(modeling))
    getattr(liger, LIGER_FAMILIES[lm.config.model_type])(
        rope=False, cross_entropy=False, fused_linear_cross_entropy=False, rms_norm=rms_norm, swiglu=swiglu, model=lm)
    for name, value in list(vars(modeling).items()):  # Liger's class swaps: for this instance only
        if before.get(name, _ABSENT) is not value:
            setattr(modeling, name, before[name]) if name in before else delattr(modeling, name)
    if rope:
        for layer in lm.get_decoder().layers:
            attention = layer.self_attn
            attention._liger_rope_home = modeling.__name__  # a name: a module object would not deepcopy
            # bound like Liger binds its forwards: a deepcopy of the model rebinds it to the copy
            attention.forward = types.MethodType(_forward_with_liger_rope, attention)


def _forward_with_liger_rope(self, *args, **kwargs):
    """The attention class's own forward, with Liger's RoPE as its module's `apply_rotary_pos_emb`."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    home = sys.modules[self._liger_rope_home]
    plain = home.apply_rotary_pos_emb
    home.apply_rotary_pos_emb = liger_rotary_pos_emb
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        home.apply_rotary_pos_emb = plain


def uses_liger_rope(attention: nn.Module) -> bool:
    """True when `apply_liger_layers` gave this attention module Liger's RoPE."""
    forward = attention.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _forward_with_liger_rope
