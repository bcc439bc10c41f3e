"""Differentiable augmentation (in the spirit of DSA, Zhao & Bilen 2021): random scale, rotation, translation
(one affine warp with ``grid_sample``), brightness and contrast. Deterministic given a seed, because the ``exact``
unroll re-applies the same augmentation to the same batch in its reverse walk."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def diff_augment(
    x: torch.Tensor,
    seed: int,
    *,
    scale: float = 0.2,
    rotate_deg: float = 15.0,
    translate: float = 0.125,
    brightness: float = 0.2,
    contrast: float = 0.2,
) -> torch.Tensor:
    """Augment ``x`` [B, C, H, W] with parameters drawn (per image) from a generator seeded by ``seed``; differentiable
    in ``x``."""
    gen = torch.Generator().manual_seed(int(seed))
    b = x.shape[0]

    def uniform(lo, hi):
        return (torch.rand(b, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(x.device, x.dtype)

    s = uniform(1 - scale, 1 + scale)
    a = uniform(-rotate_deg, rotate_deg) * (math.pi / 180)
    tx, ty = uniform(-translate, translate) * 2, uniform(-translate, translate) * 2
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # [B, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    x = x + uniform(-brightness, brightness).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * uniform(1 - contrast, 1 + contrast).view(b, 1, 1, 1) + mean
