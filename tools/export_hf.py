"""Export a training checkpoint's student as a Hugging Face folder.

    python tools/export_hf.py CHECKPOINT OUT [--no-byte-head] [--dtype fp32|bf16|fp16]

CHECKPOINT is a step folder (`<output_dir>/checkpoints/step-N`), a checkpoint root, or an
output_dir (its current checkpoint). OUT receives `config.json`, `model.safetensors` (sharded when
large), `generation_config.json`, the student tokenizer's files, and `byte_head.safetensors` +
`byte_head.json` beside them (left out with --no-byte-head). `AutoModelForCausalLM.from_pretrained
(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load it offline; `bld_scale.model.student.load_student
(OUT)` loads model and head together. The tokenizer's default encoding puts the BOS the student
was trained with in front of a text (`bld_scale.model.export.save_tokenizer`), so `tok(text)`
feeds `generate` what training fed the model.

The checkpoint is verified first (every file's size and SHA-256 against its manifest); a damaged
one, or one of an unknown format, is refused in one line naming the file and the problem (exit
status 2), before any work. The ZeRO-3 shards (any world size) are consolidated in this one process with DeepSpeed's
zero_to_fp32 (`get_fp32_state_dict_from_zero_checkpoint`): the fp32 master weights, on CPU, no
GPU or process group needed. Memory: about the checkpoint's optimizer files (fp32 weights and
Adam moments of every rank) while reading.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def consolidated_state_dict(step_dir: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from bld_scale.checkpoint import DS_TAG, DamagedCheckpointError

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DS_TAG)
    except (RuntimeError, ValueError, KeyError, OSError) as err:  # torch's zip reader, DeepSpeed's checks
        raise DamagedCheckpointError(f"{step_dir / DS_TAG}: DeepSpeed could not consolidate the shards: "
                                     f"{type(err).__name__}: {err}") from err


def build_from_checkpoint(step_dir: Path):
    """The student (HF LM + byte head) with the checkpoint's fp32 weights, and its tokenizer."""
    from bld_scale.checkpoint import STUDENT_FILES, DamagedCheckpointError
    from bld_scale.model.export import load_full_state, student_from_files

    if not (step_dir / STUDENT_FILES / "config.json").is_file():
        raise DamagedCheckpointError(f"{step_dir / STUDENT_FILES / 'config.json'}: missing; the student cannot be "
                                     "rebuilt from this checkpoint")
    student, tokenizer = student_from_files(step_dir / STUDENT_FILES)
    load_full_state(student, consolidated_state_dict(step_dir), where=str(step_dir))
    return student, tokenizer


def export(checkpoint: str | Path, out: str | Path, byte_head: bool = True, dtype: str = "fp32") -> Path:
    import torch

    from bld_scale.checkpoint import read_meta, require_whole, resolve_checkpoint
    from bld_scale.model.export import save_hf_folder

    step_dir = resolve_checkpoint(checkpoint)
    require_whole(step_dir)  # first: a damaged checkpoint is refused before any work
    meta = read_meta(step_dir)  # and one of an unknown format
    student, tokenizer = build_from_checkpoint(step_dir)
    student.to(getattr(torch, DTYPES[dtype]))
    out = save_hf_folder(student, tokenizer, out, byte_head=byte_head)
    (out / "bld_export.json").write_text(json.dumps(
        {"checkpoint": str(step_dir), "step": meta["step"], "byte_head": byte_head, "dtype": dtype,
         "teacher": meta["run"].get("identity", {}).get("teacher")}, indent=2))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="step folder, checkpoint root or output_dir")
    ap.add_argument("out", help="folder to write the Hugging Face model into")
    ap.add_argument("--no-byte-head", action="store_true", help="leave byte_head.* out")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' dtype (default fp32)")
    args = ap.parse_args(argv)
    from bld_scale.checkpoint import ResumeError

    try:
        out = export(args.checkpoint, args.out, byte_head=not args.no_byte_head, dtype=args.dtype)
    except (ResumeError, OSError) as err:  # damaged, of an unknown format, not there, or not writable
        print(f"bld_scale: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
