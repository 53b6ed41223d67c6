"""How a teacher cache stores log-probabilities: float16 or float32 as they are, or uint8 codes.

uint8 codes are 1/16-nat steps below zero: code c in 0..254 stands for the log-probability -c/16
(down to -15.875, a probability of 1.3e-7), so a stored value is within 1/32 nat (3 % in probability)
of the teacher's, and a value below -15.875 is raised to it; code 255 stands for -inf, so an outcome
of zero mass stays exactly zero. A whole row in uint8 is no longer normalised: the decoder
renormalises (`cache.rows`), which adds at most 1/32 nat to any outcome's error.
"""
from __future__ import annotations

import math

import torch

DTYPES = {"float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}
STEPS_PER_NAT = 16
ZERO_MASS = 255  # the uint8 code of log 0
LEAST_CODE = ZERO_MASS - 1  # the uint8 code of the least non-zero log-probability stored


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose {', '.join(DTYPES)}")


def store_logprobs(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Log-probabilities (<= 0, -inf allowed) in the stored dtype."""
    check_dtype(dtype)
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
