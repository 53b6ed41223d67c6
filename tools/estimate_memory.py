"""Per-GPU memory of a recipe's teacher and student under ZeRO-3, for a cluster shape.

    python tools/estimate_memory.py [--config RECIPE.yaml] [--nodes N] [--gpus-per-node G]
        [--teacher-config llama-3.1-8b|CONFIG.json] [--student-vocab V] [--sequence-parallel N]
        [key=value ...]

Parameter counts come from the recipe's own model configs, built on the meta device (no weights
read). Where a config is not on this machine (the shipped 8B recipe names /models/...), give it
with --teacher-config (a config.json or the preset `llama-3.1-8b`) and --student-vocab.

Model states:
- student (training, ZeRO-3): DeepSpeed's own estimator,
  `deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs` (18 bytes per parameter
  over all GPUs + 4 bytes x the largest layer on GPU; CPU figures with its 1.5 buffer factor), for
  no offload, optimizer offload, and optimizer + parameter offload.
- teacher (inference, ZeRO-3, no optimizer, no gradients; DeepSpeed has no estimator for it):
  its parameters in the teacher dtype over all GPUs (0 with parameter offload, then on CPU per
  node), plus the gathered working set: the largest layer and one prefetch bucket
  (`stage3_prefetch_bucket_size` of the DeepSpeed JSON) in the teacher dtype.
On top, per micro-batch (micro_batch_size windows of data.window_bytes; tokens = bytes /
bytes-per-token, flags below):
- student activations without activation checkpointing, bf16, FlashAttention (no L^2 term):
  34 x hidden bytes per token per layer (Korthikanti et al. 2022), and the causal byte head's
  34 x width x K per token per head layer;
- student logits: bf16 logits + fp32 upcast for the CE + bf16 gradient (8 bytes per logit), and
  the byte logits [tokens, K, 257] in fp32 (x3: logits, log-softmax, gradient);
- teacher logits: bf16 logits + fp32 copy + fp32 log-softmax (10 bytes per logit), and one layer's
  transient activations;
- conversion buffers (teacher next-token -> next-byte, `cover`): 0.22 x one sequence's fp32
  log-probabilities (measured peak in docs/bench/byteconv_cpu.json, L=4096, Tekken vocabulary).
With sequence parallelism (`--sequence-parallel N`, default the recipe's parallel.sequence_parallel)
N GPUs share each window (DeepSpeed Ulysses): every per-window term above is divided by N (each
GPU holds 1/N of the positions, attention all-to-all over heads), and the byte rows the
conversion exchanges are added: per byte row a GPU holds, its float64 partial row, the packed
rows sent and received (1036 bytes each) and the combined float64 and float32 rows (~7.2 kB).
Model states do not change (ZeRO-3 shards them over all GPUs either way).
These are planning figures (+- 20 %), not guarantees: allocator fragmentation, NCCL buffers and
the CUDA context (~1-2 GB) come on top.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "launch" / "recipes" / "demo.yaml"
GB = 1e9
PRESETS = {
    "llama-3.1-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "max_position_embeddings": 131072,
                     "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 500000.0},
}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "auto": 2}
CONVERSION_RATIO = 0.22  # extra peak of byte_logprobs / fp32 log-probs of one sequence (bench)
# Bytes per byte row held under sequence parallelism: float64 partial row (2056), packed rows sent and
# received (1036 each, convert.shard_plan.PACKED_ROW_BYTES), combined float64 (2056) and float32 (1028).
SP_ROW_BYTES = 2056 + 2 * 1036 + 2056 + 1028


def _meta_counts(model) -> tuple[int, int]:
    """(total parameters, largest single module's own parameters), as DeepSpeed's model_to_params
    counts them, but with shared parameters told apart by identity (meta tensors have no data_ptr)."""
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def _build_meta(config: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    c = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(c), c


def teacher_config(recipe, override: str | None) -> dict:
    if override:
        return dict(PRESETS[override]) if override in PRESETS else json.loads(Path(override).read_text())
    from bld_scale.train.setup import teacher_section

    path = Path(teacher_section(recipe).path) / "config.json"  # a .gguf teacher: its converted folder
    if not path.is_file():
        raise SystemExit(f"teacher config {path} is not on this machine: pass --teacher-config "
                         f"({' or '.join(PRESETS)} or a config.json)")
    return json.loads(path.read_text())


def student_config(recipe, vocab: int | None) -> dict:
    from bld_scale.train.setup import student_config_dict

    cfg = student_config_dict(recipe)
    if vocab is None:
        try:
            from transformers import AutoTokenizer

            vocab = len(AutoTokenizer.from_pretrained(recipe.student.tokenizer))
        except (OSError, ValueError):
            raise SystemExit(f"student tokenizer {recipe.student.tokenizer} is not on this machine: pass "
                             "--student-vocab (e.g. 32768 for Mistral v0.3)") from None
    cfg["vocab_size"] = vocab
    return cfg


def estimate(recipe, nodes: int, gpus_per_node: int, t_cfg: dict, s_cfg: dict,
             teacher_bpt: float, student_bpt: float, sequence_parallel: int = 1) -> dict:
    import torch
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from bld_scale.model.heads import build_byte_head
    from bld_scale.parallel.engines import load_ds_json

    gpus = nodes * gpus_per_node
    sp = int(sequence_parallel)
    if sp < 1 or gpus % sp:
        raise SystemExit(f"--sequence-parallel {sp} must divide the {gpus} GPUs (the ranks form groups of {sp})")
    t_model, t_c = _build_meta(t_cfg)
    t_total, t_largest = _meta_counts(t_model)
    s_model, s_c = _build_meta(s_cfg)
    s = recipe.student
    head_kw = {}
    if s.head == "causal":
        head_kw = {"width": s.head_hidden_size or s_c.hidden_size, "layers": s.head_num_layers}
    with torch.device("meta"):
        head = build_byte_head(s.head, s_c.hidden_size, s.K, **head_kw)
    s_lm_total, s_largest = _meta_counts(s_model)
    h_total, h_largest = _meta_counts(head)
    s_total, s_largest = s_lm_total + h_total, max(s_largest, h_largest)
    ds = load_ds_json(recipe).get("zero_optimization", {})
    prefetch = int(ds.get("stage3_prefetch_bucket_size", 5e7))
    t_bytes = DTYPE_BYTES[recipe.teacher.dtype]

    B, W = recipe.train.micro_batch_size, recipe.data.window_bytes
    t_tok, s_tok = W / teacher_bpt, W / student_bpt
    t_logits = B * (t_tok + 1) * t_c.vocab_size
    s_logits = B * s_tok * s_c.vocab_size
    act = {
        "student layers": 34 * s_c.hidden_size * s_tok * B * s_c.num_hidden_layers,
        "student byte head": (34 * head_kw.get("width", 0) * s.K * s.head_num_layers * s_tok * B
                              + 3 * 4 * B * s_tok * s.K * 257),
        "student token logits": 8 * s_logits,
        "teacher logits + log-softmax": 10 * t_logits,
        "teacher layer transients": 2 * B * t_tok * (4 * t_c.hidden_size + 3 * t_c.intermediate_size),
        "conversion buffers": CONVERSION_RATIO * 4 * (t_tok + 1) * t_c.vocab_size,
    }
    if sp > 1:  # each GPU holds 1/sp of every window's positions
        act = {k: v / sp for k, v in act.items()}
        act["sequence-parallel byte rows"] = SP_ROW_BYTES * B * W / sp
    student = {}
    for name, off_opt, off_par in (("none", False, False), ("optimizer", True, False),
                                   ("optimizer+params", True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(s_total, s_largest, gpus_per_node, nodes,
                                                            cpu_offload=off_opt, cpu_offload_params=off_par)
        student[name] = {"gpu": gpu, "cpu_per_node": cpu}
    teacher = {
        "none": {"gpu": t_bytes * t_total / gpus + t_bytes * (t_largest + prefetch), "cpu_per_node": 0},
        "params": {"gpu": t_bytes * (t_largest + prefetch), "cpu_per_node": t_bytes * t_total / nodes * 1.5},
    }
    return {"gpus": gpus, "nodes": nodes, "gpus_per_node": gpus_per_node, "sequence_parallel": sp,
            "teacher": {"params": t_total, "largest_layer": t_largest, "dtype": recipe.teacher.dtype,
                        "vocab": t_c.vocab_size, "tokens_per_window": t_tok, "states": teacher},
            "student": {"params": s_total, "lm_params": s_lm_total, "head_params": h_total,
                        "largest_layer": s_largest, "vocab": s_c.vocab_size, "tokens_per_window": s_tok,
                        "states": student},
            "micro_batch": B, "window_bytes": W, "activations": act}


def render(e: dict) -> str:
    t, s, act = e["teacher"], e["student"], e["activations"]
    act_total = sum(act.values())
    lines = [
        f"cluster: {e['nodes']} node(s) x {e['gpus_per_node']} GPUs = {e['gpus']} GPUs; micro batch "
        f"{e['micro_batch']} x {e['window_bytes']} bytes"
        + (f", each window split over {e['sequence_parallel']} GPUs (sequence parallel)"
           if e.get("sequence_parallel", 1) > 1 else ""),
        f"teacher: {t['params'] / 1e9:.2f}B parameters ({t['dtype']}), largest layer "
        f"{t['largest_layer'] / 1e6:.0f}M, vocab {t['vocab']}, ~{t['tokens_per_window']:.0f} tokens/window",
        f"student: {s['params'] / 1e9:.3f}B parameters (LM {s['lm_params'] / 1e9:.3f}B + byte head "
        f"{s['head_params'] / 1e6:.1f}M), largest layer {s['largest_layer'] / 1e6:.0f}M, vocab {s['vocab']}, "
        f"~{s['tokens_per_window']:.0f} tokens/window",
        "",
        "model states per GPU (GB)                     GPU      CPU/node",
        f"  teacher, ZeRO-3 inference                {t['states']['none']['gpu'] / GB:8.2f}  {0:10.1f}",
        f"  teacher, parameters offloaded            {t['states']['params']['gpu'] / GB:8.2f}  "
        f"{t['states']['params']['cpu_per_node'] / GB:10.1f}",
    ]
    for name, label in (("none", "student, ZeRO-3 (DeepSpeed estimator)"),
                        ("optimizer", "student, optimizer offloaded"),
                        ("optimizer+params", "student, optimizer+params offloaded")):
        st = s["states"][name]
        lines.append(f"  {label:<40} {st['gpu'] / GB:8.2f}  {st['cpu_per_node'] / GB:10.1f}")
    lines += ["", "activations and buffers per GPU, one micro-batch (GB)"]
    lines += [f"  {k:<40} {v / GB:8.2f}" for k, v in act.items()]
    lines.append(f"  {'total':<40} {act_total / GB:8.2f}")
    both = t["states"]["none"]["gpu"] + s["states"]["none"]["gpu"] + act_total
    off = t["states"]["none"]["gpu"] + s["states"]["optimizer"]["gpu"] + act_total
    lines += ["", f"per-GPU total, no offload:                 {both / GB:8.2f} GB",
              f"per-GPU total, student optimizer offloaded: {off / GB:7.2f} GB"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEMO_RECIPE), help="recipe YAML")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--teacher-config", default=None, help=f"{' or '.join(PRESETS)} or a config.json")
    ap.add_argument("--student-vocab", type=int, default=None)
    ap.add_argument("--teacher-bytes-per-token", type=float, default=4.4)
    ap.add_argument("--student-bytes-per-token", type=float, default=3.7)
    ap.add_argument("--sequence-parallel", type=int, default=None,
                    help="GPUs that share each window (default: the recipe's parallel.sequence_parallel)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted recipe overrides (train.micro_batch_size=2 ...)")
    args = ap.parse_args(argv)
    from bld_scale.config import load_recipe

    recipe = load_recipe(args.config, args.overrides, check_paths=False)
    e = estimate(recipe, args.nodes, args.gpus_per_node, teacher_config(recipe, args.teacher_config),
                 student_config(recipe, args.student_vocab), args.teacher_bytes_per_token,
                 args.student_bytes_per_token,
                 args.sequence_parallel if args.sequence_parallel is not None else recipe.parallel.sequence_parallel)
    print(json.dumps(e, indent=2) if args.json else render(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
