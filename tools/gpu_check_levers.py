"""Part (d) of tools/gpu_check.py: what each student/teacher lever gives the real pipeline.

The pipeline of part (c) (same generated recipe, `profile.steps` steps, 1 GPU, no checkpoint and no
held-out evaluation, so only training is timed), launched once per variant:

* `zero3`: `teacher.placement=zero3` (the ZeRO-3 inference teacher, gathered every forward);
* `replicate`: `teacher.placement=replicate` (the whole bf16 teacher on the GPU);
* `auto`: `teacher.placement=auto`, and which placement it chose (the log line);
* `replicate_ckpt`: replicate + `train.activation_checkpointing=true`;
* `replicate_compile`: replicate + `train.compile=true` (inductor).

Each variant records exit code, seconds, the median student tokens/s of steps after the first
`SKIP_STEPS`, its per-step losses and the placement line. `replicate_vs_zero3_max_rel_loss` and
`ckpt_vs_replicate_max_rel_loss`, `compile_vs_replicate_max_rel_loss`: the largest relative
difference of the per-step losses against the named baseline (bf16 on a GPU: not bit-identical;
the CPU tests show the levers exact in fp32, so expect bf16 noise, ~1e-3, not a trend).
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path

from gpu_check_pipeline import SKIP_STEPS, launch, launch_command, train_records

VARIANTS = {
    "zero3": ["teacher.placement=zero3"],
    "replicate": ["teacher.placement=replicate"],
    "auto": ["teacher.placement=auto"],
    "replicate_ckpt": ["teacher.placement=replicate", "train.activation_checkpointing=true"],
    "replicate_compile": ["teacher.placement=replicate", "train.compile=true"],
}
COMPARED = {"replicate_vs_zero3": ("replicate", "zero3"), "ckpt_vs_replicate": ("replicate_ckpt", "replicate"),
            "compile_vs_replicate": ("replicate_compile", "replicate")}


def _max_rel(a: list[float], b: list[float]) -> float | None:
    if not a or len(a) != len(b):
        return None
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def part_levers(ws) -> dict:
    """(d): one short pipeline run per lever variant; tokens/s, losses, the placement chosen."""
    p = ws.profile
    recipe = ws.recipe_path()
    base_out = Path(ws.recipe(check_paths=False).output_dir).parent / "levers"
    result: dict = {"steps": p.steps, "variants": {}}
    for name, overrides in VARIANTS.items():
        out = base_out / name
        log = ws.workdir / f"levers_{name}.log"
        ws.log(f"(d) {name}: {' '.join(overrides)} (log {log})")
        code, seconds, text = launch(launch_command(recipe, f"output_dir={out}", "checkpoint.interval=0",
                                                    "train.eval_interval=0", *overrides),
                                     log, p.launch_timeout_s)
        records = train_records(out)
        rates = [r["tokens_per_s"] for r in records if r["step"] > SKIP_STEPS] or [r["tokens_per_s"] for r in records]
        placement = re.search(r"teacher placement: .*", text)
        result["variants"][name] = {
            "exit": code, "seconds": seconds, "tokens_per_s": statistics.median(rates) if rates else None,
            "losses": [r["loss"] for r in records], "placement": placement.group(0) if placement else None}
        ws.log(f"(d) {name}: exit {code} after {seconds:.0f} s, "
               f"{result['variants'][name]['tokens_per_s'] or 0:,.0f} student tokens/s; "
               f"{result['variants'][name]['placement']}")
    v = result["variants"]
    for key, (a, b) in COMPARED.items():
        result[f"{key}_max_rel_loss"] = _max_rel(v[a]["losses"], v[b]["losses"])
    failed = [name for name, r in v.items() if r["exit"] != 0]
    if failed:
        from gpu_check_pipeline import PartialFailure

        raise PartialFailure(f"lever runs failed: {', '.join(failed)}", result)
    return result
