"""On-policy distillation with a teacher pool (fastdistill.train.pools_onpolicy), on CPU with the real launcher.

The launched run is configs/pools_onpolicy_tiny.yaml: 3 processes, a teacher pool of 1 rank (ZeRO-3) and two student
pools of 1 rank: ``onh`` (a Llama taking ``hidden`` states, ``onpolicy.fraction: 1``: every step on its own samples)
and ``ont`` (a Qwen2 taking ``topk`` records, its own ``fraction: 0.5`` with a replay buffer: its data steps share the
teacher's data forward). The ``ont`` rank SIGKILLs itself after step 5 (checkpoint and commit at step 3), and the run
is resumed with ``run.resume: auto``. Against it: each pool's whole trajectory (losses, completion lengths, replayed
batches) equals its colocated on-policy run with the same student, seed and data; the teacher pool ran one data
forward per step where some pool trained on the data and one forward per pool and on-policy step, nothing else. The
fast tests check the per-pool config and its errors.

Tolerance of the trajectory comparison: relative 1e-6, as tests/test_pools.py. The pool's student step sees the same
tensors as the colocated one (same rows, same completions from the same per-row generators, the teacher's forward
on the same [rows, width] batch, its hidden states / top-k record carried bit for bit), so the only room left is the
teacher's ZeRO-3 forward running in another process; a sampled token that differs would move the loss by far more.
"""

from __future__ import annotations

import json
import os
import sys

import _launch  # noqa: E402
import pytest
import yaml
from _launch import REPO, assert_same_trajectory, check, finish, launched, metrics, output, start  # noqa: E402
from _launch import launch as launch_module  # noqa: E402
from conftest import assert_one_line_error

from fastdistill.train import pools_onpolicy
from fastdistill.train.config import ConfigError, load_config, validate

CFG = os.path.join(REPO, "configs", "pools_onpolicy_tiny.yaml")
TIMEOUT = max(480, _launch.TIMEOUT)
STEPS = 6
KEYS = ("train/loss", "train/kd", "onpolicy/completion_len", "onpolicy/replayed_batches", "onpolicy/student_batches")


def raw() -> dict:
    with open(CFG) as f:
        return yaml.safe_load(f)


# ---------------------------------------------------------------------------------------------------------------
# config (in process)
# ---------------------------------------------------------------------------------------------------------------
def test_each_pool_gets_the_top_level_onpolicy_or_its_own():
    cfg = validate(raw())
    onh, ont = (s["config"]["onpolicy"] for s in cfg["pools"]["students"])
    assert onh["fraction"] == 1.0 and onh["replay_capacity"] == 0 and onh["prompt_tokens"] == 8
    assert ont["fraction"] == 0.5 and ont["replay_capacity"] == 2
    off = raw()
    off["pools"]["students"][1]["onpolicy"] = None  # this pool off-policy, the other on-policy
    assert validate(off)["pools"]["students"][1]["config"]["onpolicy"] is None
    # the draw both sides make: fraction 0.5 at seed 0 gives both kinds of step within the run
    kinds = [pools_onpolicy.is_scored(ont, 0, m) for m in range(STEPS)]
    assert any(kinds) and not all(kinds), kinds
    assert pools_onpolicy.width(ont, 32) == 8 + 6


def _pool(c: dict, i: int) -> dict:
    return c["pools"]["students"][i]


ERRORS = [
    (
        "too_long_for_the_teacher",
        lambda c: _pool(c, 1)["onpolicy"].update(max_new_tokens=200),
        ["pools.students[1].onpolicy.max_new_tokens", "got 200", "max_position_embeddings=128", "<= 120"],
    ),
    (
        "unknown_key_in_a_pool",
        lambda c: _pool(c, 1)["onpolicy"].update(lmbda=0.5),
        ["pools.students[1]", "unknown key 'onpolicy.lmbda'"],
    ),
    ("bad_fraction_in_a_pool", lambda c: _pool(c, 1)["onpolicy"].update(fraction=2), ["onpolicy.fraction", "got 2"]),
    (
        "teacher_cache",
        lambda c: c["teacher"].update(cache="/nonexistent", config=None),
        ["onpolicy", "teacher.cache"],
    ),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_config_errors_name_the_key(case):
    _, change, words = case
    c = raw()
    change(c)
    with pytest.raises(ConfigError) as err:
        validate(c)
    assert_one_line_error(str(err.value), words)


# ---------------------------------------------------------------------------------------------------------------
# launched: killed, resumed, against the colocated on-policy runs
# ---------------------------------------------------------------------------------------------------------------
def colocated_overrides(cfg: dict, i: int) -> list[str]:
    """configs/pools_onpolicy_tiny.yaml as the colocated on-policy run of student pool ``i``."""
    s = cfg["pools"]["students"][i]["config"]
    return [
        "pools=null",
        f"student={json.dumps(s['student'])}",
        f"losses={json.dumps(s['losses'])}",
        f"onpolicy={json.dumps(s['onpolicy'])}",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """The pools run (``ont`` killed after step 5, then resumed) and, side by side with its first launch, the two
    colocated references."""
    cfg = load_config(CFG)
    out = str(tmp_path_factory.mktemp("pools_onpolicy"))
    common = ["--config", CFG, f"run.output_dir={out}", "logging.progress_bar=false", "pools.dead_after_s=10"]
    killed = start(_launch.deepspeed_cmd("fastdistill.train", common, 3), {"FASTDISTILL_FAULT_KILL": "ont:0:5"})
    runs, procs = {"pools": out}, [killed]
    for i, s in enumerate(cfg["pools"]["students"]):
        ref = str(tmp_path_factory.mktemp(f"colocated_{s['name']}"))
        cmd = [sys.executable, "-m", "fastdistill.train", "--config", CFG, f"run.output_dir={ref}"]
        procs.append(start([*cmd, "logging.progress_bar=false", *colocated_overrides(cfg, i)]))
        runs[s["name"]] = ref
    first, *refs = finish(procs, TIMEOUT)
    for r in refs:
        check(r)
    assert first.returncode != 0, output(first)
    printed = first.stdout + first.stderr
    assert "student pool 'ont' rank 0 (global rank 2)" in printed, output(first)
    assert json.load(open(os.path.join(out, "pools_commit.json")))["step"] == 3, output(first)
    check(launch_module("fastdistill.train", common, 3, timeout=TIMEOUT))
    return runs


@launched
@pytest.mark.parametrize("pool", ["onh", "ont"], ids=["hidden_fraction1", "topk_fraction0.5_replay"])
def test_each_pool_follows_its_colocated_onpolicy_trajectory_through_kill_and_resume(runs, pool):
    got, ref = metrics(os.path.join(runs["pools"], pool), KEYS), metrics(runs[pool], KEYS)
    assert_same_trajectory(got, ref, STEPS)
    summary = json.load(open(os.path.join(runs["pools"], pool, "summary.json")))
    assert summary["start_step"] == 3 and summary["steps"] == STEPS and summary["teacher_records_received"] == 3
    assert 0 < summary["onpolicy_mean_completion_len"] <= 6 and 0 <= summary["wait_fraction"] <= 1
    kinds = [(got[s]["onpolicy/student_batches"], got[s]["onpolicy/replayed_batches"]) for s in got]
    if pool == "onh":
        assert all(k == (1.0, 0.0) for k in kinds), kinds  # every step generated
        # what it received: the scores of its own 4 x (8 + 6)-token sequences (step + float32 hidden states of
        # width 64), not the 4 x 32-token data record's 16 + 256 bytes per token
        per_token = 4 * 64 + 8 / (4 * 14)
        assert summary["payload_bytes_per_token"] == pytest.approx(per_token), summary
        sent = metrics(os.path.join(runs["pools"], pool), ("pools/payload_bytes_per_token",))
        assert [r["pools/payload_bytes_per_token"] for r in sent.values()] == pytest.approx([per_token] * STEPS), sent
    else:  # fraction 0.5, replay: data, generated and replayed steps, the replayed one after the resume
        assert {k for k in kinds} == {(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)} and kinds[5] == (0.0, 1.0), kinds


@launched
def test_teacher_runs_one_data_forward_per_step_and_one_forward_per_onpolicy_pool_step(runs):
    """The resumed teacher pool (micro steps 3..5): the data forward only where a pool trains on the data (``ont``'s
    off-policy steps), and one forward per on-policy pool and step on that pool's own sequences."""
    cfg = load_config(CFG)
    ont = cfg["pools"]["students"][1]["config"]["onpolicy"]
    ont_steps = [m for m in range(3, STEPS) if pools_onpolicy.is_scored(ont, 0, m)]
    t = json.load(open(os.path.join(runs["pools"], "teacher", "summary.json")))
    assert t["start_step"] == 3
    assert t["onpolicy_forwards"] == {"onh": STEPS - 3, "ont": len(ont_steps)}
    assert t["data_forwards"] == STEPS - 3 - len(ont_steps) >= 1
    assert t["teacher_forwards"] == t["data_forwards"] + STEPS - 3 + len(ont_steps)
    for pool in ("onh", "ont"):  # the replay buffer and the RNG went into every checkpoint of the pool
        folder = os.path.join(runs["pools"], pool, "checkpoints", "step0000006")
        assert os.path.isfile(os.path.join(folder, "onpolicy_rank0.pt")) and os.path.isfile(
            os.path.join(folder, "rng_rank0.pt")
        )
