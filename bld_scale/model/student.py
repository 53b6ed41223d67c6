"""The student: any Hugging Face causal LM plus a byte decoder head (see ``heads.py``).

``Student.forward(input_ids, attention_mask, prev_bytes) -> (token_logits [B,J,V],
byte_logits [B,J,K,257])``. The byte head reads the hidden state that predicts the next token: the
base model's ``last_hidden_state`` (after the final norm). In transformers v5 ``hidden_states[-1]``
of ``output_hidden_states=True`` is that same tensor for Llama/Qwen2/Mistral/Gemma (a test checks
it), but we take it from the base model's own output through a forward hook so that (a) the token
logits still come from the model's own head (logit soft-capping etc. included) and (b) the model
does not have to return every layer's hidden states.

Attention implementation: ``pick_attn_implementation("auto")`` is FlashAttention-2 when
``flash_attn`` (version 2) imports and CUDA is present, else PyTorch SDPA; "sdpa", "eager" and
"flash_attention_2" can be forced (forcing flash without it is an error, not a silent fallback;
recipe validation refuses it earlier, see ``bld_scale.config.flash_attention_problem``).
"""
from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from bld_scale.config import flash_attention_problem
from bld_scale.model.fused_loss import fused_token_ce
from bld_scale.model.heads import ByteHead, build_byte_head, load_byte_head, save_byte_head
from bld_scale.model.projectors import DualSpaceProjectors

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def flash_attention_available() -> bool:
    """True when FlashAttention-2 can run: flash_attn (version 2) imports and a CUDA device is present."""
    return flash_attention_problem() is None


def pick_attn_implementation(requested: str = "auto") -> str:
    """Resolve the attention implementation handed to transformers."""
    if requested == "auto":
        return "flash_attention_2" if flash_attention_available() else "sdpa"
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attn_implementation {requested!r}; "
                         f"choose 'auto' or one of {ATTN_IMPLEMENTATIONS}")
    if requested == "flash_attention_2" and (problem := flash_attention_problem()) is not None:
        raise RuntimeError(f"attn_implementation='flash_attention_2' was forced but needs the "
                           f"flash_attn package and a CUDA device, but {problem}; use 'auto' or 'sdpa'")
    return requested


class Student(nn.Module):
    """A causal LM (``self.lm``) and a byte head (``self.byte_head``) reading its last hidden state.

    ``projectors``: DSKD's trainable projectors (``distill.method: dskd``), a submodule like the
    head so the optimizer and checkpoints hold them; None otherwise. Export leaves them out.
    """

    def __init__(self, lm: PreTrainedModel, byte_head: ByteHead, projectors: DualSpaceProjectors | None = None):
        super().__init__()
        hidden_size = lm.config.get_text_config().hidden_size
        if byte_head.hidden_size != hidden_size:
            raise ValueError(f"byte head hidden size {byte_head.hidden_size} != model's {hidden_size}")
        self.lm = lm
        self.byte_head = byte_head
        self.projectors = projectors

    @property
    def config(self) -> PretrainedConfig:
        return self.lm.config

    @property
    def K(self) -> int:
        return self.byte_head.K

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prev_bytes: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_hidden: bool = False, token_labels: torch.Tensor | None = None,
                **lm_kwargs) -> tuple[torch.Tensor, ...]:
        """Token logits [B,J,V] and byte logits [B,J,K,257] for every position.

        ``prev_bytes [B,J,K]``: the true bytes of the token each position predicts (-100 masked);
        the linear head ignores it (may be None), the causal head needs it. ``return_hidden``:
        also return the last hidden state ``[B,J,H]`` (third). ``position_ids``
        restarting at 0 with ``attention_mask=None`` mark packed sequences (``bld_scale.data.packing``):
        attention stays inside each. ``token_labels [B,J]`` given (``student.liger_fused_ce``):
        the mean token cross-entropy against them (a scalar) comes first instead of the logits,
        the head fused into it (``bld_scale.model.fused_loss``): the logits are never made.
        """
        if token_labels is not None:
            hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, use_cache=False, **lm_kwargs).last_hidden_state
            ce = fused_token_ce(hidden, self.lm.get_output_embeddings(), token_labels)
            return (ce, self.byte_head(hidden, prev_bytes)) + ((hidden,) if return_hidden else ())
        captured: dict[str, torch.Tensor] = {}

        def keep_last_hidden(_module, _args, output):
            captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        # Registered per call (not once) so the module holds no hidden state between calls.
        handle = self.lm.get_decoder().register_forward_hook(keep_last_hidden)
        try:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False, **lm_kwargs)
        finally:
            handle.remove()
        if return_hidden:
            return out.logits, self.byte_head(captured["hidden"], prev_bytes), captured["hidden"]
        return out.logits, self.byte_head(captured["hidden"], prev_bytes)

    def save(self, folder: str | os.PathLike) -> None:
        save_student(self, folder)


def _as_config(model_config: dict | PretrainedConfig) -> PretrainedConfig:
    if isinstance(model_config, PretrainedConfig):
        return model_config
    fields = dict(model_config)
    if "model_type" not in fields:
        raise ValueError("a dict model_config needs 'model_type' (e.g. 'llama', 'qwen2', 'mistral', 'gemma')")
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def build_student(model_config: dict | PretrainedConfig | None = None, head_kind: str = "linear",
                  K: int = 10, attn_implementation: str = "auto", head_size: dict | None = None,
                  dtype: torch.dtype | None = None, pretrained: str | os.PathLike | None = None,
                  teacher_hidden_size: int | None = None) -> Student:
    """A student with freshly initialised byte head.

    The LM is randomly initialised from ``model_config`` (a config object or a dict with
    ``model_type``), or, when ``pretrained`` names a local Hugging Face model folder, loaded from it
    (``model_config`` then ignored). ``head_size``: options of the head kind (causal: width, layers,
    heads, mlp_ratio, dropout). ``dtype`` applies to both LM and head. ``teacher_hidden_size``
    given: DSKD's projectors too (built after the head, so the body and head draw the same random
    numbers with or without them).
    """
    impl = pick_attn_implementation(attn_implementation)
    if pretrained is not None:
        lm = AutoModelForCausalLM.from_pretrained(pretrained, attn_implementation=impl, dtype=dtype or "auto")
    else:
        if model_config is None:
            raise ValueError("build_student needs model_config or pretrained")
        kwargs = {"dtype": dtype} if dtype is not None else {}
        lm = AutoModelForCausalLM.from_config(_as_config(model_config), attn_implementation=impl, **kwargs)
    head = build_byte_head(head_kind, lm.config.get_text_config().hidden_size, K, **(head_size or {}))
    head.to(device=lm.device, dtype=lm.dtype)  # same precision as the LM it extends
    projectors = None
    if teacher_hidden_size is not None:
        width = lm.config.get_text_config().hidden_size
        projectors = DualSpaceProjectors(width, lm.get_input_embeddings().embedding_dim, teacher_hidden_size,
                                         teacher_hidden_size).to(device=lm.device, dtype=lm.dtype)
    return Student(lm, head, projectors)


def save_student(student: Student, folder: str | os.PathLike) -> None:
    """HF ``save_pretrained`` of the LM, and ``byte_head.safetensors``/``.json`` beside it."""
    student.lm.save_pretrained(folder)
    save_byte_head(student.byte_head, folder)


def load_student(folder: str | os.PathLike, attn_implementation: str = "auto",
                 dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Student:
    """Inverse of ``save_student``; weights keep their saved dtype unless ``dtype`` is given."""
    impl = pick_attn_implementation(attn_implementation)
    lm = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=impl, dtype=dtype or "auto")
    head = load_byte_head(folder, device=device, dtype=dtype)
    return Student(lm.to(device), head)
