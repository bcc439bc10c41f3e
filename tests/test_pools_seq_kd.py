"""Sequence-level KD (``onpolicy.seq_kd``) with a teacher pool, on CPU with the real launcher: ONE launch.

configs/pools_onpolicy_tiny.yaml with seq_kd on, 4 steps, no final checkpoint: ``onh`` (hidden payload, ``fraction:
0.5``: at seed 0 its micro steps 0 and 1 train on the teacher's samples, 2 and 3 on its own) and ``ont`` (top-k
payload, ``fraction: 0``: every step on the teacher's samples). On a seq_kd step the teacher pool samples the
completions of the pool's prompts itself (the colocated stage's sampling: KV cache, one parameter gather per call, the
same per-row generators), scores them in the same step and sends tokens + payload. Against it, side by side: each
pool's trajectory (losses, completion lengths, student / teacher batches per step) equals its colocated seq_kd run of
the same student, seed and data to relative 1e-6 (as tests/test_pools_onpolicy.py); the teacher pool ran no data
forward and one sampling call and one forward per seq_kd step.
"""

from __future__ import annotations

import json
import os
import sys

import _launch  # noqa: E402
import pytest
import yaml
from _launch import REPO, assert_same_trajectory, check, deepspeed_cmd, finish, launched, metrics, start  # noqa: E402

from fastdistill.train import pools_onpolicy
from fastdistill.train.config import load_config

CFG = os.path.join(REPO, "configs", "pools_onpolicy_tiny.yaml")
TIMEOUT = max(480, _launch.TIMEOUT)
STEPS = 4
KEYS = ("train/loss", "train/kd", "onpolicy/completion_len", "onpolicy/student_batches", "onpolicy/teacher_batches")


def seq_kd_config(folder) -> str:
    with open(CFG) as f:
        raw = yaml.safe_load(f)
    raw["onpolicy"].update(fraction=0.5, seq_kd=True)  # onh: the top-level section
    raw["pools"]["students"][1]["onpolicy"].update(fraction=0.0, seq_kd=True)  # ont: every step the teacher's samples
    raw["schedule"].update(max_steps=STEPS, save_every=0)
    raw["run"]["final_checkpoint"] = False
    raw["logging"]["progress_bar"] = False
    path = os.path.join(folder, "pools_seq_kd.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """The pools run (3 processes) and, side by side, the colocated seq_kd run of each pool's student."""
    folder = tmp_path_factory.mktemp("pools_seq_kd")
    config = seq_kd_config(str(folder))
    cfg = load_config(config)
    out = str(folder / "pools")
    procs = [start(deepspeed_cmd("fastdistill.train", ["--config", config, f"run.output_dir={out}"], 3))]
    runs = {"pools": out, "cfg": cfg}
    for s in cfg["pools"]["students"]:
        p = s["config"]
        ref = str(folder / f"colocated_{s['name']}")
        overrides = [f"run.output_dir={ref}", "pools=null", f"student={json.dumps(p['student'])}"]
        overrides += [f"losses={json.dumps(p['losses'])}", f"onpolicy={json.dumps(p['onpolicy'])}"]
        procs.append(start([sys.executable, "-m", "fastdistill.train", "--config", config, *overrides]))
        runs[s["name"]] = ref
    for r in finish(procs, TIMEOUT):  # every rank exits 0 (no final checkpoint: nothing waits for its report)
        check(r)
    return runs


def teacher_steps(cfg: dict, pool: int) -> list[int]:
    o = cfg["pools"]["students"][pool]["config"]["onpolicy"]
    return [m for m in range(STEPS) if pools_onpolicy.is_teacher_step(o, 0, m)]


@launched
@pytest.mark.parametrize("pool", ["onh", "ont"], ids=["hidden_fraction0.5", "topk_fraction0"])
def test_each_pool_follows_its_colocated_seq_kd_trajectory(runs, pool):
    got, ref = metrics(os.path.join(runs["pools"], pool), KEYS), metrics(runs[pool], KEYS)
    assert_same_trajectory(got, ref, STEPS)
    kinds = [(got[s]["onpolicy/student_batches"], got[s]["onpolicy/teacher_batches"]) for s in sorted(got)]
    if pool == "onh":  # both kinds of step within the run (seed 0): the teacher's samples, then its own
        assert kinds == [(0.0, 1.0), (0.0, 1.0), (1.0, 0.0), (1.0, 0.0)], kinds
    else:
        assert kinds == [(0.0, 1.0)] * STEPS, kinds
    summary = json.load(open(os.path.join(runs["pools"], pool, "summary.json")))
    assert summary["steps"] == STEPS and summary["teacher_records_received"] == STEPS
    assert 0 < summary["onpolicy_mean_completion_len"] <= 6
    assert os.path.isfile(os.path.join(runs["pools"], pool, "student", "config.json"))


@launched
def test_teacher_pool_samples_and_scores_each_seq_kd_step_once(runs):
    cfg = runs["cfg"]
    t = json.load(open(os.path.join(runs["pools"], "teacher", "summary.json")))
    onh, ont = len(teacher_steps(cfg, 0)), len(teacher_steps(cfg, 1))
    assert (onh, ont) == (2, STEPS)
    assert t["seq_kd_generations"] == {"onh": onh, "ont": ont}
    assert t["data_forwards"] == 0  # no pool trained on the data's text
    assert t["onpolicy_forwards"] == {"onh": STEPS, "ont": STEPS}  # one forward per pool and step
    assert t["teacher_forwards"] == 2 * STEPS, t
