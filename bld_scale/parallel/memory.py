"""Per-GPU memory of a recipe's teacher and student: the arithmetic behind tools/estimate_memory.py
and `teacher.placement: auto` (`bld_scale.parallel.placement`), kept here so both use the same numbers.

Parameter counts come from the models' configs, built on the meta device (no weights read).

Model states:
- student (training, ZeRO-3): DeepSpeed's own estimator,
  `deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs` (18 bytes per parameter
  over all GPUs + 4 bytes x the largest layer on GPU; CPU figures with its 1.5 buffer factor), for
  no offload, optimizer offload, and optimizer + parameter offload; a ZeRO-2 student
  (`zero_optimization.stage` 2) by `estimate_zero2_model_states_mem_needs` (its 16-bit parameters
  whole on every GPU).
- teacher (inference, no optimizer, no gradients; DeepSpeed has no estimator for it): ZeRO-3, its
  parameters in the teacher dtype over all GPUs (0 with parameter offload, then on CPU per node)
  plus the gathered working set: the largest layer and one prefetch bucket
  (`stage3_prefetch_bucket_size` of the DeepSpeed JSON) in the teacher dtype; replicated
  (`teacher.placement: replicate`), all its parameters in the teacher dtype on every GPU.
On top, per micro-batch (micro_batch_size windows of data.window_bytes; tokens = bytes /
bytes-per-token):
- student activations, bf16, FlashAttention (no L^2 term): 34 x hidden bytes per token per layer
  (Korthikanti et al. 2022); with `train.activation_checkpointing` each layer keeps only its input
  (2 x hidden bytes per token) and one layer's 34 x hidden is live during its recomputation; the
  causal byte head's 34 x width x K per token per head layer;
- student logits: bf16 logits + fp32 upcast for the CE + bf16 gradient (8 bytes per logit), and
  the byte logits [tokens, K, 257] in fp32 (x3: logits, log-softmax, gradient);
- teacher logits as the model returns them (teacher dtype), and one layer's transient activations;
  a float32 copy and float32 log-softmax (8 bytes per logit) only where they are written: every
  method but `bld` with a one-pass conversion (`cover`, `within_token`) at sequence parallelism 1,
  whose fused conversion reads the raw logits and their per-row log-normaliser
  (`bld_scale.convert.dispatch.teacher_token_logits`); the sequence-parallel step still writes them;
- conversion buffers (teacher next-token -> next-byte, `cover`): 0.22 x one sequence's fp32
  log-probabilities (measured peak in docs/bench/byteconv_cpu.json, L=4096, Tekken vocabulary).
With sequence parallelism N GPUs share each window (DeepSpeed Ulysses): every per-window term is
divided by N, and the byte rows the conversion exchanges are added: per byte row a GPU holds, its
float64 partial row, the packed rows sent and received (1036 bytes each) and the combined float64
and float32 rows (~7.2 kB). Model states do not change (ZeRO-3 shards them over all GPUs either way).
These are planning figures (+- 20 %), not guarantees: allocator fragmentation, NCCL buffers and
the CUDA context (~1-2 GB) come on top.
"""
from __future__ import annotations

GB = 1e9
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "auto": 2}
CONVERSION_RATIO = 0.22  # extra peak of byte_logprobs / fp32 log-probs of one sequence (bench)
# Bytes per byte row held under sequence parallelism: float64 partial row (2056), packed rows sent and
# received (1036 each, convert.shard_plan.PACKED_ROW_BYTES), combined float64 (2056) and float32 (1028).
SP_ROW_BYTES = 2056 + 2 * 1036 + 2056 + 1028
# Text bytes per token when none are measured: English web text, Llama-3 / Mistral-class tokenizers.
TEACHER_BYTES_PER_TOKEN = 4.4
STUDENT_BYTES_PER_TOKEN = 3.7
# Student states per offload kind, as the DeepSpeed estimator names them
OFFLOAD_KINDS = ("none", "optimizer", "optimizer+params")


def meta_counts(model) -> tuple[int, int]:
    """(total parameters, largest single module's own parameters), as DeepSpeed's model_to_params
    counts them, but with shared parameters told apart by identity (meta tensors have no data_ptr)."""
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def build_meta(config):
    """An HF causal LM on the meta device from a config dict (with `model_type`) or config object."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        c = config
    else:
        cfg = dict(config)
        c = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(c), c


def offload_kind(zero: dict) -> str:
    """The student's offload in the estimator's terms, from a DeepSpeed JSON's zero_optimization."""
    def on(key):
        return (zero.get(key) or {}).get("device", "none") not in ("none", None)
    if on("offload_param"):
        return "optimizer+params"
    return "optimizer" if on("offload_optimizer") else "none"


def teacher_writes_logprobs(recipe, sequence_parallel: int) -> bool:
    """Whether the training step writes the teacher's float32 log-softmax beside its logits."""
    from bld_scale.convert.dispatch import ONE_PASS_MODES

    d = recipe.distill
    fused = d.method == "bld" and d.conversion in ONE_PASS_MODES and sequence_parallel == 1
    return not fused


def _student_states(s_total: int, s_largest: int, gpus_per_node: int, nodes: int, stage: int) -> dict:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    states = {}
    for name, off_opt, off_par in (("none", False, False), ("optimizer", True, False),
                                   ("optimizer+params", True, True)):
        if stage == 3:
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(s_total, s_largest, gpus_per_node, nodes,
                                                                cpu_offload=off_opt, cpu_offload_params=off_par)
        else:  # stage 2 cannot offload parameters: the optimizer-offload figure for both
            cpu, gpu = estimate_zero2_model_states_mem_needs(s_total, gpus_per_node, nodes, cpu_offload=off_opt)
        states[name] = {"gpu": gpu, "cpu_per_node": cpu}
    return states


def activations(recipe, t_c, s_c, head_width: int, teacher_bpt: float, student_bpt: float,
                sequence_parallel: int = 1) -> dict:
    """Bytes per GPU of one micro-batch's activations and buffers, by part (module docstring)."""
    s, sp = recipe.student, int(sequence_parallel)
    t_bytes = DTYPE_BYTES[recipe.teacher.dtype]
    B, W = recipe.train.micro_batch_size, recipe.data.window_bytes
    t_tok, s_tok = W / teacher_bpt, W / student_bpt
    t_logits = B * (t_tok + 1) * t_c.vocab_size
    s_logits = B * s_tok * s_c.vocab_size
    layer = 34 * s_c.hidden_size * s_tok * B
    checkpointed = getattr(recipe.train, "activation_checkpointing", False)
    act = {
        "student layers": (2 * s_c.hidden_size * s_tok * B * s_c.num_hidden_layers + layer) if checkpointed
        else layer * s_c.num_hidden_layers,
        "student byte head": (34 * head_width * s.K * s.head_num_layers * s_tok * B
                              + 3 * 4 * B * s_tok * s.K * 257),
        "student token logits": 8 * s_logits,
        "teacher logits": t_bytes * t_logits,
        "teacher layer transients": 2 * B * t_tok * (4 * t_c.hidden_size + 3 * t_c.intermediate_size),
        "conversion buffers": CONVERSION_RATIO * 4 * (t_tok + 1) * t_c.vocab_size,
    }
    if teacher_writes_logprobs(recipe, sp):  # float32 copy (unless already fp32) + float32 log-softmax
        act["teacher fp32 log-softmax"] = (4 + (4 if t_bytes < 4 else 0)) * t_logits
    if sp > 1:  # each GPU holds 1/sp of every window's positions
        act = {k: v / sp for k, v in act.items()}
        act["sequence-parallel byte rows"] = SP_ROW_BYTES * B * W / sp
    return act


def estimate(recipe, nodes: int, gpus_per_node: int, t_cfg, s_cfg, teacher_bpt: float = TEACHER_BYTES_PER_TOKEN,
             student_bpt: float = STUDENT_BYTES_PER_TOKEN, sequence_parallel: int = 1) -> dict:
    """The whole estimate: model states (teacher per placement, student per offload kind) and one
    micro-batch's activations, per GPU, for `nodes` x `gpus_per_node` GPUs. `t_cfg`, `s_cfg`: the
    teacher's and the student's model configs (dicts with `model_type`, or config objects; the
    student's with its vocab_size). A bad sequence-parallel size raises ValueError."""
    import torch

    from bld_scale.model.heads import build_byte_head
    from bld_scale.parallel.engines import load_ds_json

    gpus = nodes * gpus_per_node
    sp = int(sequence_parallel)
    if sp < 1 or gpus % sp:
        raise ValueError(f"--sequence-parallel {sp} must divide the {gpus} GPUs (the ranks form groups of {sp})")
    t_model, t_c = build_meta(t_cfg)
    t_total, t_largest = meta_counts(t_model)
    s_model, s_c = build_meta(s_cfg)
    s = recipe.student
    head_kw = {}
    if s.head == "causal":
        head_kw = {"width": s.head_hidden_size or s_c.hidden_size, "layers": s.head_num_layers}
    with torch.device("meta"):
        head = build_byte_head(s.head, s_c.hidden_size, s.K, **head_kw)
    s_lm_total, s_largest = meta_counts(s_model)
    h_total, h_largest = meta_counts(head)
    s_total, s_largest = s_lm_total + h_total, max(s_largest, h_largest)
    zero = load_ds_json(recipe).get("zero_optimization", {})
    prefetch = int(zero.get("stage3_prefetch_bucket_size", 5e7))
    t_bytes = DTYPE_BYTES[recipe.teacher.dtype]
    B, W = recipe.train.micro_batch_size, recipe.data.window_bytes
    act = activations(recipe, t_c, s_c, head_kw.get("width", 0), teacher_bpt, student_bpt, sp)
    teacher = {
        "none": {"gpu": t_bytes * t_total / gpus + t_bytes * (t_largest + prefetch), "cpu_per_node": 0},
        "params": {"gpu": t_bytes * (t_largest + prefetch), "cpu_per_node": t_bytes * t_total / nodes * 1.5},
        "replicate": {"gpu": t_bytes * t_total, "cpu_per_node": 0},
    }
    return {"gpus": gpus, "nodes": nodes, "gpus_per_node": gpus_per_node, "sequence_parallel": sp,
            "teacher": {"params": t_total, "largest_layer": t_largest, "dtype": recipe.teacher.dtype,
                        "vocab": t_c.vocab_size, "tokens_per_window": W / teacher_bpt, "states": teacher},
            "student": {"params": s_total, "lm_params": s_lm_total, "head_params": h_total,
                        "largest_layer": s_largest, "vocab": s_c.vocab_size, "tokens_per_window": W / student_bpt,
                        "zero_stage": int(zero.get("stage", 3)), "offload": offload_kind(zero),
                        "states": _student_states(s_total, s_largest, gpus_per_node, nodes,
                                                  int(zero.get("stage", 3)))},
            "micro_batch": B, "window_bytes": W, "activations": act}
