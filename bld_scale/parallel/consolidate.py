"""The trained model's full weights out of a live DeepSpeed engine: fp32, one parameter at a time.

`full_fp32_state(engine)` is collective (every rank calls it, in step): it returns, on rank 0, the
engine module's state dict with every tensor full-size, fp32 and on the CPU (tied names share one
tensor), and None on the other ranks. The weights are the optimizer's fp32 master weights, the
ones a checkpoint stores and `tools/export_hf.py` consolidates with zero_to_fp32, so the run's
final/ folder and the export of its last checkpoint hold the same numbers, on CPU and on GPU.

Why not `deepspeed.zero.GatheredParameters(all parameters)`, as before: at the end of a run the
held-out evaluation (forward only) leaves ZeRO-3's prefetcher with parameters INFLIGHT, gathered
for a backward that never comes; GatheredParameters neither waits for them nor may re-partition
them ("Cannot partition a param in flight"), and it would hold the whole model on one device at
once. Here DeepSpeed's `engine.empty_partition_cache()` first waits for and releases what is in
flight, then DeepSpeed's `safe_get_full_fp32_param` assembles one parameter's fp32 master from its
partitions on the accelerator; rank 0 copies it to the CPU and the device copy is dropped before
the next. Device memory: one full parameter in fp32 (the largest is the embedding: 2 GB for
Llama-3's 128k x 4096). Host memory on rank 0: the state dict, 4 bytes per parameter.

DeepSpeed's own 16-bit consolidation (`engine._zero3_consolidated_16bit_state_dict`, behind
`save_16bit_model`) is not used: it gathers the 16-bit training copy (bf16 on GPU, not what a
checkpoint's export gives) and needs `stage3_gather_16bit_weights_on_model_save`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole of `param` in fp32 on its device, in memory of its own (collective under ZeRO)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)  # the fp32 master, in a new buffer: ZeRO-3, ZeRO-1/2, bf16 optimizer
    if full is not None:
        return full
    if hasattr(param, "ds_id"):  # ZeRO-3 without a master (a frozen parameter): gather this one only
        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().float().clone()
    return param.detach().float().clone()  # no ZeRO, no mixed precision: the parameter is its master


def full_fp32_state(engine, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """`engine.module`'s state dict, full and fp32 on rank `dst`'s CPU (None elsewhere); see module doc.

    Every rank must call it with the same module: each parameter is one collective, taken in the
    module's own state_dict order. Non-floating buffers keep their dtype.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    engine.empty_partition_cache()  # ZeRO-3: wait for and release parameters still in flight
    entries = engine.module.state_dict(keep_vars=True)  # names -> the Parameter / buffer objects
    params = {id(p) for p in engine.module.parameters()}
    state: dict[str, torch.Tensor] = {}
    first_name: dict[int, str] = {}  # id(tensor) -> the name it was gathered under (ties: once, every rank)
    for name, tensor in entries.items():
        if id(tensor) in first_name:
            if rank == dst:
                state[name] = state[first_name[id(tensor)]]  # a tied name: the same tensor
            continue
        first_name[id(tensor)] = name
        if id(tensor) in params:
            full = _full_fp32(tensor)
        else:  # a buffer: whole on every rank
            full = (tensor.detach().float() if tensor.is_floating_point() else tensor.detach()).clone()
        if rank == dst:
            state[name] = full.to("cpu")  # `full` is its own memory: on the CPU already, it is kept as is
        del full  # the device copy goes before the next parameter is gathered
    return state if rank == dst else None
