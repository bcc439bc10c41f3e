"""Intermediate teacher states in pool records (fastdistill.train.pools_intermediate): a student pool with ``hint``,
``attention`` and ``affinity`` losses gets the teacher's hidden states of the mapped layers and the captured q / k
with its payload, and trains on them through the same loss functions as the colocated path.

In process: the fields a pool's losses need, sent through the real record layout, give back exactly the states the
colocated teacher hands to ``DistillLoss`` (and the same loss); the errors for layers the teacher does not have name
the loss's key; a bf16 pool gets them in bf16. Launched (the real ``deepspeed`` launcher, 4 processes on CPU / gloo,
configs/pools_tiny.yaml with a 4-step schedule): the pool with hint + attention + affinity follows its colocated
single-process run loss for loss, and the other pool (lm-head losses only) receives nothing more than before.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import yaml
from _launch import REPO, assert_same_trajectory, check, finish, launched, metrics, start  # noqa: E402
from _launch import launch as launch_module  # noqa: E402
from conftest import assert_one_line_error

from fastdistill.train import bridge, models, pools, pools_intermediate
from fastdistill.train.config import ConfigError, validate
from fastdistill.train.losses import DistillLoss

TINY = os.path.join(REPO, "configs", "pools_tiny.yaml")
STEPS = 4
# the colocated test_train every-loss mix: a narrower student (H 32 vs 64: a learned hint projection), hint on two
# teacher layers, attention (q / k after RoPE, key heads repeated) and affinity on the last
MID_LOSSES = [
    {"type": "logit_kd", "weight": 1.0, "temperature": 2.0},
    {"type": "hard_ce", "weight": 0.5},
    {"type": "hint", "weight": 0.1, "layer_map": {0: 1, 1: 3}},
    {"type": "attention", "weight": 0.1, "layer_map": {1: 3}},
    {"type": "affinity", "weight": 0.1, "layer_map": {1: 3}},
]
STATE_KEYS = ("train/loss", "train/kd", "train/ce", "train/hint", "train/attention", "train/affinity")


def raw(mid_losses=MID_LOSSES, precision: str | None = None) -> dict:
    """pools_tiny.yaml with its first pool ('llama2l', payload hidden) training on ``mid_losses``; the second
    ('qwen1l', top-k, lm-head losses only) unchanged."""
    with open(TINY) as f:
        cfg = yaml.safe_load(f)
    cfg["pools"]["students"][0]["losses"] = mid_losses
    if precision is not None:
        cfg["pools"]["students"][0]["student"] = {"deepspeed": {"precision": precision}}
    return cfg


def tiny_teacher(cfg: dict):
    torch.manual_seed(0)
    return models.build_causal_lm(None, cfg["teacher"]["config"], "float32").requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------------------------
# in process
# ---------------------------------------------------------------------------------------------------------------
def test_needs_and_fields_of_each_pool():
    cfg = validate(raw())  # no longer rejected at config time
    students = {s["name"]: s for s in cfg["pools"]["students"]}
    mid = pools_intermediate.TeacherIntermediates(students, tiny_teacher(cfg), torch.float32, 32)
    assert pools_intermediate.teacher_needs(students["llama2l"]["config"]["losses"]) == ([2, 4], [3])
    assert mid.forward_kwargs == {"output_hidden_states": True, "attention_layers": [3]}
    # hidden_states[t + 1] for hint 0->1, 1->3 and affinity 1->3; q / k of layer 3: 4 query heads (the 2 key heads
    # repeated, as the colocated capture does) of 16
    assert mid.layouts == {
        "llama2l": [
            ("hidden.2", torch.float32, (32, 64)),
            ("hidden.4", torch.float32, (32, 64)),
            ("q.3", torch.float32, (4, 32, 16)),
            ("k.3", torch.float32, (4, 32, 16)),
        ]
    }
    assert "qwen1l" not in mid.layouts  # lm-head losses only: nothing more in its record


def test_a_pool_record_gives_the_colocated_teacher_states_and_loss(seed):
    """Teacher states of a real forward, packed into the pool's record layout (2 rows of 4, as a teacher rank sends
    them), unpacked and turned back into ``teacher_states``: bit for bit the colocated ones, and DistillLoss gives the
    same loss (all five terms)."""
    cfg = validate(raw())
    students = {s["name"]: s for s in cfg["pools"]["students"]}
    teacher = tiny_teacher(cfg)
    mid = pools_intermediate.TeacherIntermediates(students, teacher, torch.float32, 32)
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 256, (4, 32), generator=g)
    labels = torch.randint(0, 256, (4, 32), generator=g)
    with torch.no_grad():  # what the colocated OnlineTeacher asks for these losses
        t_hidden, colocated = models.TeacherHidden(teacher)(input_ids, True, [3])
        _, served = models.TeacherHidden(teacher)(input_ids, **mid.forward_kwargs)
    meta = {"dtype": torch.float32, "hidden_size": 64, "intermediates": mid.layouts}
    plan = pools.PoolPlan.__new__(pools.PoolPlan)  # only record_layout: the config, no launch
    plan.students, plan.cfg_all = students, cfg
    parts = []
    for lo, hi in ((0, 2), (2, 4)):
        lay = plan.record_layout("llama2l", hi - lo, meta)
        fields = {"step": torch.tensor([0]), "input_ids": input_ids[lo:hi], "labels": labels[lo:hi]}
        fields.update(hidden=t_hidden[lo:hi], **mid.select("llama2l", served, lo, hi))
        parts.append(lay.unpack(lay.pack(fields).clone()))
    record = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    states = pools_intermediate.teacher_states(record, meta["intermediates"]["llama2l"])
    assert sorted(states["hidden"]) == [2, 4] and sorted(states["q"]) == sorted(states["k"]) == [3]
    for i in (2, 4):
        assert torch.equal(states["hidden"][i], colocated["hidden"][i])
    for part in ("q", "k"):
        assert torch.equal(states[part][3], colocated[part][3])
    # the student side of the same loss: its own states, then DistillLoss with either teacher_states
    student_cfg = students["llama2l"]["config"]
    torch.manual_seed(1)
    student = models.build_causal_lm(None, student_cfg["student"]["config"], "float32")
    loss_fn = DistillLoss(student_cfg["losses"], "fused", 32, 64)
    wrapper = models.StudentWithLoss(student, loss_fn)
    wrapper.set_teacher_head(teacher.get_output_embeddings().weight)
    got, got_parts = wrapper(input_ids, labels, t_hidden, states)
    ref, ref_parts = wrapper(input_ids, labels, t_hidden, colocated)
    assert torch.equal(got, ref)
    assert sorted(got_parts) == ["affinity", "attention", "ce", "hint", "kd"]
    for k in ref_parts:
        assert torch.equal(got_parts[k], ref_parts[k]), k
    assert pools_intermediate.teacher_states(record, None) is None  # a pool without such losses: no states


def test_a_bf16_pool_gets_its_states_in_bf16():
    cfg = validate(raw(precision="bf16"))
    students = {s["name"]: s for s in cfg["pools"]["students"]}
    mid = pools_intermediate.TeacherIntermediates(students, tiny_teacher(cfg), torch.float32, 32)
    assert {dtype for _, dtype, _ in mid.layouts["llama2l"]} == {torch.bfloat16}
    assert pools_intermediate.wire_dtype(torch.bfloat16, "fp32") == torch.bfloat16  # nothing finer to send
    assert pools_intermediate.wire_dtype(torch.float32, "fp32") == torch.float32
    states = {
        "hidden": [torch.randn(4, 32, 64)] * 5,
        "q": {3: torch.randn(4, 4, 32, 16)},
        "k": {3: torch.randn(4, 4, 32, 16)},
    }
    sel = mid.select("llama2l", states, 1, 3)
    assert sel["hidden.2"].dtype == torch.bfloat16 and sel["q.3"].shape == (2, 4, 32, 16)
    assert torch.equal(sel["hidden.4"], states["hidden"][4][1:3].bfloat16())
    lay = bridge.Layout([(n, d, (2, *s)) for n, d, s in mid.layouts["llama2l"]])
    assert lay.nbytes == 2 * 32 * (2 * 64 + 2 * 4 * 16) * 2  # 2 bytes per value


BAD = [
    ("hint_layer", {"type": "hint", "layer_map": {0: 4}}, "losses[2].layer_map", "teacher layer(s) [4]", "0..3"),
    ("hint_negative", {"type": "hint", "layer_map": {0: -1}}, "losses[2].layer_map", "[-1]", "0..3"),
    ("affinity_layer", {"type": "affinity", "layer_map": {1: 7}}, "losses[2].layer_map", "'affinity'", "0..3"),
    ("attention_layer", {"type": "attention", "layer_map": {1: 4}}, "losses[2].layer_map", "attention", "-4..3"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_a_layer_the_teacher_lacks_is_a_config_error_naming_the_key(case):
    _, loss, *words = case
    cfg = validate(raw(MID_LOSSES[:2] + [loss]))
    students = {s["name"]: s for s in cfg["pools"]["students"]}
    with pytest.raises(ConfigError) as err:
        pools_intermediate.TeacherIntermediates(students, tiny_teacher(cfg), torch.float32, 32)
    assert_one_line_error(str(err.value), words, start="pools.students[0].losses[2].layer_map: ")


def test_attention_on_a_teacher_without_known_attention_is_a_config_error():
    cfg = validate(raw(MID_LOSSES[:2] + [{"type": "attention", "layer_map": {0: 0}}]))
    students = {s["name"]: s for s in cfg["pools"]["students"]}
    no_attention = torch.nn.Sequential(torch.nn.Linear(4, 4))
    no_attention.config = type("Config", (), {"num_hidden_layers": 1, "hidden_size": 4})()
    with pytest.raises(ConfigError, match=r"pools.students\[0\].losses\[2\].layer_map: an 'attention' loss needs"):
        pools_intermediate.TeacherIntermediates(students, no_attention, torch.float32, 32)


# ---------------------------------------------------------------------------------------------------------------
# launched: the pool against its colocated run
# ---------------------------------------------------------------------------------------------------------------
def flow(value) -> str:
    """``value`` as one line of YAML for a ``key=value`` override (JSON would turn the int keys of a layer_map into
    strings)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()


def overrides(out: str) -> list[str]:
    return [
        "--config",
        TINY,
        f"run.output_dir={out}",
        "logging.progress_bar=false",
        f"schedule.max_steps={STEPS}",
        "schedule.save_every=0",
    ]


@launched
def test_pool_with_hint_attention_affinity_follows_its_colocated_run(tmp_path):
    """One pools launch (teacher pool of 2 ZeRO-3 ranks, 'llama2l' with all five losses on a ``hidden`` payload,
    'qwen1l' with lm-head losses on ``topk``) and, at the same time, the colocated single-process run of 'llama2l'.
    Tolerance: both are float32; the pool's teacher runs 2 sequences per rank (ZeRO-3 over 2 ranks) where the
    colocated teacher runs 4 on one, so its matmuls may differ in the last bit (~1e-7 relative), which 4 Adam steps
    carry into the losses at that order; rel 1e-6 is the bound tests/test_pools.py holds the lm-head losses to. A
    missing or misplaced field (another layer, pre-RoPE q, unrepeated k) moves the hint / attention terms by orders
    of magnitude more."""
    pools_out, colocated_out = str(tmp_path / "pools"), str(tmp_path / "colocated")
    mid = flow(raw()["pools"]["students"])
    cfg = validate(raw())
    s = cfg["pools"]["students"][0]["config"]
    colocated = [sys.executable, "-m", "fastdistill.train", *overrides(colocated_out), "pools=null"]
    colocated += [f"student={flow(s['student'])}", f"losses={flow(s['losses'])}"]
    proc = start(colocated)
    pooled = launch_module("fastdistill.train", [*overrides(pools_out), f"pools.students={mid}"], 4)
    (colocated_result,) = finish([proc])
    check(pooled)
    check(colocated_result)

    got, ref = metrics(os.path.join(pools_out, "llama2l"), STATE_KEYS), metrics(colocated_out, STATE_KEYS)
    assert_same_trajectory(got, ref, STEPS)
    assert all(sorted(ref[step]) == sorted(STATE_KEYS) for step in ref), ref
    assert ref[STEPS]["train/hint"] != ref[1]["train/hint"]  # the terms move: the comparison is not of constants

    summary = {p: json.load(open(os.path.join(pools_out, p, "summary.json"))) for p in ("llama2l", "qwen1l")}
    # llama2l: ids + labels (16) + final hidden (64 fp32: 256) + hidden_states[2], [4] (2 x 256) + q, k of layer 3
    # (2 x 4 heads x 16 x 4 bytes = 512)
    assert summary["llama2l"]["payload_bytes_per_token"] == pytest.approx(16 + 256 + 512 + 512, abs=1)
    # qwen1l needs no intermediate state: its record is the same 16 + 8 x 8 + 8 bytes as without the other pool's
    assert summary["qwen1l"]["payload_bytes_per_token"] == pytest.approx(16 + 72, abs=1)
    teacher = json.load(open(os.path.join(pools_out, "teacher", "summary.json")))
    assert [r["teacher_forwards"] for r in teacher["per_rank"]] == [STEPS, STEPS]  # still one forward per step
