"""Activation checkpointing of the student (`train.activation_checkpointing`).

The student's decoder layers keep only their inputs in the forward and recompute the rest in the
backward (Hugging Face's `activation_checkpointing_enable`, named `gradient_checkpointing_enable` in older
transformers; non-reentrant `torch.utils.checkpoint`):
less activation memory (bld_scale.parallel.memory: 2 x hidden bytes per token per layer instead of
34 x hidden, plus one layer's while it recomputes) for about a third more student compute.

Non-reentrant (torch's recommended variant; the reentrant one also needs an input that requires
grad). Under ZeRO-3 the recomputation gathers each module's parameters again by ZeRO's ordinary
pre-forward hooks (checked with every parameter partitioned: tests/scripts/student_levers_zero3.py).
The byte head reads the last hidden state, the final norm's output outside the checkpointed
layers: it is unchanged. The numbers are the same: the recomputation repeats the same operations on
the same inputs (tests/unit/test_student_levers.py checks loss and gradients bit for bit).
"""
from __future__ import annotations

from torch import nn


def enable_activation_checkpointing(student: nn.Module) -> None:
    """Checkpoint the decoder layers of `student.lm` (a `Student`, before DeepSpeed wraps it).
    Takes effect in training mode only (HF's layers check `self.training`)."""
    lm = getattr(student, "lm", student)
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.activation_checkpointing: {type(lm).__name__} does not support gradient "
                         "checkpointing in transformers; set train.activation_checkpointing: false")
    # torch's default early stop is kept: it ends each recomputation at the last tensor the backward
    # needs, before the post-forward hook of the module whose backward asked for it, which under ZeRO-3
    # would release that module's parameters again mid-backward (tests/scripts/student_levers_zero3.py
    # fails with early_stop=False).
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # the newer name (the old one warns it will go)
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
