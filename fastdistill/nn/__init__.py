"""nn.Module drop-ins: each stores its options and calls the functional API."""

from fastdistill.nn.fused_linear import FusedLinearDistillLoss
from fastdistill.nn.intermediate import AffinityDistillLoss, AttentionDistillLoss, GlimpseHintLoss, HintLoss
from fastdistill.nn.logit import DistillLoss, KLDivLoss

__all__ = ["DistillLoss", "KLDivLoss", "FusedLinearDistillLoss"]
__all__ += ["AffinityDistillLoss", "AttentionDistillLoss", "GlimpseHintLoss", "HintLoss"]
