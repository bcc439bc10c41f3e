"""nn.Module drop-ins: each stores its options and calls the functional API."""

from fastdistill.nn.logit import DistillLoss, KLDivLoss

__all__ = ["DistillLoss", "KLDivLoss"]
