"""The ConvNet of the dataset-distillation literature (conv 3x3 -> instance norm -> ReLU -> avg-pool 2, then a linear
classifier), as in MTT, with a configurable (small, CPU-friendly) width. It has no buffers, so it is evaluated
functionally from a flat parameter vector alone."""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """``depth`` blocks of conv(3x3, ``width``) -> GroupNorm(width, width) (instance norm with affine) -> ReLU ->
    AvgPool(2), then Linear to ``num_classes``.

    Args:
        in_channels: image channels. num_classes: classes. image_size: height = width of the input.
        width: channels of every conv. depth: number of blocks (``image_size`` is halved ``depth`` times).

    Shape:
        ``[B, in_channels, image_size, image_size] -> [B, num_classes]``

    Example:
        >>> ConvNet(1, 10, 28, width=32, depth=3)(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, *, width: int = 32, depth: int = 3):
        super().__init__()
        if image_size >> depth < 1:
            raise ValueError(
                f"depth={depth} halves image_size={image_size} below 1 pixel; expected depth <= "
                f"{image_size.bit_length() - 1}"
            )
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(),
                nn.AvgPool2d(2),
            ]
            channels, size = width, size // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def build_model(model_cfg, dataset) -> ConvNet:
    return ConvNet(
        dataset.channels, dataset.num_classes, dataset.image_size, width=model_cfg.width, depth=model_cfg.depth
    )
