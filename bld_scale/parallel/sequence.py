"""Sequence parallelism (`parallel.sequence_parallel: N`) with DeepSpeed's Ulysses attention.

DeepSpeed builds the groups (`deepspeed.runtime.sequence_parallel.parallel_state_sp`: N
consecutive ranks share each window; rank `r` is data-parallel replica `r // N`) and does the
attention all-to-all (`UlyssesSPAttentionHF`: each rank holds a slice of the positions, attention
sees the whole sequence with `1/N` of the heads). `register_with_transformers` wraps one model's
attention; the pipeline runs two different models (teacher and student, different head counts),
so `enable_ulysses` makes one `UlyssesSPAttentionHF` per model, as that function would, and
installs a wrapper that picks it by the calling layer's config. Attention masks are dropped, as
DeepSpeed's wrapper does (causal attention over right-padded rows needs none; position ids carry
the order).

`plain_attention()` switches the wrapper off (the original attention, masks kept), for forwards
that are not split: evaluation (each rank its own held-out windows) and the exact conversion's
tree-masked forwards (each rank its own contexts). Runs on CPU (gloo) and GPU (NCCL).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bld_scale.convert.sequence_parallel import SequenceGroup


@dataclass(frozen=True)
class SequenceLayout:
    """Where this rank sits: `sp_rank` of `sp_size` in its window-sharing group (process group
    `group`), data-parallel replica `dp_rank` of `dp_size`."""

    sp_rank: int
    sp_size: int
    dp_rank: int
    dp_size: int
    group: object = None

    def sequence_group(self) -> SequenceGroup:
        """This rank's place in its group, as the sequence-parallel conversion takes it."""
        return SequenceGroup(self.sp_rank, self.sp_size, self.group)

    def group_sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over this rank's sequence-parallel group (an all-reduce)."""
        if self.sp_size > 1:
            dist.all_reduce(values, group=self.group)
        return values


def sequence_layout(size: int, world: int, rank: int) -> SequenceLayout:
    """DeepSpeed's sequence-parallel groups for `size` ranks per window (collective: every rank)."""
    if size < 1 or world % size:
        raise ValueError(f"parallel.sequence_parallel={size} does not divide the world size {world}: the "
                         f"ranks form groups of {size} that share each window; launch a multiple of {size} "
                         f"ranks (e.g. --num_gpus {size * max(1, world // size)}) or change the key")
    if size == 1:
        return SequenceLayout(0, 1, rank, world)
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    mpu.initialize_sequence_parallel(sequence_parallel_size=size)
    group = mpu.get_sequence_parallel_group()
    return SequenceLayout(dist.get_rank(group), size, rank // size, world // size, group)


class _UlyssesDispatch:
    """Stands in for one attention implementation: the calling model's Ulysses attention, or the
    original function while `plain` is set."""

    def __init__(self, original, by_config: dict):
        self.original, self.by_config, self.plain = original, by_config, False

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        uattn = self.by_config.get(id(getattr(module, "config", None)))
        if self.plain or uattn is None:
            return self.original(module, query, key, value, attention_mask, *args, **kwargs)
        return uattn(module, query, key, value, None, *args, **kwargs)


_INSTALLED: list[_UlyssesDispatch] = []


def enable_ulysses(models: list, layout: SequenceLayout, micro_batch_size: int) -> None:
    """Split the attention of each Hugging Face model in `models` over `layout.group` (Ulysses).

    Each model's attention heads must divide by the group size (DeepSpeed's requirement)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    by_impl: dict[str, dict] = {}
    for model in models:
        config = model.config
        text = config.get_text_config()
        impl = text._attn_implementation
        if impl in ("eager", None):
            raise ValueError(f"sequence parallelism needs sdpa or flash attention; {text.model_type} runs {impl!r}")
        if text.num_attention_heads % layout.sp_size:
            raise ValueError(f"parallel.sequence_parallel={layout.sp_size} must divide the attention heads of "
                             f"{text.model_type} ({text.num_attention_heads}): Ulysses gives each rank whole heads")
        uattn = UlyssesSPAttentionHF(
            attn=ALL_ATTENTION_FUNCTIONS[impl], batch_size=micro_batch_size,
            attn_head_count=text.num_attention_heads,
            attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            kv_head_count=text.num_key_value_heads, num_hidden_layers=text.num_hidden_layers,
            process_group=layout.group, seq_length_is_variable=True)
        uattn.core_attn_implementation = impl
        by_impl.setdefault(impl, {}).update({id(config): uattn, id(text): uattn})
    for impl, by_config in by_impl.items():
        dispatch = _UlyssesDispatch(ALL_ATTENTION_FUNCTIONS[impl], by_config)
        ALL_ATTENTION_FUNCTIONS[impl] = dispatch
        _INSTALLED.append(dispatch)


def unsplit(method):
    """Decorator: `method` runs under `plain_attention()` (each rank its own whole sequences)."""
    @functools.wraps(method)
    def run(*args, **kwargs):
        with plain_attention():
            return method(*args, **kwargs)
    return run


@contextlib.contextmanager
def plain_attention():
    """Inside: every model attends over the positions it is given, with its masks (no Ulysses)."""
    before = [d.plain for d in _INSTALLED]
    for d in _INSTALLED:
        d.plain = True
    try:
        yield
    finally:
        for d, was in zip(_INSTALLED, before):
            d.plain = was
