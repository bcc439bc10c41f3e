"""fastdistill: kernel-accelerated knowledge distillation (fused losses, a DeepSpeed trainer, dataset distillation)."""

__version__ = "0.1.0"

from fastdistill import functional, nn  # noqa: E402

__all__ = ["functional", "nn", "__version__"]
