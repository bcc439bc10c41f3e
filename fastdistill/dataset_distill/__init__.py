"""Dataset distillation by matching training trajectories (MTT) with bptt / first-order (TESLA) / exact
constant-activation-memory unrolled gradients. See :func:`match_trajectory` and ``fastdistill dataset-distill``."""

from fastdistill.dataset_distill.core import UNROLL_MODES, ParamLayout, match_trajectory
from fastdistill.dataset_distill.models import ConvNet

__all__ = ["match_trajectory", "ConvNet", "ParamLayout", "UNROLL_MODES"]
