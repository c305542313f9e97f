"""Random LM weights of the right scale, for tests and benchmarks (no download)."""
from __future__ import annotations

import math

import torch


def init_random(lm, seed: int = 0):
    """Weights ~ N(0, 1/fan_in), norms' weights 1, biases and other vectors 0; returns `lm`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(p.shape[-1])))
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return lm
