"""Export a training checkpoint's student as a Hugging Face folder.

    python tools/export_hf.py CHECKPOINT OUT [--no-byte-head] [--dtype fp32|bf16|fp16]

CHECKPOINT is a step folder (`<output_dir>/checkpoints/step-N`), a checkpoint root, or an
output_dir (its current checkpoint). OUT receives `config.json`, `model.safetensors` (sharded when
large), `generation_config.json`, the student tokenizer's files, and `byte_head.safetensors` +
`byte_head.json` beside them (left out with --no-byte-head). `AutoModelForCausalLM.from_pretrained
(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load it offline; `bld_scale.student.load_student
(OUT)` loads model and head together.

The ZeRO-3 shards (any world size) are consolidated in this one process with DeepSpeed's
zero_to_fp32 (`get_fp32_state_dict_from_zero_checkpoint`): the fp32 master weights, on CPU, no
GPU or process group needed. Memory: about the checkpoint's optimizer files (fp32 weights and
Adam moments of every rank) while reading.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def consolidated_state_dict(step_dir: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from bld_scale.checkpoint.manager import DS_TAG

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DS_TAG)


def build_from_checkpoint(step_dir: Path):
    """The student (HF LM + byte head) with the checkpoint's fp32 weights, and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bld_scale.checkpoint.manager import STUDENT_FILES
    from bld_scale.model.heads import HEAD_CONFIG_FILE, build_byte_head
    from bld_scale.model.student import Student

    files = step_dir / STUDENT_FILES
    config = AutoConfig.from_pretrained(files)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    head_cfg = json.loads((files / HEAD_CONFIG_FILE).read_text())
    head = build_byte_head(head_cfg["kind"], head_cfg["hidden_size"], head_cfg["K"], **head_cfg.get("size", {}))
    student = Student(lm, head)
    state = consolidated_state_dict(step_dir)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {k for k in missing if config.get_text_config().tie_word_embeddings and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{step_dir}: checkpoint does not fit the saved student config: missing "
                           f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    if tied:
        lm.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(files)
    return student, tokenizer


def export(checkpoint: str | Path, out: str | Path, byte_head: bool = True, dtype: str = "fp32") -> Path:
    import torch

    from bld_scale.checkpoint.manager import read_meta, resolve_checkpoint
    from bld_scale.model.heads import save_byte_head

    step_dir = resolve_checkpoint(checkpoint)
    student, tokenizer = build_from_checkpoint(step_dir)
    student.to(getattr(torch, DTYPES[dtype]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    student.lm.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if byte_head:
        save_byte_head(student.byte_head, out)
    meta = read_meta(step_dir)
    (out / "bld_export.json").write_text(json.dumps(
        {"checkpoint": str(step_dir), "step": meta["step"], "byte_head": byte_head, "dtype": dtype,
         "teacher": meta.get("identity", {}).get("teacher")}, indent=2))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="step folder, checkpoint root or output_dir")
    ap.add_argument("out", help="folder to write the Hugging Face model into")
    ap.add_argument("--no-byte-head", action="store_true", help="leave byte_head.* out")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' dtype (default fp32)")
    args = ap.parse_args(argv)
    out = export(args.checkpoint, args.out, byte_head=not args.no_byte_head, dtype=args.dtype)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
