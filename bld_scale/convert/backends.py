"""Which implementation computes the one-pass running sums: torch or Triton kernels.

Backends (recipe key `distill.conversion_backend`): "torch" (`running_sums.RunningSums`, any
device), "triton" (`triton_sums.TritonRunningSums`: CUDA tensors, or CPU tensors under the Triton
interpreter `TRITON_INTERPRET=1`, for tests) and "auto" (triton for a CUDA tensor when triton
imports, torch otherwise). Both give the same numbers to float64 rounding; edges, log-add scatter
and small-mass refinement are shared. Mode "exact" always uses the torch path. Each backend also
computes the rows' log-normalisers when the conversion reads raw logits (`log_normaliser_function`).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from bld_scale.convert.running_sums import RunningSums, log_normaliser

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown conversion backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"torch" or "triton": what `backend` runs for tensors on `device` (refuses what cannot run)."""
    check_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _triton_importable() else "torch"
    if backend == "torch":
        return backend
    if not _triton_importable():
        raise RuntimeError("conversion backend 'triton' needs the triton package: install it (it comes "
                           "with torch's CUDA builds; `pip install triton` elsewhere), or use backend "
                           "'torch' or 'auto'")
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"conversion backend 'triton' runs on CUDA tensors; these are on {device}. Set "
                           "TRITON_INTERPRET=1 before triton is first imported to run the kernels on "
                           "CPU (slow, for tests), or use backend 'torch' or 'auto'")
    return backend


def running_sums_class(backend: str, device: torch.device):
    """The running-sums class `backend` uses for tensors on `device` (refuses what cannot run)."""
    if resolve_backend(backend, device) == "torch":
        return RunningSums
    from bld_scale.convert.triton_sums import TritonRunningSums  # defines the kernels: see its docs
    return TritonRunningSums


def log_normaliser_function(backend: str, device: torch.device):
    """`[R, V]` logits -> float32 `[R]` logsumexp, as `backend` computes it on `device`."""
    if resolve_backend(backend, device) == "torch":
        return log_normaliser
    from bld_scale.convert.triton_sums import triton_log_normaliser
    return triton_log_normaliser
