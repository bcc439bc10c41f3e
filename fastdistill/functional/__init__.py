"""Public functional API: distillation losses with documented maths and shapes.

One module per family; everything is re-exported here, so ``import fastdistill.functional as FD`` is all a user needs.
"""

from fastdistill.functional.fused_linear import fused_linear_distill_loss
from fastdistill.functional.intermediate import (
    affinity_distill_loss,
    attention_distill_loss,
    glimpse_hint_loss,
    hint_loss,
)
from fastdistill.functional.logit import distill_loss, kl_div

__all__ = ["distill_loss", "kl_div", "fused_linear_distill_loss"]
__all__ += ["affinity_distill_loss", "attention_distill_loss", "glimpse_hint_loss", "hint_loss"]
