"""Checkpoints as earlier bld_scale versions wrote them, made from a current one (for the
conversion tests): the layout is spelled out here from the code that wrote it, not derived from
the converter under test."""
from __future__ import annotations


def as_format_1(meta: dict) -> dict:
    """A format-2 meta.json's content in format 1: everything flat at the top level."""
    state, run = meta["train_state"], meta["run"]
    return {"format": 1, "step": meta["step"], "world_size": meta["world_size"], "time": meta["time"],
            "ds_tag": meta["ds_tag"], "data": state["data"], "log_sums": state["log_sums"],
            "log_window_seconds": state["log_window_seconds"], "metrics_bytes": run["metrics_bytes"],
            "teacher_eval": state["evals_before"]["teacher"],
            "student_bpb_before": state["evals_before"]["student_bpb"],
            "student_parameters": run["student_parameters"],
            "max_steps": (run["recipe"] or {}).get("train", {}).get("max_steps"),
            "identity": run["identity"], "recipe": run["recipe"]}
