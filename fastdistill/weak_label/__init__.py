"""Weak labels (Deng et al. 2022): teacher chains -> aggregated soft labels -> a small student trained with
``distill_loss`` -> measured against human ratings. ``fastdistill weak-label --config WL.yaml``."""

from fastdistill.weak_label.labeling import RULES, Task, aggregate, expected_score

__all__ = ["RULES", "Task", "aggregate", "expected_score"]
