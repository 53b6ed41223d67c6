"""The run's final save (Pipeline.save_final) under ZeRO-3 with parameters in flight: real ranks.

On one H200 (1.5B-shape teacher, 1B-shape student, bf16, ZeRO-3) the run trained and checkpointed,
then its final save failed in DeepSpeed: "Cannot partition a param in flight". The held-out
evaluation just before it runs forwards only; ZeRO-3's prefetcher, following the trace of a
training step, gathers at the end of each forward the parameters the backward would need first,
and no backward comes: they stay INFLIGHT. The old save, `GatheredParameters(every parameter)`,
neither waits for them nor may re-partition them.

The demo never got into that state with ds_configs/zero3.json: its parameters under 1e5 elements
persist (never released), and the 5e7-element prefetch bucket covers the whole model at the first
module, so nothing is released, hence nothing fetched again. A large model exceeds both, so its
parameters are released after use and the prefetcher runs one bucket ahead. FORCING gives the demo
the same (no persistence, no reuse distance, a 20k-element bucket): the probe sees INFLIGHT
parameters at `save_final` on CPU, gloo, 2 ranks, and the old save fails as on the GPU.

Also here: final/ equals tools/export_hf.py's export of the last checkpoint, tensor for tensor
(both are the fp32 master weights), under ZeRO-3 with tied embeddings (one tensor saved) and under
ZeRO-2; and the save's peak host memory is about one fp32 copy of the model, not two.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hf_folders import assert_same_hf_folder
from launching import DISTILL, REPO, run_launch, torchrun

pytestmark = pytest.mark.slow
PROBE = REPO / "tests" / "scripts" / "final_save_probe.py"
MEMORY = REPO / "tests" / "scripts" / "final_save_memory.py"
EXPORT = REPO / "tools" / "export_hf.py"
DEMO_STUDENT = REPO / "launch" / "recipes" / "models" / "demo_student.json"
FORCING = {"stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
           "stage3_prefetch_bucket_size": 20000}
SHORT = ["train.max_steps=2", "train.micro_batch_size=2", "train.warmup_steps=1", "train.log_interval=1",
         "train.eval_interval=0", "checkpoint.interval=100"]  # one checkpoint: the end's, step-2


def _ok(cmd, timeout=600) -> str:
    proc = run_launch(cmd, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def _two_ranks(script: Path, *args: str) -> list[str]:
    return torchrun(2, *args, script=script)


def _tied_student(folder: Path) -> Path:
    config = {**json.loads(DEMO_STUDENT.read_text()), "tie_word_embeddings": True}
    path = folder / "tied_student.json"
    path.write_text(json.dumps(config))
    return path


def _exported(out: Path) -> Path:
    _ok([sys.executable, str(EXPORT), str(out / "checkpoints" / "step-2"), str(out / "export")])
    return out / "export"


@pytest.fixture(scope="module")
def inflight(tmp_path_factory):
    """The probe: 2 ranks, ZeRO-3 with FORCING, tied embeddings, held-out evaluation at the end."""
    root = tmp_path_factory.mktemp("inflight")
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"].update(FORCING)
    (root / "ds.json").write_text(json.dumps(ds))
    out = root / "run"
    _ok(_two_ranks(PROBE, str(out), f"deepspeed.config={root / 'ds.json'}",
                   f"student.config={_tied_student(root)}", *SHORT))
    return out, [json.loads((out / f"probe-rank-{r}.json").read_text()) for r in range(2)]


def test_the_final_save_runs_with_parameters_in_flight_and_releases_them(inflight):
    _, ranks = inflight
    for record in ranks:
        assert record["before_save"].get("INFLIGHT", 0) > 0, record  # the GPU run's state
        assert set(record["after_save"]) == {"NOT_AVAILABLE"}, record  # waited for and re-partitioned


def test_the_old_save_fails_in_that_state(inflight):
    _, ranks = inflight
    for record in ranks:
        assert record["before_old_save"].get("INFLIGHT", 0) > 0, record
        assert "Cannot partition a param in flight" in (record["old_save_error"] or ""), record


def test_final_is_the_last_checkpoint_exported_and_keeps_the_tie(inflight):
    import torch
    from transformers import AutoModelForCausalLM

    out, _ = inflight
    compared = assert_same_hf_folder(out / "final", _exported(out))
    assert "model.safetensors:model.embed_tokens.weight" in compared
    assert not any("lm_head" in name for name in compared)  # tied: the one tensor is the embedding
    assert json.loads((out / "final" / "config.json").read_text())["tie_word_embeddings"] is True
    lm = AutoModelForCausalLM.from_pretrained(out / "final")
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    assert lm.dtype == torch.float32


def test_final_under_zero2_is_the_last_checkpoint_exported(tmp_path):
    out = tmp_path / "run"
    _ok(_two_ranks(DISTILL, f"output_dir={out}", "deepspeed.config=zero2", "data.heldout=[]",
                   f"student.config={_tied_student(tmp_path)}", *SHORT))
    assert_same_hf_folder(out / "final", _exported(out))


def test_the_save_holds_one_fp32_copy_of_the_model_in_host_memory(tmp_path):
    """An 82M-parameter student (327 MB in fp32), 1 rank, ZeRO-3: the RSS peak during the save
    stays under 1.5 copies (seen: 1.03-1.2 after the gather's 1.03-1.06; building the student that
    holds the state and writing it add ~nothing). Saving a second copy would read 2 or more."""
    config = {**json.loads(DEMO_STUDENT.read_text()), "hidden_size": 1024, "intermediate_size": 2816,
              "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 8}
    (tmp_path / "student.json").write_text(json.dumps(config))
    line = _ok([sys.executable, str(MEMORY), str(tmp_path / "run"), f"student.config={tmp_path / 'student.json'}",
                "student.head_hidden_size=128"]).strip().splitlines()[-1]
    m = json.loads(line)
    print(m)
    assert m["parameters"] > 80e6 and m["state_bytes"] == m["fp32_bytes"]  # every parameter once, fp32
    assert m["rss_peak_above_before"] < 1.5 * m["fp32_bytes"], m
