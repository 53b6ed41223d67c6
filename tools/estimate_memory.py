"""Per-GPU memory of a recipe's teacher and student under ZeRO-3, for a cluster shape.

    python tools/estimate_memory.py [--config RECIPE.yaml] [--nodes N] [--gpus-per-node G]
        [--teacher-config llama-3.1-8b|CONFIG.json] [--student-vocab V] [--sequence-parallel N]
        [key=value ...]

Parameter counts come from the recipe's own model configs, built on the meta device (no weights
read). Where a config is not on this machine (the shipped 8B recipe names /models/...), give it
with --teacher-config (a config.json or the preset `llama-3.1-8b`) and --student-vocab.

The arithmetic (model states, activations, what each assumes) is `bld_scale.parallel.memory`'s,
shared with `teacher.placement: auto`; this tool prints it and the placement `auto` would choose
on a GPU of --gpu-memory-gb (`bld_scale.parallel.placement.fits_replicated`: the margin there).
These are planning figures (+- 20 %), not guarantees.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bld_scale.parallel import memory
from bld_scale.parallel.memory import GB, SP_ROW_BYTES  # noqa: F401  (SP_ROW_BYTES: the tests read it here)
from bld_scale.parallel.placement import fits_replicated

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "launch" / "recipes" / "demo.yaml"
PRESETS = {
    "llama-3.1-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "max_position_embeddings": 131072,
                     "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 500000.0},
}


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
    """`bld_scale.parallel.memory.estimate`, a bad sequence-parallel size as the tool's exit."""
    try:
        return memory.estimate(recipe, nodes, gpus_per_node, t_cfg, s_cfg, teacher_bpt, student_bpt, sequence_parallel)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def auto_placement(e: dict, gpu_memory_gb: float) -> dict:
    """What `teacher.placement: auto` chooses for this estimate on a GPU of `gpu_memory_gb` (1e9 bytes)."""
    fits, words = fits_replicated(e, int(gpu_memory_gb * GB))
    return {"gpu_memory_gb": gpu_memory_gb, "placement": "replicate" if fits else "zero3", "arithmetic": words}


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
        f"  teacher, replicated (placement replicate) {t['states']['replicate']['gpu'] / GB:7.2f}  {0:10.1f}",
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
    rep = t["states"]["replicate"]["gpu"] + s["states"]["none"]["gpu"] + act_total
    lines += ["", f"per-GPU total, no offload:                 {both / GB:8.2f} GB",
              f"per-GPU total, student optimizer offloaded: {off / GB:7.2f} GB",
              f"per-GPU total, teacher replicated:          {rep / GB:7.2f} GB"]
    if "placement_auto" in e:
        p = e["placement_auto"]
        lines += [f"teacher.placement auto on a {p['gpu_memory_gb']:g} GB GPU (student offload "
                  f"{s['offload']}): {p['placement']} ({p['arithmetic']})"]
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
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0,
                    help="memory of one GPU, for the placement teacher.placement auto would choose (H100: 80)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted recipe overrides (train.micro_batch_size=2 ...)")
    args = ap.parse_args(argv)
    from bld_scale.config import load_recipe

    recipe = load_recipe(args.config, args.overrides, check_paths=False)
    e = estimate(recipe, args.nodes, args.gpus_per_node, teacher_config(recipe, args.teacher_config),
                 student_config(recipe, args.student_vocab), args.teacher_bytes_per_token,
                 args.student_bytes_per_token,
                 args.sequence_parallel if args.sequence_parallel is not None else recipe.parallel.sequence_parallel)
    e["placement_auto"] = auto_placement(e, args.gpu_memory_gb)
    print(json.dumps(e, indent=2) if args.json else render(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
