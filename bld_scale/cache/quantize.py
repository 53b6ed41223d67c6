"""How a teacher cache stores log-probabilities: float16 or float32 as they are, or uint8 codes.

uint8 codes are 1/16-nat steps below zero: code c in 0..254 stands for the log-probability -c/16
(down to -15.875, a probability of 1.3e-7), so a stored value is within 1/32 nat (3 % in probability)
of the teacher's, and a value below -15.875 is raised to it; code 255 stands for -inf, so an outcome
of zero mass stays exactly zero. A whole row in uint8 is no longer normalised: the decoder
renormalises (`cache.rows`), which adds at most 1/32 nat to any outcome's error.

sqrt codes (dtype "sqrt", the adaptive layout's stored values only; its `rest` stays a uint8 log
code) quantise the square root of the probability: code c in 1..63 stands for p = (c / 63)^2. The
KL a small error costs an outcome grows as (error in log p)^2 * p, so uniform steps in sqrt(p)
spend the same KL on every outcome, where uniform steps in log p spend most on the rare ones that
cost little: on SmolLM2's rows 6-bit sqrt codes lose 5e-4 bits per text byte more than the 1/16-nat
codes and take 2.5 of their 7.1 compressed bytes per text byte off (`tools/bench_teacher_cache.py`).
A stored value is never zero: code 1 (p = 2.5e-4) is the least.
"""
from __future__ import annotations

import math

import torch

DTYPES = {"float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8, "sqrt": torch.uint8}
STEPS_PER_NAT = 16
SQRT_STEPS = 63  # sqrt codes: 6 bits of sqrt(p)
ZERO_MASS = 255  # the uint8 code of log 0
LEAST_CODE = ZERO_MASS - 1  # the uint8 code of the least non-zero log-probability stored


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose {', '.join(DTYPES)}")


def store_logprobs(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Log-probabilities (<= 0, -inf allowed) in the stored dtype."""
    check_dtype(dtype)
    if dtype == "sqrt":
        raise ValueError("sqrt codes hold an adaptive row's stored values only (`store_sqrt`), not log-probabilities")
    if dtype != "uint8":
        return x.to(DTYPES[dtype]).contiguous()
    codes = torch.round(-x.to(torch.float64) * STEPS_PER_NAT).clamp(0, LEAST_CODE)
    return torch.where(torch.isneginf(x), ZERO_MASS, codes).to(torch.uint8).contiguous()


def load_logprobs(stored: torch.Tensor) -> torch.Tensor:
    """`store_logprobs`'s output -> float64 log-probabilities."""
    if stored.dtype != torch.uint8:
        return stored.to(torch.float64)
    values = stored.to(torch.float64) / -STEPS_PER_NAT
    return values.masked_fill(stored == ZERO_MASS, -math.inf)


def store_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of stored outcomes (> -inf) -> uint8 sqrt codes (module docstring)."""
    codes = torch.round(x.to(torch.float64).mul(0.5).exp() * SQRT_STEPS).clamp(1, SQRT_STEPS)
    return codes.to(torch.uint8).contiguous()


def load_sqrt(codes: torch.Tensor) -> torch.Tensor:
    """`store_sqrt`'s output -> float64 log-probabilities."""
    return (codes.to(torch.float64) / SQRT_STEPS).log().mul(2.0)
