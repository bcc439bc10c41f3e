"""What a trainer run prints: the user's concerns (progress, perplexities, where things were saved, errors), not the
libraries' internals. ``FASTDISTILL_VERBOSE=1`` keeps everything DeepSpeed, torch and transformers print.

Silenced by default, each because it is not something the user can or should act on:

* DeepSpeed's shared-memory allreduce op (``deepspeed_shm_comm``), which its CPU accelerator compiles on the first
  ``init_distributed`` (tens of seconds, with build lines): it only serves ``inference_all_reduce``, which training
  never calls, so it is not built at all;
* DeepSpeed's INFO / WARNING log lines about its own set-up (e.g. its scheduler's "Attempting to get learning rate
  from scheduler before it has started"; the user's errors still raise);
* deprecation notices about the libraries' calls into each other (torch's ``FutureWarning`` on DeepSpeed's
  ``all_gather_into_tensor``), warnings raised from DeepSpeed's and transformers' own modules, and transformers'
  "Writing model shards" progress bar when the student is exported.
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
        for module in (r"deepspeed(\..*)?", r"transformers(\..*)?"):
            warnings.filterwarnings("ignore", category=category, module=module)
    # torch's deprecation notices for collectives DeepSpeed calls (attributed to torch.distributed's own wrapper)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed(\..*)?")


def prepare_deepspeed() -> None:
    """Call before ``deepspeed.init_distributed``: no shm op build, DeepSpeed's logger at ERROR unless verbose."""
    quiet_warnings()
    import sys

    import deepspeed.comm.torch  # noqa: F401

    # by module name: the attribute deepspeed.comm.torch is the torch package (re-exported by deepspeed.comm)
    ds_comm_torch = sys.modules["deepspeed.comm.torch"]
    # the shm op serves only inference_all_reduce (DeepSpeed-Inference tensor parallelism); training's allreduce goes
    # through torch.distributed, so skipping it changes no result and saves its JIT build
    ds_comm_torch.build_shm_op = lambda: None
    if not verbose():
        from deepspeed.utils import logger

        logger.setLevel(logging.ERROR)
        for handler in logger.handlers:
            handler.setLevel(logging.ERROR)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
