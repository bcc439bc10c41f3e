"""What a trainer run prints: the user's concerns (progress, perplexities, where things were saved, errors), not the
libraries' internals. ``FASTDISTILL_VERBOSE=1`` keeps everything DeepSpeed, torch and transformers print.

Silenced by default, each because it is not something the user can or should act on:

* DeepSpeed's shared-memory allreduce op (``deepspeed_shm_comm``), which its CPU accelerator compiles on the first
  ``init_distributed`` (tens of seconds, with build lines): it only serves ``inference_all_reduce``, which training
  never calls, so it is not built at all;
* DeepSpeed's INFO / WARNING log lines about its own set-up (the user's errors still raise);
* warnings raised inside DeepSpeed and transformers about their own internals (``FutureWarning``,
  ``DeprecationWarning``, ``UserWarning`` from their modules).
"""

from __future__ import annotations

import logging
import os
import warnings


def verbose() -> bool:
    return os.environ.get("FASTDISTILL_VERBOSE", "0").lower() not in ("", "0", "false", "no")


def quiet_warnings() -> None:
    """Warnings raised from the libraries' own modules about their internals (idempotent)."""
    if verbose():
        return
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        for module in (r"deepspeed(\..*)?", r"transformers(\..*)?", r"torch(\..*)?"):
            warnings.filterwarnings("ignore", category=category, module=module)


def prepare_deepspeed() -> None:
    """Call before ``deepspeed.init_distributed``: no shm op build, DeepSpeed's logger at ERROR unless verbose."""
    quiet_warnings()
    import deepspeed.comm.torch as ds_comm_torch

    # the shm op serves only inference_all_reduce (DeepSpeed-Inference tensor parallelism); training's allreduce goes
    # through torch.distributed, so skipping it changes no result and saves its JIT build
    ds_comm_torch.build_shm_op = lambda: None
    if not verbose():
        from deepspeed.utils import logger

        logger.setLevel(logging.ERROR)
        for handler in logger.handlers:
            handler.setLevel(logging.ERROR)
