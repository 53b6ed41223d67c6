"""The student's token cross-entropy with its head fused in (Liger Kernel), for `student.liger_fused_ce`.

`Student.forward(..., token_labels=labels)` returns the token CE where it would return the token
logits: the head's matmul and the cross-entropy run chunk by chunk in Liger's fused linear
cross-entropy, which also computes the gradients of the hidden states and of the head's weight
then, so the `[tokens, vocabulary]` logits, their float32 copy and their gradient never exist
whole. With a 128k vocabulary and 32k tokens a step, that is ~16 GB of float32 logits (twice that
with their gradient) not allocated.

The value is `train.losses.token_ce(lm(...).logits, labels)`'s: the mean over the labels that
count (-100 ignored), 0 when none does. Liger sums in float32 (as `token_ce` does after its
`.float()`); the head's gradient is accumulated in float32 too (`accum_dtype`) when the weights are
bf16/fp16, at the cost of one float32 copy of the head. The numbers differ from the plain path by
float rounding only (tests/unit/test_liger.py states the tolerance).

Only models whose token logits are exactly `lm_head(last hidden state)` can be fused (no logit
soft-capping or scaling): `FUSABLE_MODEL_TYPES`. Under ZeRO-3 the head's forward never runs, so
its hooks never gather its weight: `parallel.engines` registers the weight as an external
parameter of the student (`deepspeed.zero.register_external_parameter`), gathered for the
student's whole forward. (DeepSpeed 0.19.8 also gathers a partitioned parameter read in another
module's forward through its parameter getter, and a run without the registration gives the same
losses; the registration does not depend on that fallback.) Liger reads the count of counted
labels on the host (`.item()`): one device sync per micro-batch.
"""
from __future__ import annotations

import torch
from torch import nn

from bld_scale.config import RecipeError, liger_problem
from bld_scale.data.batch import IGNORE

# model_type values whose CausalLM computes logits = lm_head(hidden) and nothing more (checked
# against transformers' own logits by tests/unit/test_liger.py for llama and qwen2).
FUSABLE_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def fused_ce_problem(lm: nn.Module) -> str | None:
    """Why `lm`'s token head cannot be fused into the cross-entropy (None: it can)."""
    model_type = lm.config.model_type
    if model_type not in FUSABLE_MODEL_TYPES:
        return (f"the student is a {model_type!r} model; the fused head serves "
                f"{', '.join(FUSABLE_MODEL_TYPES)} (logits = lm_head(hidden), no soft-capping or scaling)")
    if not isinstance(lm.get_output_embeddings(), nn.Linear):
        return f"its output head is a {type(lm.get_output_embeddings()).__name__}, not a Linear layer"
    return None


def check_fusable(lm: nn.Module) -> None:
    """Refuse `student.liger_fused_ce` for a model or machine it cannot serve, naming the key."""
    problem = fused_ce_problem(lm) or liger_problem(needs_cuda=False)
    if problem is not None:
        raise RecipeError(f"student.liger_fused_ce: {problem}; set student.liger_fused_ce=false")


def fused_token_ce(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of `head(hidden) [..., V]` against `labels [...]` (-100 ignored; 0
    when none counts), without the logits: Liger's fused linear cross-entropy.

    Liger's own "mean" (each row divided by the count of counted labels in the kernel), not a sum
    divided here: Liger computes the gradients in the forward and, when the gradient reaching the
    loss is exactly 1 (a loss weight of 1, no accumulation scaling), skips the backward's rescaling
    pass over the head's gradient and the hidden states' gradient."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    flat = hidden.reshape(-1, hidden.shape[-1])
    target = labels.reshape(-1).long().contiguous()
    weight = head.weight
    accum = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else None
    return liger_fused_linear_cross_entropy(flat, weight, target, bias=head.bias, ignore_index=IGNORE,
                                            reduction="mean", accum_dtype=accum)
