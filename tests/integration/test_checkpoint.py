"""Checkpointing with real processes (torchrun, 2 ranks on CPU, gloo), no mocks.

Seven launches are shared by every test here (module-scoped; ~6-7 min on 2 shared cores):
- `straight`: 2 ranks straight to step 8, saving every 3 steps (3, 6 and the end, 8; keep 2). It
  starts with --fresh in a folder seeded with a fake earlier run, which must be discarded. Its
  micro-batches are made on the training thread (data.prefetch=0).
- `preempted`: the same run, its micro-batches made 3 ahead in the data thread (data.prefetch=3,
  so when it stops the thread has taken windows past the saved step), with logging.peak_tflops
  set (an mfu on CPU); when step 3's record appears the test sends SIGUSR1 to rank 0 and SIGTERM
  to rank 1 (as SLURM signals every task). The ranks agree at the step-4 boundary, save step-4 and
  exit 0; the same command then resumes to step 8. Its losses equal `straight`'s: prefetching
  changes no batch, and the resumed part starts at the consumed position.
- `one_rank`: a copy of `straight` pointed back at step-6 resumes on 1 rank (bare python,
  grad_accum 2: the same global batch) through DeepSpeed's universal checkpoint, recording the
  engine's logits on a fixed batch right after loading (tests/scripts/resume_probe.py).
- `old_format`: a copy of `straight` pointed back at step-6 whose meta.json is rewritten in the
  layout bld_scale wrote before format 2 (and without the manifest, which came later) resumes on 2
  ranks to step 8.
- `damaged_latest`: a copy of `straight` whose latest checkpoint (step-8) has the end of rank 1's
  optimizer shard overwritten (same size: only its checksum, which rank 1 recomputes, tells;
  unchecked, torch fails on it with "PytorchStreamReader failed reading zip archive"); the same
  command falls back to step-6 and trains steps 7-8 again.
- `latest_deleted`: a copy of `straight` without checkpoints/latest; the same command resumes the
  newest checkpoint, step-8 (the run is complete: it redoes only the closing steps).
- tools/export_hf.py on `straight`'s step-6 (2-rank shards) must give those logits.

Tolerances: same world size, resumed vs straight: rel 1e-6 (seen: bit-identical). 2 ranks -> 1
rank: rel 1e-4, the sum-order tolerance of tests/test_pipeline.py's 1-vs-2-rank check (seen
~1e-5 at the second resumed step). Export vs engine: atol 1e-5 on fp32 logits of size ~2 (seen:
token logits identical, byte logits 1.4e-6).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launching import DISTILL, REPO, rank_env, records, run_launch, torchrun
from old_checkpoints import as_format_1
PROBE = REPO / "tests" / "scripts" / "resume_probe.py"
TEACHER = REPO / "bld_scale" / "assets" / "demo" / "teacher"
STUDENT_TOKENIZER = REPO / "bld_scale" / "assets" / "demo" / "student_tokenizer"
pytestmark = pytest.mark.slow

COMMON = ["train.max_steps=8", "train.micro_batch_size=2", "train.log_interval=1", "train.eval_interval=0",
          "train.warmup_steps=2", "data.heldout=[]", "checkpoint.interval=3", "checkpoint.keep=2"]
KEYS = ("loss", "loss_ce", "loss_byte_ce", "loss_kl", "lr")
PEAK = 0.5  # logging.peak_tflops of `preempted`
STEP_PARTS = ("time_data_wait", "time_student", "time_teacher", "time_conversion", "time_optimizer")


def _ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _steps(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def _same(a: list[dict], b: list[dict], rel: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in KEYS:
            assert x[k] == pytest.approx(y[k], rel=rel, abs=0), (k, x, y)
        assert x["data_position"] == y["data_position"]


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    # an earlier run in the folder: --fresh must discard it
    (out / "metrics.jsonl").write_text(json.dumps({"step": 99, "kind": "train", "loss": 1.0}) + "\n")
    (out / "checkpoints" / "step-99").mkdir(parents=True)
    (out / "checkpoints" / "step-99" / "meta.json").write_text("{}")
    (out / "checkpoints" / "latest").write_text("step-99\n")
    t0 = time.time()
    log = _ok(run_launch(torchrun(2, "--fresh", f"output_dir={out}", *COMMON, "data.prefetch=0")))
    return out, log, time.time() - t0


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    import psutil

    out = tmp_path_factory.mktemp("preempted")
    cmd = torchrun(2, f"output_dir={out}", *COMMON, "data.prefetch=3", f"logging.peak_tflops={PEAK}")
    agent = subprocess.Popen(cmd, cwd=REPO, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        deadline = time.time() + 500
        while time.time() < deadline and agent.poll() is None:
            if (out / "metrics.jsonl").is_file() and any(r["step"] >= 3 for r in records(out)):
                break
            time.sleep(0.05)
        ranks = sorted(psutil.Process(agent.pid).children(), key=lambda p: int(p.environ().get("RANK", 0)))
        assert len(ranks) == 2, ranks
        seen = max(r["step"] for r in records(out))
        os.kill(ranks[0].pid, signal.SIGUSR1)
        os.kill(ranks[1].pid, signal.SIGTERM)
        first_log, _ = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)  # only this test's own process group
    assert agent.returncode == 0, first_log[-4000:]
    after_stop = {"records": records(out), "latest": _latest(out), "steps": _steps(out), "seen": seen}
    second_log = _ok(run_launch(cmd))
    return out, after_stop, first_log, second_log


@pytest.fixture(scope="module")
def one_rank(straight, tmp_path_factory):
    src, _, _ = straight
    out = tmp_path_factory.mktemp("one_rank")
    shutil.copytree(src, out, dirs_exist_ok=True)
    (out / "checkpoints" / "latest").write_text("step-6\n")  # as if the run had stopped at step 6
    probe = out / "probe.pt"
    proc = run_launch([sys.executable, str(PROBE), str(probe), f"output_dir={out}", *COMMON, "train.grad_accum=2"])
    return out, probe, _ok(proc)


@pytest.fixture(scope="module")
def old_format(straight, tmp_path_factory):
    src, _, _ = straight
    out = tmp_path_factory.mktemp("old_format")
    shutil.copytree(src, out, dirs_exist_ok=True)
    (out / "checkpoints" / "latest").write_text("step-6\n")
    meta = out / "checkpoints" / "step-6" / "meta.json"
    meta.write_text(json.dumps(as_format_1(json.loads(meta.read_text())), indent=2))
    (out / "checkpoints" / "step-6" / "manifest.json").unlink()  # format 1 had none
    return out, _ok(run_launch(torchrun(2, f"output_dir={out}", *COMMON)))


RANK_1_SHARD = "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def damaged_latest(straight, tmp_path_factory):
    src, _, _ = straight
    out = tmp_path_factory.mktemp("damaged_latest")
    shutil.copytree(src, out, dirs_exist_ok=True)
    shard = out / "checkpoints" / "step-8" / RANK_1_SHARD
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # the zip directory at the end: zeros, same size
        f.seek(size - 65536)
        f.write(bytes(65536))
    assert shard.stat().st_size == size
    before = records(out, "summary")
    return out, before, _ok(run_launch(torchrun(2, f"output_dir={out}", *COMMON)))


@pytest.fixture(scope="module")
def latest_deleted(straight, tmp_path_factory):
    src, _, _ = straight
    out = tmp_path_factory.mktemp("latest_deleted")
    shutil.copytree(src, out, dirs_exist_ok=True)
    (out / "checkpoints" / "latest").unlink()
    metrics = (out / "metrics.jsonl").read_text()
    return out, metrics, _ok(run_launch(torchrun(2, f"output_dir={out}", *COMMON)))


# ------------------------------------------------------------------------------------- saving
def test_fresh_discards_the_earlier_run_and_saves_every_interval(straight):
    out, log, seconds = straight
    steps = [r["step"] for r in records(out)]
    assert steps == list(range(1, 9)), steps  # the fake step-99 record is gone
    assert _steps(out) == ["step-6", "step-8"]  # 3, 6 and the end (8) saved; keep=2
    assert _latest(out) == "step-8"
    assert not list((out / "checkpoints").glob("tmp-*"))
    step8 = out / "checkpoints" / "step-8"
    meta = json.loads((step8 / "meta.json").read_text())
    assert meta["format"] == 2 and meta["step"] == 8 and meta["world_size"] == 2
    assert meta["train_state"]["data"]["position"] == 8 * 4 and meta["train_state"]["step"] == 8
    assert meta["run"]["identity"]["teacher"]["path"] == str(TEACHER)
    assert len(meta["run"]["identity"]["teacher"]["fingerprint"]) == 16
    assert meta["run"]["recipe"]["train"]["max_steps"] == 8
    assert sorted(p.name for p in (step8 / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    assert len(list((step8 / "ds").glob("*optim_states.pt"))) == 2  # one ZeRO-3 shard per rank
    assert (step8 / "student" / "config.json").is_file() and (step8 / "student" / "byte_head.json").is_file()
    assert not (step8 / "teacher").exists()
    print(f"straight 2-rank run: {seconds:.0f} s")


def test_rng_states_are_saved_per_rank(straight):
    import torch

    out, _, _ = straight
    states = [torch.load(p, weights_only=False) for p in sorted((out / "checkpoints" / "step-8" / "rng").iterdir())]
    for s in states:
        assert set(s) >= {"python", "numpy", "torch"}


# ------------------------------------------------------------------------------------- preemption + exact resume
def test_signals_make_every_rank_save_at_the_next_step_and_exit_cleanly(preempted):
    out, after, first_log, _ = preempted
    stopped = int(after["latest"].split("-")[1])
    assert stopped == after["seen"] + 1, (after, first_log[-3000:])  # the boundary after the signal
    assert after["steps"] == ["step-3", f"step-{stopped}"]
    assert [r["step"] for r in after["records"]] == list(range(1, stopped + 1))
    assert f"stopped at step {stopped}" in first_log
    assert "SIGUSR1" in first_log  # rank 0 logs the signal it got


def test_resumed_run_continues_without_losing_or_repeating_a_step(preempted):
    out, after, _, second_log = preempted
    stopped = int(after["latest"].split("-")[1])
    assert f"resumed from {out / 'checkpoints' / after['latest']} at step {stopped}" in second_log
    assert [r["step"] for r in records(out)] == list(range(1, 9))  # each step exactly once
    assert _steps(out) == ["step-6", "step-8"] and _latest(out) == "step-8"
    assert len(records(out, "summary")) == 1
    assert (out / "final" / "byte_head.safetensors").is_file()


def test_resume_is_exact(straight, preempted):
    """Stopped at step 4 (the signal's boundary) and resumed to 8 == straight to 8, rel 1e-6."""
    ref, _, _ = straight
    out, after, _, _ = preempted
    stopped = int(after["latest"].split("-")[1])
    assert stopped <= 4, "the resumed part must cover steps 5-8"
    _same(records(out), records(ref), rel=1e-6)
    resumed = [r for r in records(out) if r["step"] > stopped]
    assert [r["step"] for r in resumed] == list(range(stopped + 1, 9))


def test_train_records_carry_step_parts_and_mfu(straight, preempted):
    """Seconds per step of each part (host clock on CPU: they add up to the step), TFLOP/s, and an mfu
    only where a peak is known (`preempted` gives one; a CPU has none in the table)."""
    for out, peak in ((straight[0], None), (preempted[0], PEAK)):
        for r in records(out):
            assert all(r[k] >= 0 for k in STEP_PARTS) and r["time_teacher"] > 0 and r["time_data_prepare"] > 0, r
            assert sum(r[k] for k in STEP_PARTS) == pytest.approx(r["time_step"], rel=1e-6), r
            assert r["teacher_tokens_per_s"] > 0 and r["tflops"] > 0
            if peak is None:
                assert "mfu" not in r
            else:
                assert r["mfu"] == pytest.approx(r["tflops"] / peak) and r["mfu_peak_tflops"] == peak


# ------------------------------------------------------------------------------------- another world size
def test_two_rank_checkpoint_resumes_on_one_rank(straight, one_rank):
    ref, _, _ = straight
    out, _, log = one_rank
    assert "universal checkpoint, saved with 2 ranks" in log
    assert (out / "checkpoints" / "step-6" / "ds_universal" / "zero").is_dir()
    _same(records(out), records(ref), rel=1e-4)
    meta = json.loads((out / "checkpoints" / "step-8" / "meta.json").read_text())
    assert meta["world_size"] == 1


def test_a_checkpoint_resumes_under_sequence_parallelism(straight, tmp_path):
    """The 2-rank run's step-6 checkpoint resumed with parallel.sequence_parallel=2 (both ranks share
    each window; grad_accum 2 keeps the same 4 windows per step in the same micro-batches): steps
    7-8 as the straight run's (mode cover), and checkpoints and the final folder written under SP.
    The resumed run replicates the teacher the straight run sharded (teacher.placement is not part
    of a checkpoint: the teacher is never saved), with the same losses."""
    ref, _, _ = straight
    out = tmp_path / "sp"
    shutil.copytree(ref, out, dirs_exist_ok=True)
    (out / "checkpoints" / "latest").write_text("step-6\n")
    log = _ok(run_launch(torchrun(2, f"output_dir={out}", *COMMON, "train.grad_accum=2", "parallel.sequence_parallel=2",
                                  "teacher.placement=replicate")))
    assert "same world size" in log and "sequence parallel: 2 ranks share each window" in log
    assert "teacher placement: replicate" in log
    _same(records(out), records(ref), rel=1e-5)
    assert _steps(out) == ["step-6", "step-8"] and _latest(out) == "step-8"
    meta = json.loads((out / "checkpoints" / "step-8" / "meta.json").read_text())
    assert meta["run"]["recipe"]["parallel"]["sequence_parallel"] == 2
    assert (out / "final" / "byte_head.safetensors").is_file()


# ------------------------------------------------------------------------------------- an older checkpoint format
def test_a_checkpoint_in_the_previous_format_resumes_exactly(straight, old_format):
    """Format 1 (meta.json flat) resumed at step 6 on 2 ranks == straight to 8, rel 1e-6."""
    ref, _, _ = straight
    out, log = old_format
    assert f"resumed from {out / 'checkpoints' / 'step-6'} at step 6 (same world size" in log
    _same(records(out), records(ref), rel=1e-6)
    assert [r["step"] for r in records(out)] == list(range(1, 9))
    assert json.loads((out / "checkpoints" / "step-8" / "meta.json").read_text())["format"] == 2


# ------------------------------------------------------------------------------------- damage
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_exactly(straight, damaged_latest):
    """Rank 1's shard of step-8 damaged: the run resumes step-6 and logs what straight logged."""
    ref, _, _ = straight
    out, summary_before, log = damaged_latest
    root = out / "checkpoints"
    assert (f"checkpoint {root / 'step-8'} is damaged: {RANK_1_SHARD}: content differs from the manifest" in log)
    assert "Resuming from step-6, the newest earlier checkpoint that verifies; step-8 is moved aside" in log
    assert f"resumed from {root / 'step-6'} at step 6 (same world size" in log
    _same(records(out), records(ref), rel=1e-6)  # steps 1-6 kept, 7-8 trained again: each once
    assert len(summary_before) == 1 and records(out, "summary") == records(ref, "summary")
    assert _steps(out) == ["step-6", "step-8", "step-8.bad"] and _latest(out) == "step-8"
    from bld_scale.checkpoint import verify_checkpoint

    assert verify_checkpoint(root / "step-8").ok  # saved again, whole


def test_a_deleted_latest_resumes_the_newest_checkpoint(latest_deleted):
    out, metrics_before, log = latest_deleted
    root = out / "checkpoints"
    assert f"{root / 'latest'} is missing (step folders: step-6, step-8)" in log
    assert "Resuming from step-8, the newest checkpoint that verifies; latest now names step-8" in log
    assert f"resumed from {root / 'step-8'} at step 8" in log
    assert _latest(out) == "step-8" and _steps(out) == ["step-6", "step-8"]
    assert (out / "metrics.jsonl").read_text() == metrics_before  # the closing records, written again alike


def test_when_no_checkpoint_verifies_the_run_is_refused_and_metrics_keep_their_records(straight, tmp_path):
    src, _, _ = straight
    out = tmp_path / "run"
    shutil.copytree(src, out)
    for step in ("step-6", "step-8"):
        with open(out / "checkpoints" / step / "meta.json", "r+b") as f:
            f.truncate(100)
    before = (out / "metrics.jsonl").read_bytes()
    err = _refused(out)
    assert "no checkpoint in" in err and "step-8: meta.json: 100 bytes, the manifest says" in err and "--fresh" in err
    assert (out / "metrics.jsonl").read_bytes() == before and len(records(out, "summary")) == 1


# ------------------------------------------------------------------------------------- refusals
def _refused(out: Path, *overrides: str) -> str:
    proc = run_launch([sys.executable, str(DISTILL), f"output_dir={out}", *COMMON, *overrides], timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cannot resume" in proc.stderr
    return proc.stderr


def test_resuming_with_another_student_and_teacher_is_refused(straight, tmp_path):
    out, _, _ = straight
    before = (out / "metrics.jsonl").read_text()
    teacher = tmp_path / "teacher"
    shutil.copytree(TEACHER, teacher)
    with open(teacher / "model.safetensors", "r+b") as f:  # same shapes, other weights
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x3f")
    err = _refused(out, "student.head=linear", f"teacher.path={teacher}")  # one launch, both named
    assert "student model" in err and "'causal' -> 'linear'" in err
    assert "teacher (teacher.path)" in err and str(teacher) in err
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched


def test_a_moved_but_identical_teacher_is_not_a_different_teacher(tmp_path):
    from bld_scale.checkpoint import fingerprint

    shutil.copytree(TEACHER, tmp_path / "t")
    assert fingerprint(tmp_path / "t") == fingerprint(TEACHER)
    (tmp_path / "t" / "config.json").write_text((TEACHER / "config.json").read_text() + " ")
    assert fingerprint(tmp_path / "t") != fingerprint(TEACHER)


def test_a_folder_with_a_run_but_no_checkpoint_needs_fresh(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "kind": "train", "loss": 1.0}) + "\n")
    err = _refused(tmp_path)
    assert "--fresh" in err


# ------------------------------------------------------------------------------------- tools
def test_export_hf_matches_the_training_engine(straight, one_rank, tmp_path):
    import torch

    src, _, _ = straight
    _, probe, _ = one_rank
    ref = torch.load(probe)
    assert ref["step"] == 6
    full, bare = tmp_path / "hf", tmp_path / "hf_bare"
    tool = REPO / "tools" / "export_hf.py"
    _ok(run_launch([sys.executable, str(tool), str(src / "checkpoints" / "step-6"), str(full)]))
    _ok(run_launch([sys.executable, str(tool), str(src / "checkpoints" / "step-6"), str(bare), "--no-byte-head"]))
    assert (full / "byte_head.safetensors").is_file() and not (bare / "byte_head.safetensors").exists()
    assert (full / "model.safetensors").is_file() and (bare / "model.safetensors").is_file()
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from bld_scale.model.heads import load_byte_head
from bld_scale.model.student import Student
ref = torch.load({str(probe)!r})
lm = AutoModelForCausalLM.from_pretrained({str(full)!r}, attn_implementation="sdpa")
tok = AutoTokenizer.from_pretrained({str(full)!r})
assert len(tok) == lm.config.vocab_size, (len(tok), lm.config.vocab_size)
src = AutoTokenizer.from_pretrained({str(STUDENT_TOKENIZER)!r})  # what training encoded with
text = "To be, or not to be"
# the default encoding is the training one: the student's BOS, then the text's tokens
assert tok(text).input_ids == [src.bos_token_id] + src(text, add_special_tokens=False).input_ids, tok(text)
student = Student(lm, load_byte_head({str(full)!r})).eval()
with torch.no_grad():
    t, b = student(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], prev_bytes=ref["prev_bytes"])
m = ref["attention_mask"].bool()
dt = (t - ref["token_logits"])[m].abs().max().item()
db = (b - ref["byte_logits"])[m].abs().max().item()
print("max abs diff", dt, db)
assert dt <= 1e-5 and db <= 1e-5, (dt, db)
bare = AutoModelForCausalLM.from_pretrained({str(bare)!r})
assert torch.equal(bare.model.embed_tokens.weight, lm.model.embed_tokens.weight)
"""
    print(_ok(run_launch([sys.executable, "-c", code])))


def test_inspect_checkpoint_prints_step_recipe_sizes_and_teacher(straight):
    out, _, _ = straight
    proc = run_launch([sys.executable, str(REPO / "tools" / "inspect_checkpoint.py"), str(out)])
    text = _ok(proc)
    assert "step         8 of 8" in text and "world size   2 ranks" in text
    assert str(TEACHER) in text and "fingerprint" in text and "MB" in text
    proc = run_launch([sys.executable, str(REPO / "tools" / "inspect_checkpoint.py"),
                       str(out / "checkpoints" / "step-6"), "--json"])
    _ok(proc)
    s = json.loads(proc.stdout)
    assert s["step"] == 6 and s["recipe"]["checkpoint"]["interval"] == 3 and s["bytes"]["total"] > 0


def test_estimate_memory_for_an_8b_teacher_and_a_1b_student():
    sys.path.insert(0, str(REPO / "tools"))
    import estimate_memory

    from bld_scale.config import load_recipe

    recipe = load_recipe(REPO / "launch" / "recipes" / "llama8b_to_1b.yaml", check_paths=False)
    e = estimate_memory.estimate(recipe, 1, 8, estimate_memory.PRESETS["llama-3.1-8b"],
                                 estimate_memory.student_config(recipe, 32768), 4.4, 3.7)
    assert e["teacher"]["params"] == 8_030_261_248  # Llama-3.1-8B
    assert 1.0e9 < e["student"]["lm_params"] < 1.1e9
    s = e["student"]["params"]
    assert e["student"]["states"]["none"]["gpu"] == 4 * e["student"]["largest_layer"] + int(18 * s / 8)
    assert e["teacher"]["states"]["none"]["gpu"] > 2 * 8.03e9 / 8
    text = estimate_memory.render(e)
    assert "per-GPU total" in text and "teacher logits" in text


# ------------------------------------------------------------------------------------- the final folder
def test_final_folder_is_the_last_checkpoint_exported(straight, tmp_path):
    """final/ (written by the live run: fp32 masters gathered one parameter at a time) ==
    tools/export_hf.py of step-8 (the checkpoint's fp32 masters through zero_to_fp32): every tensor
    exactly, every other file byte for byte. 2 ranks, ZeRO-3, untied embeddings."""
    from hf_folders import assert_same_hf_folder

    out, _, _ = straight
    _ok(run_launch([sys.executable, str(REPO / "tools" / "export_hf.py"), str(out / "checkpoints" / "step-8"),
                    str(tmp_path / "hf")]))
    compared = assert_same_hf_folder(out / "final", tmp_path / "hf")
    assert "model.safetensors:lm_head.weight" in compared and "byte_head.safetensors:out.weight" in compared
