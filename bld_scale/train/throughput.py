"""Model FLOPs of a distillation step and the model FLOPs utilisation (MFU) they give.

One formula, shared by the pipeline's metrics (`train` records of metrics.jsonl) and
tools/gpu_check.py's plain loop:

    FLOPs of a step = 2 · N_teacher · T_teacher  +  6 · N_student · T_student

a teacher forward (2 FLOPs per parameter and token) and a student forward and backward (6), with
N the parameter counts (the student's byte head included) and T the tokens each model processes
(padding left out). Attention's own FLOPs, the byte conversion, the loss and the optimizer are not
counted, as in the usual MFU (Chowdhery et al. 2022, PaLM, appendix B, without the attention term),
so MFU understates a step dominated by long-context attention.

    MFU = FLOPs / step time / (peak FLOP/s of one device x devices)

The peak is the device's dense bf16 tensor-core peak from NVIDIA's data sheets, found by a
substring of `torch.cuda.get_device_name()` (`PEAK_BF16_TFLOPS`), or given (`logging.peak_tflops`).
"""
from __future__ import annotations

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so the specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak in TFLOP/s, or None for a device not in the table."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def step_flops(n_teacher: int, teacher_tokens: float, n_student: int, student_tokens: float) -> float:
    """Model FLOPs of one distillation step: a teacher forward (2·N·T) and a student forward and
    backward (6·N·T); attention's own FLOPs and the conversion are not counted."""
    return 2.0 * n_teacher * teacher_tokens + 6.0 * n_student * student_tokens


def parameter_count(module) -> int:
    """Distinct parameters of a module or engine (a tied embedding once; ZeRO-3 shards at full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def resolve_peak_tflops(configured: float | None, device) -> float | None:
    """`logging.peak_tflops` when set, else the table's peak for a CUDA device, else None (no MFU)."""
    if configured is not None:
        return float(configured)
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    return peak_bf16_tflops(torch.cuda.get_device_name(device))


class ModelFlops:
    """The `tflops` and `mfu` of a train record, from its token rates.

    `n_teacher`: 0 when no teacher forward runs in the step (method ce, or targets from a teacher
    cache). `devices`: the world size (the rates are summed over every rank). `peak_tflops`: one
    device's peak; None: `tflops` only.
    """

    def __init__(self, n_teacher: int, n_student: int, devices: int, peak_tflops: float | None):
        self.n_teacher, self.n_student, self.devices, self.peak = n_teacher, n_student, devices, peak_tflops

    @classmethod
    def of_run(cls, recipe, teacher, n_student: int, devices: int, device) -> "ModelFlops":
        """A pipeline's: the teacher counts when it runs forward in each step (loaded, method not ce)."""
        runs = teacher is not None and recipe.distill.method != "ce"
        return cls(parameter_count(teacher) if runs else 0, n_student, devices,
                   resolve_peak_tflops(recipe.logging.peak_tflops, device))

    def fields(self, record: dict) -> dict:
        """`tflops` (model TFLOP/s per device), and with a peak `mfu` and `mfu_peak_tflops`, from
        the record's `teacher_tokens_per_s` and `tokens_per_s` (student tokens)."""
        per_s = step_flops(self.n_teacher, record.get("teacher_tokens_per_s", 0.0), self.n_student,
                           record["tokens_per_s"])
        tflops = per_s / self.devices / 1e12
        out = {"tflops": tflops}
        if self.peak:
            out.update(mfu=tflops / self.peak, mfu_peak_tflops=self.peak)
        return out
