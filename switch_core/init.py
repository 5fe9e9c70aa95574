"""Weight initialisation from the paper (§2.4, footnote 6).

Weights are drawn from a truncated normal with mean 0 and std = sqrt(s / fan_in), where draws beyond two standard
deviations are resampled. The paper reduces the default scale s = 1.0 to s = 0.1 for stability (Table 3).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def check_init_scale(init_scale: float) -> float:
    """Return ``init_scale`` as a float, or raise ``ValueError``/``TypeError`` naming the argument."""
    if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)):
        raise TypeError(f"init_scale must be a positive number, got {type(init_scale).__name__}")
    if not math.isfinite(init_scale) or init_scale <= 0:
        raise ValueError(f"init_scale must be a positive finite number, got {init_scale}")
    return float(init_scale)


@torch.no_grad()
def truncated_normal_(weight: Tensor, fan_in: int, init_scale: float = 0.1) -> Tensor:
    """Fill ``weight`` in place from N(0, s/fan_in) truncated at ±2 std (paper §2.4). Returns ``weight``."""
    std = math.sqrt(init_scale / fan_in)
    return torch.nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
