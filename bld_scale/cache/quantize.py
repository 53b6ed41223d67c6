"""How a teacher cache stores log-probabilities: float16 or float32 as they are, or uint8 codes.

uint8 codes are 1/16-nat steps below zero: code c in 0..254 stands for the log-probability -c/16
(down to -15.875, a probability of 1.3e-7), so a stored value is within 1/32 nat (3 % in probability)
of the teacher's, and a value below -15.875 is raised to it; code 255 stands for -inf, so an outcome
of zero mass stays exactly zero. A whole row in uint8 is no longer normalised: the decoder
renormalises (`cache.rows`), which adds at most 1/32 nat to any outcome's error.

sqrt codes (dtype "sqrt", the adaptive layout only) quantise the square root of the probability:
with S steps (a cache's `sqrt_steps`; 63 in caches made before it was a setting), code c in 1..S
stands for p = (c / S)^2. The KL a small error costs an outcome grows as (error in log p)^2 * p, so
uniform steps in sqrt(p) spend the same KL on every outcome, where uniform steps in log p spend
most on the rare ones that cost little: on SmolLM2's rows 6-bit sqrt codes lost 5e-4 bits per text
byte more than the 1/16-nat codes and took 2.5 of their 7.1 compressed bytes per text byte off
(`tools/bench_teacher_cache.py`). A stored value is never zero: code 1 is the least. A row's
remaining mass is coded the same way (`store_sqrt_mass`), with code 0 for less than half a step.
"""
from __future__ import annotations

import math

import torch

DTYPES = {"float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8, "sqrt": torch.uint8}
STEPS_PER_NAT = 16
SQRT_STEPS = 63  # sqrt codes of caches made before the steps were a setting: 6 bits of sqrt(p)
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


def check_sqrt_steps(steps: int) -> None:
    if not 1 <= steps <= LEAST_CODE:
        raise ValueError(f"sqrt steps {steps} is out of range: use 1..{LEAST_CODE} (codes of sqrt(p) in steps of "
                         "1/steps; 47 is the default)")


def store_sqrt(x: torch.Tensor, steps: int = SQRT_STEPS, least: int = 1) -> torch.Tensor:
    """Log-probabilities of stored outcomes (> -inf) -> uint8 sqrt codes least..steps (module docstring)."""
    codes = torch.round(x.to(torch.float64).mul(0.5).exp() * steps).clamp(least, steps)
    return codes.to(torch.uint8).contiguous()


def load_sqrt(codes: torch.Tensor, steps: int = SQRT_STEPS) -> torch.Tensor:
    """`store_sqrt`'s output -> float64 log-probabilities."""
    return (codes.to(torch.float64) / steps).log().mul(2.0)


def store_sqrt_mass(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The log of a mass (-inf allowed) -> a uint8 sqrt code 0..steps; 0: below half a step."""
    return store_sqrt(x, steps, least=0)


def load_sqrt_mass(codes: torch.Tensor, steps: int) -> torch.Tensor:
    """`store_sqrt_mass`'s output -> float64 logs; code 0 stands for a quarter step (sqrt p = 1/(4 steps),
    the middle of what it covers): never zero, so the outcomes it spreads over keep some mass."""
    return (codes.to(torch.float64).clamp(min=0.25) / steps).log().mul(2.0)
