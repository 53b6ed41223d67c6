"""The real pipeline on one GPU under ZeRO-3: its final save and a resume (needs CUDA; skipped without).

Runs part (c) of tools/gpu_check.py at its small size: `deepspeed --num_gpus 1 launch/distill.py`
for 10 steps (bf16, ZeRO-3), `final/` checked weight by weight against the step-10 checkpoint
(consolidated from the ZeRO-3 shards; equal up to one rounding to the saved dtype), then a resume to step 12
checked for its records, checkpoint and summary; the step parts (CUDA events) and MFU it logged. The
full-size run is `python tools/gpu_check.py`.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from launching import REPO  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_zero3_final_save_and_resume_on_one_gpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--device", "cuda", "--small",
                           "--parts", "c", "--out", str(out), "--workdir", str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    c = report["parts"]["c"]
    assert report["final_save_ok"] is True, c.get("final_save_error")
    assert report["resume_ok"] is True, c.get("resume_error")
    assert c["final_save"]["max_relative_diff"] <= 2.0 ** -8
    assert report["pipeline_tokens_per_s"] > 0
    # step parts from CUDA events: in every record the device parts fit in the device's span of the step
    lines = (tmp_path / "work" / "run" / "metrics.jsonl").read_text().splitlines()
    for r in [json.loads(line) for line in lines if '"train"' in line]:
        device_parts = sum(r[f"time_{k}"] for k in ("student", "teacher", "conversion", "optimizer"))
        assert r["time_teacher"] > 0 and 0 < device_parts <= r["time_step"] + 1e-5, r  # events: ~0.5 us resolution
    if report["peak_bf16_tflops"] is not None:  # a GPU of the table: the pipeline's MFU is logged
        assert 0 < report["pipeline_mfu"] < 1 and c["pipeline_mfu_peak_tflops"] == report["peak_bf16_tflops"]
