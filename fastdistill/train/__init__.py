"""Online distillation trainer: a frozen teacher (ZeRO-3 sharded) and a student in its own DeepSpeed engine.

Modules, in the order a run uses them: ``config`` (schema, validation, overrides), ``data`` (packing, held-out split,
per-rank sampler), ``models`` (teacher sources, student from teacher layers, engine wrappers), ``losses`` (the weighted
loss through the fused lm-head kernel), ``recipe`` (setup -> train loop -> save), ``cli`` (the entry point).
"""

from fastdistill.train.config import ConfigError, load_config

__all__ = ["ConfigError", "load_config"]
