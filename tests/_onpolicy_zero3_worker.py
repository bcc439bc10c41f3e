"""Launched by tests/test_onpolicy.py under ``deepspeed --num_gpus 2`` (CPU, gloo): a ZeRO-3 student engine writes the
on-policy completions of fixed packed batches; every collective is counted per generation call.

    deepspeed --num_gpus 2 tests/_onpolicy_zero3_worker.py OUT_DIR
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

COLLECTIVES = [0]


def _count(name: str) -> None:
    # patched before DeepSpeed starts: its comm backend captures torch.distributed's all-gather at init
    for mod in (dist, dist.distributed_c10d):
        f = getattr(mod, name, None)
        if f is None or getattr(f, "_counted", False):
            continue

        def counted(*a, _f=f, **k):
            COLLECTIVES[0] += 1
            return _f(*a, **k)

        counted._counted = True
        setattr(mod, name, counted)


for _name in (
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather",
    "_all_gather_base_coalesced",
    "all_gather_coalesced",
    "broadcast",
    "all_reduce",
    "reduce_scatter_tensor",
):
    _count(_name)

MODEL = dict(
    model_type="llama",
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
SEQ, MB, PROMPT = 16, 2, 6


class Packed:
    """Fixed packed rows per micro step (a pure function of k and the rank)."""

    def __init__(self, rank: int):
        self.rank = rank

    def batch(self, k: int):
        from fastdistill.train.data import labels_for

        g = torch.Generator().manual_seed(1000 * k + self.rank)
        ids = torch.randint(3, 256, (MB, SEQ), generator=g)
        return ids, labels_for(ids)


def build_model():
    from fastdistill.train.models import build_causal_lm

    torch.manual_seed(0)
    return build_causal_lm(None, MODEL, "float32")


CASES = ((2, 0.0, False), (10, 0.0, False), (10, 0.9, False), (10, 0.9, True))


def onpolicy_cfg(max_new_tokens: int, temperature: float, seq_kd: bool = False) -> dict:
    """Every micro step the student's samples, or (seq_kd) every micro step the teacher's."""
    from fastdistill.train.onpolicy import DEFAULTS

    o = {**DEFAULTS, "max_new_tokens": max_new_tokens, "temperature": temperature}
    o.update(fraction=0.0 if seq_kd else 1.0, seq_kd=seq_kd)
    o["prompt_tokens"] = PROMPT
    return {
        "onpolicy": o,
        "run": {"seed": 7},
        "student": {"deepspeed": {"micro_batch_size": MB}},
        "data": {"seq_len": SEQ},
    }


def main(out: str) -> None:
    from fastdistill.train import output

    output.prepare_deepspeed()  # no JIT build of DeepSpeed's shm op, quiet logs
    import deepspeed

    from fastdistill.generate.core import is_sharded
    from fastdistill.train.data import ByteTokenizer
    from fastdistill.train.onpolicy import OnPolicy

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config={
            "train_micro_batch_size_per_gpu": MB,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "steps_per_print": 2**62,
        },
    )
    student = engine.module
    assert is_sharded(student)
    held = sum(p.ds_tensor.numel() for p in student.parameters())
    full = sum(p.ds_numel for p in student.parameters())
    result = {"held": held, "full": full}
    for new, temp, seq_kd in CASES:
        # seq_kd: the same sharded model stands in for a ZeRO-3 teacher (the teacher's path through the same stage)
        stage = OnPolicy(onpolicy_cfg(new, temp, seq_kd), Packed(rank), student, student, ByteTokenizer(), rank, world)
        batches, per_call = [], []
        for k in range(2):
            dist.barrier()
            before = COLLECTIVES[0]
            batches.append(stage.batch(k))
            per_call.append(COLLECTIVES[0] - before)
        result[(new, temp, seq_kd)] = {
            "batches": batches,
            "collectives": per_call,
            "calls": stage.calls,
            "gathers": stage.gathers,
        }
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[-1])  # the launcher puts --local_rank=N before the script's own arguments
