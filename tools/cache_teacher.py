"""Run a recipe's teacher once over its training windows and store its next-byte targets.

    python tools/cache_teacher.py --config RECIPE --out DIR [--kl-per-value LAM | --tail-mass TAU] [--top-k K]
        [--dtype sqrt|uint8|float16|float32] [--sqrt-steps S] [--no-compress] [--max-windows N] [--windows-per-shard W]
        [--batch-size B] [key=value ...]
    deepspeed [--num_gpus G] tools/cache_teacher.py ...      (or torchrun: ranks split the shards)

The windows are the recipe's training stream in the pipeline's order (seed, data.*), the first N
with --max-windows (default: one epoch). Each text byte keeps its most probable next-byte values
(byte value and log-probability), each one that saves at least LAM bits of KL (by default), or as
many as leave at most TAU of the mass out (with --tail-mass), at most K of them, and that remaining
mass (--tail-mass 0: exactly K values per byte, a fixed top-k; --top-k 257: the whole row, lossless
in float32); see `bld_scale.cache` for the files, the manifest and how truncated rows are decoded.
Train from it with `distill.teacher_cache=DIR`: no teacher loaded, a student of any tokenizer.
Rerunning the same command resumes: shards already written and intact are kept, the rest (never
written, partial, damaged) are redone. Exit status: 0 done; 2 refused (one `bld_scale:` line).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe YAML the students will train with")
    parser.add_argument("--out", required=True, help="the cache folder (created; a rerun resumes it)")
    parser.add_argument("--kl-per-value", type=float, default=None, metavar="LAM", help="keep a byte value when "
                        "it saves at least LAM bits of KL on its row (0 < LAM < 1); default "
                        "bld_scale.cache.rows.DEFAULT_KL_PER_VALUE")
    parser.add_argument("--tail-mass", type=float, default=None, metavar="TAU", help="instead: the most "
                        "probability mass a text byte's row may leave out of its stored values (0 < TAU < 1), "
                        "or 0 for a fixed top-k")
    parser.add_argument("--top-k", type=int, default=None, help="the most byte values kept per text byte "
                        "(1..255 with a tail mass; 1..256 with --tail-mass 0, exactly K; 257: everything); "
                        "default bld_scale.cache.rows.DEFAULT_TOP_K, or DEFAULT_FIXED_TOP_K with --tail-mass 0")
    parser.add_argument("--dtype", choices=("sqrt", "uint8", "float16", "float32"), default=None,
                        help="stored values (sqrt: codes of sqrt(p), each row's most probable implied, adaptive rows "
                        "only; uint8: log-probabilities in 1/16-nat steps); default "
                        "bld_scale.cache.rows.DEFAULT_DTYPE, or DEFAULT_FIXED_DTYPE with --tail-mass 0 or --top-k 257")
    parser.add_argument("--sqrt-steps", type=int, default=None, metavar="S", help="with --dtype sqrt: codes in "
                        "steps of 1/S in sqrt(p) (1..254; more: less KL lost, more bytes); default "
                        "bld_scale.cache.rows.DEFAULT_SQRT_STEPS")
    parser.add_argument("--no-compress", action="store_true", help="store the shards as plain safetensors "
                        "(default: compressed, each stream by its own coder for dtype sqrt, xz otherwise; a resumed "
                        "cache keeps its own choice)")
    parser.add_argument("--max-windows", type=int, default=None, help="cache the first N windows (default: one epoch)")
    parser.add_argument("--windows-per-shard", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=None, help="windows per teacher forward "
                        "(default: train.micro_batch_size)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides, as for launch/distill.py")
    return parser.parse_args(argv)


def load_teacher(recipe, device):
    """The teacher on this rank alone (a plain HF model: ranks convert different windows)."""
    import torch
    from transformers import AutoModelForCausalLM

    from bld_scale.parallel.engines import resolve_precision
    from bld_scale.train.setup import teacher_section

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[resolve_precision(recipe.teacher.dtype)]
    model = AutoModelForCausalLM.from_pretrained(teacher_section(recipe).path, dtype=dtype).to(device).eval()
    return model


def codec_settings(args) -> dict:
    """build_cache's codec keywords from the flags and the defaults; refused settings raise
    TeacherCacheError (one rule at most: --kl-per-value or --tail-mass)."""
    from bld_scale.cache.errors import TeacherCacheError
    from bld_scale.cache.rows import (DEFAULT_DTYPE, DEFAULT_FIXED_DTYPE, DEFAULT_FIXED_TOP_K, DEFAULT_KL_PER_VALUE,
                                      DEFAULT_SQRT_STEPS, DEFAULT_TAIL_MASS, DEFAULT_TOP_K, FULL, check_codec)

    if args.tail_mass is None and args.kl_per_value is None:
        tail_mass, kl_per_value = DEFAULT_TAIL_MASS, DEFAULT_KL_PER_VALUE
    else:  # one rule given: the other is off
        tail_mass, kl_per_value = args.tail_mass or 0.0, args.kl_per_value or 0.0
    top_k = args.top_k or (DEFAULT_TOP_K if tail_mass or kl_per_value else DEFAULT_FIXED_TOP_K)
    adaptive = (tail_mass or kl_per_value) and top_k != FULL
    dtype = args.dtype or (DEFAULT_DTYPE if adaptive else DEFAULT_FIXED_DTYPE)
    if args.sqrt_steps is not None and dtype != "sqrt":
        raise TeacherCacheError(f"--sqrt-steps {args.sqrt_steps} sets the steps of sqrt codes, and this cache's dtype "
                                f"is {dtype}: drop --sqrt-steps, or use --dtype sqrt")
    sqrt_steps = DEFAULT_SQRT_STEPS if args.sqrt_steps is None else args.sqrt_steps
    try:
        check_codec(top_k, dtype, tail_mass, kl_per_value, sqrt_steps)
    except ValueError as err:
        raise TeacherCacheError(str(err)) from None
    return {"top_k": top_k, "dtype": dtype, "tail_mass": tail_mass, "kl_per_value": kl_per_value,
            "sqrt_steps": sqrt_steps}


def build(args) -> None:
    import torch
    import torch.distributed as dist

    from bld_scale.cache.writer import build_cache, teacher_rows
    from bld_scale.config import load_recipe
    from bld_scale.parallel.engines import init_distributed
    from bld_scale.train.setup import load_teacher_config, setup_tokenizers

    codec = codec_settings(args)  # refused here, before any model loads
    recipe = load_recipe(args.config, args.overrides)
    rank, world = init_distributed()
    log = (lambda m: print(f"[bld_scale] {m}", flush=True)) if rank == 0 else (lambda m: None)
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    config = load_teacher_config(recipe)
    sides = setup_tokenizers(recipe, config.get_text_config().vocab_size, log=log, teacher_config=config)
    model = load_teacher(recipe, device)

    def forward(ids, mask, position_ids=None):
        return model(input_ids=ids, attention_mask=mask).logits

    d = recipe.distill
    rows_of = teacher_rows(forward, model, sides.teacher_vocab, bos=sides.teacher_bos, eos=sides.teacher_eos,
                           conversion=d.conversion, exact_chunk_tokens=d.exact_chunk_tokens,
                           backend=d.conversion_backend, device=device)
    with torch.no_grad():
        build_cache(recipe, args.out, rows_of, **codec, compress=not args.no_compress, max_windows=args.max_windows,
                    windows_per_shard=args.windows_per_shard,
                    batch_size=args.batch_size or recipe.train.micro_batch_size, rank=rank, world=world,
                    barrier=dist.barrier, log=log)


def main(argv=None) -> int:
    args = parse(argv)
    from bld_scale.cache.errors import TeacherCacheError
    from bld_scale.config import RecipeError
    from bld_scale.data.errors import DataError
    from bld_scale.train.teacher_tokenizer import TokenizerError

    try:
        build(args)
    except (TeacherCacheError, RecipeError, DataError, TokenizerError) as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"bld_scale: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if "torch.distributed" in sys.modules:
            from bld_scale.parallel.engines import shutdown_distributed

            shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
