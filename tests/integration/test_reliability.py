"""Refusals, Ctrl-C and the output_dir lock with real processes (2 CPU ranks, gloo), no mocks.

- A teacher tokenizer that is not the teacher model's, given as teacher.tokenizer (through the
  `deepspeed` CLI, 2 ranks) or as the tokenizer files of a copied teacher folder (bare python):
  exit 2 and one `bld_scale:` line naming the key, before any model loads.
- A refusal after both models are loaded and evaluated (a teacher folder whose tokenizer ids are
  shuffled: only the held-out uniform-bound check sees it): exit 2, one line, no traceback, no
  "terminate called" (the process group is torn down).
- SIGINT to the ranks of a torchrun run mid-training (what a terminal's Ctrl-C delivers to them):
  a checkpoint at the next step boundary, exit 0, and the same command resumes after it. While
  that run trains, a second run on its output_dir is refused (exit 2) naming rank 0's pid.
About 2-3 min on 2 shared cores.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launching import DISTILL, REPO, free_port, rank_env, records, run_launch, torchrun
from teacher_copies import copy_with_shuffled_ids, copy_with_student_tokenizer

STUDENT_TOKENIZER = REPO / "bld_scale" / "assets" / "demo" / "student_tokenizer"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
pytestmark = pytest.mark.slow

SHORT = ["train.max_steps=2", "train.micro_batch_size=2", "train.eval_interval=0", "checkpoint.interval=0"]


def _deepspeed(*args) -> list[str]:
    return [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), str(DISTILL), *args]


def _refused(proc: subprocess.CompletedProcess) -> str:
    """The one `bld_scale:` line of a refusal, after checking exit 2 and a quiet, clean exit."""
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2, log[-4000:]
    ours = [line for line in log.splitlines() if line.startswith("bld_scale:")]
    assert len(ours) == 1, ours  # rank 0 only
    assert "Traceback" not in log and "terminate called" not in log, log[-4000:]
    return ours[0]


def test_student_tokenizer_as_teacher_tokenizer_is_refused(tmp_path):
    proc = run_launch(_deepspeed(f"output_dir={tmp_path / 'run'}", f"teacher.tokenizer={STUDENT_TOKENIZER}", *SHORT))
    line = _refused(proc)
    assert line.startswith(f"bld_scale: tokenizer mismatch: teacher tokenizer (teacher.tokenizer={STUDENT_TOKENIZER})"
                           f" is not the teacher model's")
    assert "2048 ids for the model's 4096 embedding rows" in line
    assert "teacher BOS id" not in proc.stdout and "student:" not in proc.stdout  # before the models load


def test_copied_teacher_folder_with_another_models_tokenizer_is_refused(tmp_path):
    teacher = copy_with_student_tokenizer(tmp_path / "teacher")
    line = _refused(run_launch([sys.executable, str(DISTILL), f"output_dir={tmp_path / 'run'}", f"teacher.path={teacher}",
                                *SHORT]))
    assert line.startswith(f"bld_scale: tokenizer mismatch: teacher tokenizer (the tokenizer files in "
                           f"teacher.path={teacher}) is not the teacher model's")
    assert "BOS token '<s>' is id 1, the model's bos_token_id is 0" in line


def test_a_refusal_after_the_models_load_exits_2_with_one_line(tmp_path):
    teacher = copy_with_shuffled_ids(tmp_path / "teacher")
    proc = run_launch(_deepspeed(f"output_dir={tmp_path / 'run'}", f"teacher.path={teacher}", *SHORT))
    line = _refused(proc)
    assert line.startswith("bld_scale: tokenizer mismatch: the teacher's token-level BPB on the held-out text is ")
    assert "worse than a uniform guess over its 4096 ids" in line
    assert f"the tokenizer files in teacher.path={teacher}" in line
    bpb, bound = float(line.split(" is ")[1].split(",")[0]), float(line.split(" = ")[1].split(")")[0])
    assert bpb > bound > 3.5  # the demo teacher with its own ids: about 2.5 against about 4.1
    assert "student: 1.59M parameters" in proc.stdout  # both models were built before the refusal
    assert not (tmp_path / "run" / "run.lock").exists()  # released


def test_sigint_saves_and_resumes_and_the_running_folder_is_locked(tmp_path):
    import psutil

    out = tmp_path / "run"
    common = [f"output_dir={out}", "train.micro_batch_size=2", "train.log_interval=1", "train.eval_interval=0",
              "data.heldout=[]", "checkpoint.interval=0"]
    agent = subprocess.Popen(torchrun(2, *common, "train.max_steps=200"), cwd=REPO, env=rank_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and agent.poll() is None:
            if (out / "metrics.jsonl").is_file() and records(out):
                break
            time.sleep(0.1)
        ranks = sorted(psutil.Process(agent.pid).children(), key=lambda p: int(p.environ().get("RANK", 0)))
        assert len(ranks) == 2, ranks

        second = run_launch([sys.executable, str(DISTILL), *common, "train.max_steps=200"])
        line = _refused(second)
        assert line.startswith(f"bld_scale: output_dir in use: output_dir {out} is in use by another run (pid "
                               f"{ranks[0].pid} on host {socket.gethostname()}, started ")
        assert agent.poll() is None  # the first run is untouched

        for rank in ranks:  # a terminal's Ctrl-C reaches every process of the foreground group
            os.kill(rank.pid, signal.SIGINT)
        log, _ = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)  # only this test's own process group
    assert agent.returncode == 0, log[-4000:]
    assert "SIGINT: stopping at the next step boundary" in log and "stop requested (SIGINT)" in log
    stopped = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert [r["step"] for r in records(out)] == list(range(1, stopped + 1))
    assert not (out / "run.lock").exists()

    resumed = run_launch(torchrun(2, *common, f"train.max_steps={stopped + 2}"))
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped}'} at step {stopped}" in resumed.stdout
    assert [r["step"] for r in records(out)] == list(range(1, stopped + 3))  # each step once
