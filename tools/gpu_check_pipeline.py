"""Part (c) of tools/gpu_check.py: the real pipeline, launched, then its final save and a resume checked.

`deepspeed --num_gpus 1 launch/distill.py --config <generated recipe>` (as `python -m
deepspeed.launcher.runner`, which also works where the `deepspeed` script is not on PATH, e.g.
after `pip install --target`) runs `profile.steps` steps under ZeRO-3 with a checkpoint at the
last one; then the same command with `train.max_steps=<profile.resume_steps>` resumes it.

* `pipeline_tokens_per_s`: the median `tokens_per_s` (student tokens) of the first run's
  metrics.jsonl records, leaving out the first two steps (start-up).
* `step_parts_s`: the medians, over the same records, of the pipeline's own step parts
  (`time_data_wait`, `time_data_prepare`, `time_student`, `time_teacher`, `time_conversion`,
  `time_optimizer`, `time_step`: seconds per step, `bld_scale.train.step_timer`); `pipeline_tflops`,
  `pipeline_mfu` and `pipeline_mfu_peak_tflops` likewise (`bld_scale.train.throughput`, the same
  formula as part (b)'s MFU; null where the run logged none, e.g. on CPU).
* `final_save_ok`: the first run exits 0 and `final/` loads (`bld_scale.model.student.load_student`)
  with every weight of the checkpoint of its last step, consolidated from the ZeRO-3 shards
  (DeepSpeed's zero_to_fp32): same names and shapes, values equal up to one rounding to the saved
  dtype (|saved - fp32| <= 2^-8 |fp32| for bf16), all finite.
* `resume_ok`: the second run exits 0, says it resumed at the first run's last step, and leaves
  one train record per step 1..resume_steps (none twice), `latest` at the last step and
  summary.json with that step count.
* `variants` (only with `gpu_check.py --pipeline-variant`): for each set of recipe overrides (e.g.
  `data.prefetch=0`), a fresh run of the same `steps` without checkpoints, and the same medians as
  the first run's (tokens/s, step parts, MFU), its ratio of tokens/s to the first run's, and how its
  losses compare with the first run's: `same_losses` (all equal), `first_step_loss_equal` (step 1,
  before any update: the same batch through the same weights), `max_loss_rel_diff` (later steps
  may differ in the last bits on a GPU, whose atomic adds in backward are not deterministic),
  `same_data_positions`; a variant that fails is recorded with its error.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DISTILL = ROOT / "launch" / "distill.py"
SKIP_STEPS = 2  # start-up steps left out of the pipeline's tokens/s
STEP_PARTS = ("time_data_wait", "time_data_prepare", "time_student", "time_teacher", "time_conversion",
              "time_optimizer", "time_step")
# Half the relative spacing of a saved dtype: how far one rounding from fp32 may move a value.
ROUNDING = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(recipe: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
            str(free_port()), str(DISTILL), "--config", str(recipe), *overrides]


def launch(cmd: list[str], log: Path, timeout_s: int) -> tuple[int, float, str]:
    """Run `cmd` with its output in `log`; (exit code, seconds, output). A run past `timeout_s`
    is killed with its whole process group (launcher and ranks) and reported as exit code 124."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = 124
    return code, time.perf_counter() - start, log.read_text(errors="replace")


def train_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def compare_final_with_checkpoint(final: Path, step_dir: Path) -> dict:
    """The final folder's weights against the checkpoint's consolidated fp32 weights."""
    import torch

    with torch.no_grad():
        return _compare_final_with_checkpoint(final, step_dir)


def _compare_final_with_checkpoint(final: Path, step_dir: Path) -> dict:
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from bld_scale.checkpoint import DS_TAG
    from bld_scale.model.student import load_student

    for name in ("config.json", "byte_head.safetensors", "byte_head.json"):
        if not (final / name).is_file():
            raise RuntimeError(f"final save: {final / name} is missing")
    if not any(final.glob("model*.safetensors")):
        raise RuntimeError(f"final save: no model*.safetensors in {final}")
    saved = load_student(final, attn_implementation="sdpa").state_dict()
    reference = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DS_TAG)
    missing = sorted(set(reference) - set(saved))
    if missing:
        raise RuntimeError(f"final save lacks {len(missing)} weights of the checkpoint, e.g. {missing[:3]}")
    worst, dtypes = 0.0, set()
    for name, ref in reference.items():
        got = saved[name]
        dtype = str(got.dtype).replace("torch.", "")
        dtypes.add(dtype)
        if got.shape != ref.shape:
            raise RuntimeError(f"final save: {name} has shape {tuple(got.shape)}, the checkpoint "
                               f"{tuple(ref.shape)}")
        # one rounding of an fp32 value to the saved dtype moves it by at most half its spacing
        rounding = ROUNDING.get(dtype, 0.0)
        got, ref = got.float(), ref.float()
        if not torch.isfinite(got).all():
            raise RuntimeError(f"final save: {name} has non-finite values")
        diff = (got - ref).abs()
        bad = diff > rounding * ref.abs() + 1e-30
        if bad.any():
            i = int(bad.flatten().nonzero()[0])
            raise RuntimeError(f"final save: {name} differs from the checkpoint of the same step beyond "
                               f"one rounding to {dtype} (element {i}: {got.flatten()[i].item():.6g} "
                               f"vs {ref.flatten()[i].item():.6g})")
        if diff.numel():
            worst = max(worst, float((diff / ref.abs().clamp_min(1e-30)).max()))
    return dict(weights_compared=len(reference), saved_dtypes=sorted(dtypes), max_relative_diff=worst)


def part_pipeline(ws) -> dict:
    """(c): the pipeline for `steps` steps, its final save, a resume to `resume_steps`."""
    p = ws.profile
    recipe = ws.recipe_path()
    out = Path(ws.recipe(check_paths=False).output_dir)
    result: dict = dict(steps=p.steps, resume_steps=p.resume_steps, recipe=str(recipe), final_save_ok=False,
                        resume_ok=False, pipeline_tokens_per_s=None)

    ws.log(f"(c) launching the pipeline: {p.steps} steps, ZeRO-3, 1 process (log {ws.workdir / 'run1.log'})")
    code, seconds, text = launch(launch_command(recipe), ws.workdir / "run1.log", p.launch_timeout_s)
    result.update(first_run_exit=code, first_run_s=seconds)
    ws.log(f"(c) first run: exit {code} after {seconds:.0f} s")
    if code != 0:
        raise RuntimeError(f"the pipeline run exited {code}; last lines:\n{_tail(text)}")
    records = train_records(out)
    if [r["step"] for r in records] != list(range(1, p.steps + 1)):
        raise RuntimeError(f"metrics.jsonl has train steps {[r['step'] for r in records]}, expected 1..{p.steps}")
    result.update(steady_medians(records))
    result["pipeline_losses"] = [r["loss"] for r in records]
    result["pipeline_data_positions"] = [r["data_position"] for r in records]
    parts = result["step_parts_s"]
    ws.log(f"(c) pipeline: {result['pipeline_tokens_per_s']:,.0f} student tokens/s (median of steps "
           f"{SKIP_STEPS + 1}..{p.steps}); per step: " + ", ".join(
               f"{k[5:]} {v:.3f} s" for k, v in parts.items() if v is not None)
           + (f"; MFU {result['pipeline_mfu']:.1%} of {result['pipeline_mfu_peak_tflops']:g} TFLOP/s"
              if result["pipeline_mfu"] is not None else ""))

    try:
        t0 = time.perf_counter()
        result["final_save"] = compare_final_with_checkpoint(out / "final", out / "checkpoints" / f"step-{p.steps}")
        result["final_save_ok"] = True
        ws.log(f"(c) final save OK: {result['final_save']['weights_compared']} weights equal the step-{p.steps} "
               f"checkpoint's (max relative diff {result['final_save']['max_relative_diff']:.1e}; checked in "
               f"{time.perf_counter() - t0:.0f} s)")
    except Exception as err:  # noqa: BLE001 - recorded; the resume is still tried
        result["final_save_error"] = f"{type(err).__name__}: {err}"
        ws.log(f"(c) final save FAILED: {result['final_save_error']}")

    ws.log(f"(c) resuming to step {p.resume_steps} (log {ws.workdir / 'run2.log'})")
    code, seconds, text = launch(launch_command(recipe, f"train.max_steps={p.resume_steps}"),
                                 ws.workdir / "run2.log", p.launch_timeout_s)
    result.update(resume_run_exit=code, resume_run_s=seconds)
    ws.log(f"(c) resumed run: exit {code} after {seconds:.0f} s")
    problems = resume_problems(code, text, out, p.steps, p.resume_steps)
    result["resume_ok"] = not problems
    if problems:
        result["resume_error"] = "; ".join(problems)
        ws.log(f"(c) resume FAILED: {result['resume_error']}")
    result["variants"] = [run_variant(ws, recipe, overrides, result, i)
                           for i, overrides in enumerate(getattr(ws, "pipeline_variants", []))]
    if not (result["final_save_ok"] and result["resume_ok"]):
        failed = [k for k in ("final_save", "resume") if not result[f"{k}_ok"]]
        raise PartialFailure(f"{' and '.join(failed)} failed: "
                             + "; ".join(result.get(f"{k}_error", "") for k in failed), result)
    return result


def run_variant(ws, recipe: Path, overrides: list[str], first: dict, index: int) -> dict:
    """One fresh run of the recipe with `overrides` (no checkpoints), measured as the first run."""
    p = ws.profile
    out, log = ws.workdir / f"variant{index}", ws.workdir / f"variant{index}.log"
    ws.log(f"(c) variant {' '.join(overrides)}: {p.steps} steps (log {log})")
    cmd = launch_command(recipe, f"output_dir={out}", "checkpoint.interval=0", *overrides) + ["--fresh"]
    code, seconds, text = launch(cmd, log, p.launch_timeout_s)
    result: dict = dict(overrides=overrides, exit=code, seconds=seconds)
    records = train_records(out)
    if code != 0 or len(records) != p.steps:
        result["error"] = f"exit {code}, {len(records)} train records; last lines:\n{_tail(text)}"
        ws.log(f"(c) variant {' '.join(overrides)} FAILED: exit {code}")
        return result
    result.update(steady_medians(records))
    losses = [r["loss"] for r in records]
    result["same_losses"] = losses == first["pipeline_losses"]
    result["first_step_loss_equal"] = losses[0] == first["pipeline_losses"][0]  # before any update: same batch
    result["max_loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(losses, first["pipeline_losses"]))
    result["same_data_positions"] = [r["data_position"] for r in records] == first["pipeline_data_positions"]
    result["tokens_per_s_over_first_run"] = result["pipeline_tokens_per_s"] / first["pipeline_tokens_per_s"]
    ws.log(f"(c) variant {' '.join(overrides)}: {result['pipeline_tokens_per_s']:,.0f} student tokens/s "
           f"({result['tokens_per_s_over_first_run']:.2f}x the first run), same losses: {result['same_losses']}")
    return result


def steady_medians(records: list[dict]) -> dict:
    """Medians over the records after the start-up steps (all of them when there are no others) of
    tokens/s, the step parts, TFLOP/s and MFU; None for a key no record has."""
    steady = [r for r in records if r["step"] > SKIP_STEPS] or records

    def median(key):
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    return dict(pipeline_tokens_per_s=median("tokens_per_s"), step_parts_s={k: median(k) for k in STEP_PARTS},
                pipeline_tflops=median("tflops"), pipeline_mfu=median("mfu"),
                pipeline_mfu_peak_tflops=median("mfu_peak_tflops"))


def resume_problems(code: int, text: str, out: Path, first: int, last: int) -> list[str]:
    problems = []
    if code != 0:
        problems.append(f"exit {code}; last lines:\n{_tail(text)}")
    if f"at step {first}" not in text or "resumed from" not in text:
        problems.append(f"the run did not say it resumed at step {first}")
    steps = [r["step"] for r in train_records(out)]
    if steps != list(range(1, last + 1)):
        problems.append(f"metrics.jsonl has train steps {steps}, expected 1..{last} once each")
    latest = out / "checkpoints" / "latest"
    if not latest.is_file() or latest.read_text().strip() != f"step-{last}":
        problems.append(f"checkpoints/latest is {latest.read_text().strip() if latest.is_file() else 'missing'}, "
                        f"expected step-{last}")
    summary = out / "summary.json"
    if not summary.is_file() or json.loads(summary.read_text()).get("steps") != last:
        problems.append(f"summary.json missing or not at {last} steps")
    return problems


class PartialFailure(RuntimeError):
    """A part that failed but measured something: `result` is recorded with the error."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result
