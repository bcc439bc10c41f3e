"""How the losses behave under ``torch.autocast``: one decision, shared by every public loss.

torch runs its own losses (``cross_entropy``, ``kl_div``, ``log_softmax``, ``mse_loss``...) in float32 under autocast
and its matmuls in the autocast dtype. fastdistill does the same, explicitly (its ops are custom ops, which autocast
leaves alone):

* losses of logits / features (``distill_loss``, ``kl_div``, ``hint_loss``, the attention and affinity losses): the
  math is float32. A student and teacher of the same dtype are read as they are (the kernels convert to float32 on
  load, which is exactly what a cast would do); of different dtypes, both are cast to float32 first, as autocast does.
* ``fused_linear_distill_loss``: its matmuls (student and teacher) run in the autocast dtype, its row math in float32.
"""

from __future__ import annotations

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype when autocast is enabled for ``device``'s type (outside torch.compile tracing too), else
    None."""
    kind = device.type
    try:
        if not torch.is_autocast_enabled(kind):
            return None
        return torch.get_autocast_dtype(kind)
    except RuntimeError:  # a device type autocast does not know
        return None


def float32_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under autocast, a student / teacher pair of different dtypes cast to float32 (torch's policy for losses);
    otherwise (or when the dtypes already agree) the pair unchanged."""
    if a.dtype != b.dtype and autocast_dtype(a.device) is not None:
        return a.float(), b.float()
    return a, b


def no_autocast(device: torch.device) -> torch.autocast:
    """A region where autocast is off for ``device``: a loss's own computation runs in the dtypes chosen above, never
    in whatever an enclosing autocast would pick for each matmul inside it."""
    return torch.autocast(device.type, enabled=False)
