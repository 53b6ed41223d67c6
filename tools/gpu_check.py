"""One command that checks bld_scale on one GPU: conversion cost, step cost and MFU, the real pipeline.

    python tools/gpu_check.py                               # one H100/H200-class GPU, under 6 minutes
    python tools/gpu_check.py --device cpu --small          # the same code paths, tiny shapes, CPU
    python tools/gpu_check.py --parts a,b --out FILE.json   # choose parts; JSON to FILE
    python tools/gpu_check.py --parts b,c --pipeline-variant data.prefetch=0   # (c) also without prefetching

Parts (each guarded: a failure is recorded with its error and the others still run; the exit code
is 0 only if every chosen part passed):

(a) conversion (tools/gpu_check_plain.py): `byte_logprobs_batch` over `log_softmax` at V = 151,936,
    B = 8, L = 4,096 on a real vocabulary (Tekken, 131,072 ids, padded to 151,936 rows, when
    mistral-common imports; else a synthetic byte-level BPE of Qwen2's size), its extra peak
    memory over the logits, and max |dp| against the CPU on a short sequence;
(b) one distillation step of a plain loop: a Llama-3.2-1B-shape student (32k vocabulary, causal
    byte head) and a Qwen2-1.5B-shape teacher (151,936 rows), random init, 4 windows of 8 KiB,
    bf16 autocast, fused AdamW, SDPA: teacher forward, conversion, CE-only and BLD step times, and
    MFU = (2·N_teacher·T_teacher + 6·N_student·T_student) / BLD step time / dense bf16 peak; the
    BLD step again with Liger Kernel's layers and fused token CE (speed-up, MFU, peak memory, and
    its loss and gradients against the plain step's) where liger_kernel imports;
(c) the real pipeline at that size (tools/gpu_check_pipeline.py): `deepspeed --num_gpus 1
    launch/distill.py` for 10 steps (ZeRO-3 student; teacher.placement auto, which replicates the
    teacher on an H200; tokens/s, step parts and MFU from its metrics.jsonl, and their ratio to
    (b)'s plain loop), its final save checked against the step-10 checkpoint, then a resume to step
    12; `--pipeline-variant KEY=VALUE[,...]` reruns it with overrides (e.g. data.prefetch=0);
(d) opt-in (`--parts d`, ~1-2 minutes a variant on a GPU): the same pipeline run once per lever
    (tools/gpu_check_levers.py): teacher.placement zero3 / replicate / auto, replicate with
    activation checkpointing, replicate with torch.compile; tokens/s, per-step losses, placement chosen.

The JSON (`--out`, default runs/gpu_check.json) has the headline keys `conversion_ratio`,
`step_ratio` (BLD step over teacher forward + CE step), `mfu`, `plain_tokens_per_s`, `liger_speedup`,
`liger_mfu`, `pipeline_tokens_per_s`, `pipeline_over_plain` (their ratio; the goal is >= 0.9),
`pipeline_mfu`, `pipeline_step_parts_s` (the pipeline's seconds per step of data wait, data
preparation, student, teacher, conversion, optimizer and the whole step, from its metrics.jsonl),
`final_save_ok`, `resume_ok` (null when their part did not run or
failed before measuring them), `versions`, `device_name`, `date`, `passed`, and under `parts`
everything each part measured, its wall time and its error. A table is printed at the end.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import shutil
import sys
import tempfile
import time
import traceback
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing the package
sys.path.insert(1, str(Path(__file__).resolve().parent))  # the gpu_check_* modules beside this one

import torch  # noqa: E402

import gpu_check_assets as assets  # noqa: E402

PARTS = {"a": "conversion", "b": "plain distillation step", "c": "pipeline, final save, resume",
         "d": "pipeline per lever: teacher placement, activation checkpointing, compile (opt-in)"}
HEADLINE = {  # JSON key -> (part, key in that part's result)
    "conversion_ratio": ("a", "conversion_ratio"),
    "conversion_extra_memory_ratio": ("a", "extra_memory_ratio"),
    "fused_conversion_ratio": ("a", "fused_conversion_ratio"),
    "fused_extra_memory_ratio": ("a", "fused_extra_memory_ratio"),
    "torch_conversion_ratio": ("a", "torch_conversion_ratio"),
    "max_abs_dp": ("a", "max_abs_dp"),
    "step_ratio": ("b", "step_ratio"),
    "mfu": ("b", "mfu"),
    "achieved_tflops": ("b", "achieved_tflops"),
    "plain_tokens_per_s": ("b", "plain_tokens_per_s"),
    "liger_speedup": ("b", "liger_speedup"),
    "liger_mfu": ("b", "liger_mfu"),
    "pipeline_tokens_per_s": ("c", "pipeline_tokens_per_s"),
    "pipeline_mfu": ("c", "pipeline_mfu"),
    "pipeline_step_parts_s": ("c", "step_parts_s"),
    "final_save_ok": ("c", "final_save_ok"),
    "resume_ok": ("c", "resume_ok"),
}
SHIPPED_RECIPE = ROOT / "launch" / "recipes" / "llama8b_to_1b.yaml"  # its distill and train settings


class Workspace:
    """What the parts share: device, sizes, a scratch folder, the vocabularies and the recipe (built once)."""

    def __init__(self, profile: assets.Profile, device: torch.device, workdir: Path, vocab_choice: str):
        self.profile, self.device, self.workdir, self.vocab_choice = profile, device, workdir, vocab_choice
        self.start = time.perf_counter()
        self.device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or platform.machine())

    def log(self, message: str) -> None:
        print(f"[gpu_check {time.perf_counter() - self.start:6.1f}s] {message}", flush=True)

    @cached_property
    def ranks(self) -> assets.Ranks:
        t0 = time.perf_counter()
        ranks = assets.teacher_ranks(self.profile, self.vocab_choice)
        self.log(f"teacher vocabulary: {ranks.note} ({time.perf_counter() - t0:.1f} s); the teacher "
                 f"model has {self.profile.teacher_rows:,} rows")
        return ranks

    @cached_property
    def teacher_tokenizer_dir(self) -> Path:
        folder = self.workdir / "teacher_tokenizer"
        assets.write_bpe_tokenizer(self.ranks, folder)
        return folder

    @cached_property
    def student_tokenizer_dir(self) -> Path:
        folder = self.workdir / "student_tokenizer"
        assets.write_student_tokenizer(self.profile, folder)
        return folder

    def conversion_vocab(self):
        """(TokenBytes, EOS id) of part (a): Tekken's own tiktoken encoding when it is the
        vocabulary, else the teacher tokenizer folder's."""
        from bld_scale.tokenize.token_bytes import TokenBytes

        rows = self.profile.teacher_rows
        if self.ranks.source == "tekken":
            from bld_scale.tokenize.zoo import tekken

            vocab = TokenBytes.from_tokenizer(tekken(), vocab_size=rows)
        else:
            from transformers import AutoTokenizer

            vocab = TokenBytes.from_tokenizer(AutoTokenizer.from_pretrained(self.teacher_tokenizer_dir),
                                              vocab_size=rows)
        t0 = time.perf_counter()
        vocab.index  # noqa: B018 - built here, outside every timer
        self.log(f"sorted-vocabulary index of {vocab.name} built in {time.perf_counter() - t0:.1f} s")
        return vocab, self.ranks.specials[self.ranks.eos]

    @cached_property
    def teacher_dir(self) -> Path:
        """The teacher as a Hugging Face folder (random init; bf16 on GPU, fp32 on CPU)."""
        folder = self.workdir / "teacher"
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        t0 = time.perf_counter()
        assets.save_teacher_folder(self.profile, folder, self.device, dtype)
        self.log(f"teacher folder written in {time.perf_counter() - t0:.1f} s")
        return folder

    def recipe_dict(self, with_teacher: bool) -> dict:
        """The shipped cluster recipe's distill and optimiser settings at this check's sizes and paths."""
        import yaml

        p = self.profile
        raw = yaml.safe_load(SHIPPED_RECIPE.read_text())
        raw["output_dir"] = str(self.workdir / "run")
        raw["teacher"].update(path=str(self.teacher_dir if with_teacher else self.workdir / "teacher"),
                              tokenizer=str(self.teacher_tokenizer_dir), dtype="auto")
        raw["student"].update(config=dict(p.student_config), tokenizer=str(self.student_tokenizer_dir),
                              attn_implementation="sdpa")
        raw["data"] = dict(train=["builtin:train"], format="text", heldout=[], window_bytes=p.window_bytes,
                           streaming=False)
        raw["train"].update(max_steps=p.steps, micro_batch_size=p.windows, grad_accum=1, warmup_steps=2,
                            precision="auto", log_interval=1, eval_interval=0)
        raw["checkpoint"] = dict(interval=p.steps, keep=2, dir=None)
        raw["deepspeed"] = dict(config="zero3")
        raw["logging"] = dict(tensorboard=False, wandb_project=None)
        return raw

    def recipe(self, check_paths: bool = True):
        """The recipe, typed; without `check_paths` the teacher model folder is not made."""
        from bld_scale.config import load_recipe

        return load_recipe(self.recipe_path(with_teacher=check_paths), check_paths=check_paths)

    def recipe_path(self, with_teacher: bool = True) -> Path:
        import yaml

        path = self.workdir / "recipe.yaml"
        path.write_text(yaml.safe_dump(self.recipe_dict(with_teacher), sort_keys=False))
        return path


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_part(key: str, fn, ws: Workspace) -> dict:
    """`fn(ws)`'s result with `ok`, `error` and `seconds`; an exception is recorded, not raised."""
    ws.log(f"part ({key}): {PARTS[key]}")
    t0 = time.perf_counter()
    try:
        result, error = dict(fn(ws)), None
    except Exception as err:  # noqa: BLE001 - one part's failure must not stop the others
        result = dict(getattr(err, "result", {}))
        error = f"{type(err).__name__}: {err}"
        ws.log(f"part ({key}) FAILED: {error}\n{traceback.format_exc()}")
    free_memory()
    result.update(ok=error is None, error=error, seconds=time.perf_counter() - t0)
    ws.log(f"part ({key}) {'passed' if error is None else 'failed'} in {result['seconds']:.0f} s")
    return result


def part_functions() -> dict:
    import gpu_check_levers
    import gpu_check_pipeline
    import gpu_check_plain

    return {"a": gpu_check_plain.part_conversion, "b": gpu_check_plain.part_step,
            "c": gpu_check_pipeline.part_pipeline, "d": gpu_check_levers.part_levers}


def summarise(parts: dict, ws: Workspace, total_s: float) -> dict:
    report = {key: parts.get(part, {}).get(field) for key, (part, field) in HEADLINE.items()}
    plain, pipeline = report["plain_tokens_per_s"], report["pipeline_tokens_per_s"]
    report["pipeline_over_plain"] = pipeline / plain if plain and pipeline is not None else None  # goal >= 0.9
    vocab = ws.__dict__.get("ranks")
    report.update(
        passed=all(r["ok"] for r in parts.values()), parts_run=sorted(parts),
        device=ws.device.type, device_name=ws.device_name, profile=ws.profile.name,
        peak_bf16_tflops=assets.peak_bf16_tflops(ws.device_name) if ws.device.type == "cuda" else None,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=assets.versions(), total_s=total_s,
        vocabulary=None if vocab is None else dict(source=vocab.source, note=vocab.note, ids=vocab.size,
                                                   model_rows=ws.profile.teacher_rows),
        parts=parts)
    return report


def _fmt(value, spec: str = ".3g", unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec) + unit


def table(report: dict) -> str:
    parts = report["parts"]
    a, b, c = parts.get("a", {}), parts.get("b", {}), parts.get("c", {})
    rows = [
        ("(a) conversion / log_softmax" + (f", B={a['B']} L={a['L']:,} V={a['V']:,}" if "B" in a else ""),
         _fmt(a.get("conversion_ratio"), ".2f", "x")),
        ("(a) conversion extra peak memory / logits", _fmt(a.get("extra_memory_ratio"), ".2f", "x")),
        ("(a) torch-backend conversion / log_softmax", _fmt(a.get("torch_conversion_ratio"), ".2f", "x")),
        ("(a) fused from raw logits / log_softmax (goal <= 1)", _fmt(a.get("fused_conversion_ratio"), ".2f", "x")),
        ("(a) fused extra peak memory / logits (goal <= 0.25)", _fmt(a.get("fused_extra_memory_ratio"), ".2f", "x")),
        (f"(a) max |dp| {report['device']} vs {a.get('dp_reference', 'reference')}", _fmt(a.get("max_abs_dp"), ".1e")),
        ("(b) teacher forward (+ log_softmax), s", _fmt(b.get("teacher_forward_s"), ".3f")),
        ("(b) conversion, s", _fmt(b.get("conversion_s"), ".3f")),
        ("(b) CE-only step, s", _fmt(b.get("ce_step_s"), ".3f")),
        ("(b) BLD step, s", _fmt(b.get("bld_step_s"), ".3f")),
        ("(b) BLD step / (teacher forward + CE step)", _fmt(b.get("step_ratio"), ".2f", "x")),
        ("(b) achieved TFLOP/s; MFU", f"{_fmt(b.get('achieved_tflops'), '.1f')}; {_fmt(b.get('mfu'), '.1%')}"),
        ("(b) plain loop student tokens/s", _fmt(b.get("plain_tokens_per_s"), ",.0f")),
        ("(b) BLD step with Liger (layers + fused CE): speed-up; MFU",
         f"{_fmt(b.get('liger_speedup'), '.2f', 'x')}; {_fmt(b.get('liger_mfu'), '.1%')}"),
        ("(c) pipeline student tokens/s (ZeRO-3 student)", _fmt(c.get("pipeline_tokens_per_s"), ",.0f")),
        ("(c) pipeline / plain loop tokens/s (goal >= 0.9)", _fmt(report.get("pipeline_over_plain"), ".2f", "x")),
        ("(c) pipeline TFLOP/s; MFU", f"{_fmt(c.get('pipeline_tflops'), '.1f')}; {_fmt(c.get('pipeline_mfu'), '.1%')}"),
        *((f"(c) pipeline {k[5:].replace('_', ' ')}, s/step", _fmt(v, ".3f"))
          for k, v in (c.get("step_parts_s") or {}).items()),
        *((f"(c) variant {' '.join(v['overrides'])}: tokens/s; x first run; same losses",
           f"{_fmt(v.get('pipeline_tokens_per_s'), ',.0f')}; {_fmt(v.get('tokens_per_s_over_first_run'), '.2f', 'x')}; "
           f"{_fmt(v.get('same_losses'))}") for v in c.get("variants") or []),
        ("(c) final save equals the last checkpoint", _fmt(c.get("final_save_ok"))),
        ("(c) resume to the next steps", _fmt(c.get("resume_ok"))),
    ]
    for key, r in sorted(parts.items()):
        rows.append((f"part ({key}) {PARTS[key]}", ("passed" if r["ok"] else "FAILED") + f" in {r['seconds']:.0f} s"))
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'gpu_check: ' + report['device_name']:<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where to measure (default cuda)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (the CPU test; minutes on a CPU)")
    ap.add_argument("--parts", default="a,b,c", help="comma-separated parts to run, of a, b, c, d (default a,b,c)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu_check.json"),
                    help="the JSON (default runs/gpu_check.json)")
    ap.add_argument("--vocab", default="auto", choices=("auto", "tekken", "synthetic"),
                    help="teacher vocabulary; auto: Tekken on a full run when mistral-common imports, "
                         "else synthetic")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads of this process (default: 1 on --device cpu, as the deepspeed "
                         "launcher gives each rank of part (c); torch's default on cuda)")
    ap.add_argument("--pipeline-variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE...]",
                    help="part (c): also run the pipeline fresh with these recipe overrides and report its tokens/s, "
                         "step parts and MFU beside the first run's (e.g. data.prefetch=0); repeatable")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary one, removed at the end)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the scratch folder (models, runs, logs)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        ap.error(f"--parts {args.parts!r}: choose among {', '.join(PARTS)} (comma-separated)")
    args.parts = sorted(set(parts))
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but CUDA is not available here; run `--device cpu --small` for the "
                 "CPU version of the same checks")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = assets.SMALL if args.small else assets.FULL
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    ws = Workspace(profile, device, workdir, args.vocab)
    ws.pipeline_variants = [[kv.strip() for kv in v.split(",") if kv.strip()] for v in args.pipeline_variant]
    ws.log(f"{profile.name} run on {device} ({ws.device_name}), {torch.get_num_threads()} CPU threads; parts "
           f"{','.join(args.parts)}; scratch {workdir}")
    functions = part_functions()
    try:
        parts = {key: run_part(key, functions[key], ws) for key in args.parts}
    finally:
        if not args.keep_workdir and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report = summarise(parts, ws, time.perf_counter() - ws.start)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(table(report), flush=True)
    failed = [key for key, r in parts.items() if not r["ok"]]
    print(f"wrote {out}; " + ("all parts passed" if not failed else "FAILED: " + ", ".join(failed)), flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
