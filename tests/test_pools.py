"""Teacher and student pools in one launch (fastdistill.train.pools), on CPU with the real ``deepspeed`` launcher.

The launched runs use configs/pools_tiny.yaml: 4 processes, a teacher pool of 2 ranks (ZeRO-3) and two student pools
of 1 rank each with different architectures (a Llama taking ``hidden`` states, a Qwen2 taking ``topk`` records).
Against them: each student's loss trajectory equals the colocated single-process run of the same student, seed and
data; the teacher ran one forward per step (not one per pool); no collective ran over more than a pool; a SIGKILLed
teacher rank ends the job with a message naming it; on a 2-"node" launch (teacher pool on node 0, students on node
1) a SIGKILLed student rank ends both nodes within ``pools.dead_after_s``, and ``run.resume: auto`` continues every
pool from the committed step on the same trajectory. The fast tests above them check the plan and its errors.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time

import _launch  # noqa: E402
import pytest
import torch
import yaml
from _launch import REPO, assert_same_trajectory, check, finish, launched, metrics, output, start  # noqa: E402
from _launch import launch as launch_module  # noqa: E402
from _launch import launch_nodes as launch_nodes_module  # noqa: E402
from conftest import assert_one_line_error

from fastdistill.train import bridge, pools
from fastdistill.train import targets as tg
from fastdistill.train.config import ConfigError, load_config, validate

TINY = os.path.join(REPO, "configs", "pools_tiny.yaml")
SHIPPED = ["pools_tiny.yaml", "pools_demo.yaml"]
TIMEOUT = max(480, _launch.TIMEOUT)
DEAD_AFTER_S = 10  # pools.dead_after_s in the fault tests


# ---------------------------------------------------------------------------------------------------------------
# the plan and its errors (in process)
# ---------------------------------------------------------------------------------------------------------------
def tiny_raw() -> dict:
    with open(TINY) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("name", SHIPPED, ids=SHIPPED)
def test_shipped_pool_configs_validate_and_carry_launch_command(name):
    path = os.path.join(REPO, "configs", name)
    cfg = load_config(path)
    assert len(cfg["pools"]["students"]) >= 2
    header = [line for line in open(path).read().splitlines()[:12] if line.startswith("#")]
    assert any("deepspeed" in line and "fastdistill.train" in line for line in header)


def test_pool_configs_are_resolved_per_pool():
    cfg = validate(tiny_raw())
    a, b = cfg["pools"]["students"]
    assert a["config"]["student"]["config"]["model_type"] == "llama" and a["payload"] == "hidden"
    assert b["config"]["student"]["config"]["model_type"] == "qwen2" and b["payload"] == "topk"
    assert b["config"]["student"]["deepspeed"]["stage"] == 1 and a["config"]["student"]["deepspeed"]["stage"] == 2
    assert b["config"]["losses"][0]["topk"] == 8 and "topk" not in a["config"]["losses"][0]
    assert a["config"]["run"]["output_dir"] == os.path.join("runs/pools_tiny", "llama2l")
    assert a["config"]["pools"] is None
    assert validate({k: v for k, v in tiny_raw().items() if k != "pools"})["pools"] is None


def _student(raw: dict, i: int) -> dict:
    return raw["pools"]["students"][i]


POOL_ERRORS = [
    ("unknown_key", lambda c: c["pools"].update(rings=2), ["pools.rings", "unknown key"]),
    ("empty_pool", lambda c: _student(c, 0).update(ranks=0), ["pools.students[0].ranks", "empty pool"]),
    ("ranks_and_nodes", lambda c: c["pools"]["teacher"].update(nodes=1), ["pools.teacher", "exactly one"]),
    ("no_students", lambda c: c["pools"].update(students=[]), ["pools.students", "non-empty list"]),
    ("same_name", lambda c: _student(c, 1).update(name="llama2l"), ["pools.students[1].name", "unique"]),
    ("payload", lambda c: _student(c, 0).update(payload="logits"), ["pools.students[0].payload", "'hidden'"]),
    (
        "topk_without_k",
        lambda c: _student(c, 1)["losses"][0].pop("topk"),
        ["pools.students[1].payload", "topk"],
    ),
    (
        "bad_student_key",
        lambda c: _student(c, 1)["student"]["deepspeed"].update(stage=5),
        ["pools.students[1]", "student.deepspeed.stage", "5"],
    ),
    ("ring", lambda c: c["pools"].update(ring=0), ["pools.ring", ">= 1"]),
    ("dead_after", lambda c: c["pools"].update(dead_after_s=0.1), ["pools.dead_after_s", ">= 3"]),
    (
        "mixed_sizing",
        lambda c: _student(c, 0).update(ranks=None, nodes=1),
        ["pools", "all by 'ranks' or all by 'nodes'"],
    ),
    (
        "accumulation",
        lambda c: _student(c, 1)["student"]["deepspeed"].update(gradient_accumulation_steps=2),
        ["gradient_accumulation_steps", "expected one value"],
    ),
]


@pytest.mark.parametrize("case", POOL_ERRORS, ids=[c[0] for c in POOL_ERRORS])
def test_pool_config_errors_name_the_key(case):
    _, change, words = case
    raw = tiny_raw()
    change(raw)
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert_one_line_error(str(err.value), words)


@pytest.mark.parametrize("final", [True, False], ids=["final_checkpoint", "no_final_checkpoint"])
def test_the_teacher_commits_only_the_steps_every_pool_saves(final):
    """The student pools save (and report) every ``save_every`` steps before the last, and the last step only with
    ``run.final_checkpoint``; the teacher pool waits for those reports and no others (a report it waited for in vain
    ended a run without a final checkpoint in a bridge timeout)."""
    raw = tiny_raw()
    raw["run"]["final_checkpoint"] = final
    raw["schedule"].update(max_steps=6, save_every=3)
    cfg = validate(raw)
    assert pools.reported_steps(cfg, 0) == ([3, 6] if final else [3])
    assert pools.reported_steps(cfg, 3) == ([6] if final else [])
    assert pools.reported_steps(cfg, 6) == []  # resumed at the end: nothing left to save
    raw["schedule"].update(max_steps=7, save_every=0)
    assert pools.reported_steps(validate(raw), 2) == ([7] if final else [])


def test_rank_plan_by_count_and_by_node():
    cfg = validate(tiny_raw())
    assert pools.assign_ranks(cfg["pools"], 4, [0, 0, 0, 0]) == [("teacher", 0, 2), ("llama2l", 2, 1), ("qwen1l", 3, 1)]
    with pytest.raises(ConfigError, match=r"add up to 4 .* the launch has 5 ranks"):
        pools.assign_ranks(cfg["pools"], 5, [0] * 5)
    raw = tiny_raw()
    raw["pools"]["teacher"] = {"nodes": 1}
    for s in raw["pools"]["students"]:
        s.pop("ranks")
        s["nodes"] = 1
    by_node = validate(raw)["pools"]
    # hostfile order: node 0 has 3 slots (the teacher's big-memory node), nodes 1 and 2 one each
    assert pools.assign_ranks(by_node, 5, [0, 0, 0, 1, 2]) == [("teacher", 0, 3), ("llama2l", 3, 1), ("qwen1l", 4, 1)]
    with pytest.raises(ConfigError, match="ask for 3 nodes, the launch has 2"):
        pools.assign_ranks(by_node, 4, [0, 0, 1, 1])


def test_global_batch_must_be_shared_and_divisible():
    cfg = validate(tiny_raw())
    assert pools.global_batch(cfg["pools"], [("teacher", 0, 2), ("llama2l", 2, 1), ("qwen1l", 3, 1)]) == (4, 2)
    with pytest.raises(ConfigError, match=r"pools.teacher: the global batch of 4 sequences cannot be divided over 3"):
        pools.global_batch(cfg["pools"], [("teacher", 0, 3), ("llama2l", 3, 1), ("qwen1l", 4, 1)])
    bad = copy.deepcopy(cfg["pools"])
    bad["students"][1]["config"]["student"]["deepspeed"]["micro_batch_size"] = 2
    with pytest.raises(ConfigError, match=r"micro_batch_size x ranks differ between pools \(llama2l=4, qwen1l=2\)"):
        pools.global_batch(bad, [("teacher", 0, 2), ("llama2l", 2, 1), ("qwen1l", 3, 1)])


@pytest.mark.parametrize("g,student_ranks,teacher_ranks", [(12, 3, 4), (12, 4, 3), (8, 1, 8), (6, 6, 1)])
def test_rows_are_routed_exactly_once(g, student_ranks, teacher_ranks):
    """Every row of the global batch reaches the one student rank that trains on it, from the teacher rank that ran
    it."""
    mb, mt = g // student_ranks, g // teacher_ranks
    got = []
    for j in range(student_ranks):
        for r in range(teacher_ranks):
            ov = pools.overlaps(j, r, mb, mt)
            if ov is not None:
                got += [(row, j, r) for row in range(*ov)]
    assert sorted(got) == [(row, row // mb, row // mt) for row in range(g)]


def test_record_layout_round_trip(seed):
    """A message of hidden states and one of the teacher cache's top-k record: every field back bit for bit."""
    g = torch.Generator().manual_seed(seed)
    rec = tg.topk_from_hidden(torch.randn(3, 5, 6, generator=g), torch.randn(300, 6, generator=g), 4, (2.0, 1.0))
    fields = {
        "step": torch.tensor([7]),
        "input_ids": torch.randint(0, 256, (3, 5), generator=g),
        "hidden": torch.randn(3, 5, 6, generator=g).bfloat16(),
        **rec.wire(),
    }
    layout = [("step", torch.int64, (1,)), ("input_ids", torch.int64, (3, 5)), ("hidden", torch.bfloat16, (3, 5, 6))]
    lay = bridge.Layout(layout + tg.TopKTargets.wire_layout(3, 5, 4, 2))
    out = lay.unpack(lay.pack(fields).clone())
    for k, v in fields.items():
        assert torch.equal(out[k], v), k
    got = tg.TopKTargets.from_wire(out, rec.temperatures)
    for name in ("indices", "logprobs", "lse", "log_tail"):
        assert torch.equal(getattr(got, name), getattr(rec, name)), name
    assert got.indices.dtype == torch.long and got.temperatures == (2.0, 1.0)
    with pytest.raises(ValueError, match="record field 'topk_logprobs'"):
        lay.pack({**fields, "topk_logprobs": fields["topk_logprobs"][:2]})


def test_distill_loss_takes_the_topk_record_from_every_source(seed):
    """One top-k input type: the record a pool sends (or a cache serves) and the colocated top-k path (computed from
    the teacher's hidden states inside the loss) give the same loss, equal to a float64 reference of the bucket loss
    (the k teacher tokens + the exact tail, KL(teacher || student) x T^2, plus the weighted hard CE)."""
    from fastdistill.train.losses import DistillLoss

    g = torch.Generator().manual_seed(seed)
    n, h_s, h_t, vocab, k, temp = 37, 16, 24, 300, 8, 2.0
    hs, ws = torch.randn(n, h_s, generator=g), torch.randn(vocab, h_s, generator=g) * 0.3
    ht, wt = torch.randn(n, h_t, generator=g), torch.randn(vocab, h_t, generator=g) * 0.3
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::5] = -100
    losses = [{"type": "logit_kd", "weight": 1.0, "divergence": "forward_kl", "beta": 0.5, "temperature": temp,
               "topk": k, "topk_tail": "bucket"}, {"type": "hard_ce", "weight": 0.5}]  # fmt: skip
    loss_fn = DistillLoss(losses, "fused", h_s, h_t)
    record = tg.topk_from_hidden(ht, wt, k, (temp,))
    from_record, parts = loss_fn(hs, ws, record, None, labels)
    colocated, _ = loss_fn(hs, ws, ht, wt, labels)
    assert torch.equal(from_record, colocated)
    # float64 reference
    keep = labels != -100
    zs, zt = (hs.double() @ ws.double().t())[keep], (ht.double() @ wt.double().t())[keep]
    pt, ls = torch.log_softmax(zt / temp, -1), torch.log_softmax(zs / temp, -1)
    idx = pt.topk(k, -1).indices
    t_top, s_top = pt.gather(-1, idx), ls.gather(-1, idx)
    t_tail = torch.log(-torch.expm1(torch.logsumexp(t_top, -1)))
    s_tail = torch.log(-torch.expm1(torch.logsumexp(s_top, -1)))
    kl = (t_top.exp() * (t_top - s_top)).sum(-1) + t_tail.exp() * (t_tail - s_tail)
    ce = torch.nn.functional.cross_entropy(zs, labels[keep])
    ref = temp**2 * kl.mean() + 0.5 * ce
    torch.testing.assert_close(from_record.double(), ref, rtol=2e-5, atol=0)
    torch.testing.assert_close(parts["kd"].double(), temp**2 * kl.mean(), rtol=2e-5, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# launched runs
# ---------------------------------------------------------------------------------------------------------------
def common(out: str) -> list[str]:
    return [
        "--config",
        TINY,
        f"run.output_dir={out}",
        "logging.progress_bar=false",
        f"pools.dead_after_s={DEAD_AFTER_S}",
    ]


def launch(out: str, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return launch_module("fastdistill.train", [*common(out), *overrides], 4, env, TIMEOUT)


def launch_two_nodes(
    out: str, hostfile: str, *overrides: str, env: dict | None = None
) -> list[subprocess.CompletedProcess]:
    """``deepspeed --hostfile H --no_ssh --node_rank R`` once per 'node' (2 slots each): the teacher pool's 2 ranks
    are node 0, the two student pools node 1."""
    return launch_nodes_module("fastdistill.train", [*common(out), *overrides], hostfile, env, TIMEOUT)


def trajectory(folder: str) -> dict[int, dict[str, float]]:
    return metrics(folder, ("train/loss", "train/kd", "train/ce"))


def pool_override(cfg: dict, i: int) -> list[str]:
    """Overrides that turn pools_tiny.yaml into the colocated run of student pool ``i`` (same student, seed, data)."""
    s = cfg["pools"]["students"][i]["config"]
    return [
        "pools=null",
        f"student={json.dumps(s['student'])}",
        f"losses={json.dumps(s['losses'])}",
    ]


@pytest.fixture(scope="module")
def pools_run(tmp_path_factory) -> str:
    """The 4-process pools run, with the collective audit on; and, side by side, the two colocated references."""
    out = str(tmp_path_factory.mktemp("pools"))
    check(launch(out, env={"FASTDISTILL_POOLS_AUDIT": "1"}))
    return out


@pytest.fixture(scope="module")
def colocated(tmp_path_factory) -> dict[str, str]:
    """Each student pool's student trained colocated (one process, the teacher in it), both at once."""
    cfg = load_config(TINY)
    runs, procs = {}, []
    for i, s in enumerate(cfg["pools"]["students"]):
        out = str(tmp_path_factory.mktemp(f"colocated_{s['name']}"))
        cmd = [sys.executable, "-m", "fastdistill.train", "--config", TINY, f"run.output_dir={out}"]
        procs.append(start([*cmd, "logging.progress_bar=false", *pool_override(cfg, i)]))
        runs[s["name"]] = out
    for result in finish(procs, TIMEOUT):
        check(result)
    return runs


@launched
@pytest.mark.parametrize("pool", ["llama2l", "qwen1l"], ids=["hidden_payload", "topk_payload"])
def test_each_pool_follows_its_colocated_trajectory(pools_run, colocated, pool):
    assert_same_trajectory(trajectory(os.path.join(pools_run, pool)), trajectory(colocated[pool]), 6)


@launched
def test_one_teacher_forward_per_step_serves_every_pool(pools_run):
    teacher = json.load(open(os.path.join(pools_run, "teacher", "summary.json")))
    assert teacher["world_size"] == 2
    assert [r["teacher_forwards"] for r in teacher["per_rank"]] == [6, 6]  # 6 steps, 2 pools: not 12
    for pool, payload in (("llama2l", "hidden"), ("qwen1l", "topk")):
        s = json.load(open(os.path.join(pools_run, pool, "summary.json")))
        assert s["pool"] == pool and s["payload"] == payload and s["world_size"] == 1
        assert s["teacher_records_received"] == 6 and s["steps"] == 6
        assert 0 <= s["wait_fraction"] <= 1 and s["tokens_per_s"] > 0
        assert s["student_ppl_after"] < s["student_ppl_before"]
    hidden = json.load(open(os.path.join(pools_run, "llama2l", "summary.json")))["payload_bytes_per_token"]
    topk = json.load(open(os.path.join(pools_run, "qwen1l", "summary.json")))["payload_bytes_per_token"]
    # ids + labels (16 bytes) + 64 fp32 hidden (256) vs the top-k record: 8 x (fp32 log-prob + int32 index) + fp32
    # lse + fp32 log tail (72)
    assert (hidden, topk) == (pytest.approx(16 + 256, abs=1), pytest.approx(16 + 72, abs=1))


@launched
def test_teacher_pool_holds_half_the_teacher_per_rank(pools_run):
    mem = json.load(open(os.path.join(pools_run, "teacher", "teacher_memory.json")))
    assert mem["stage"] == 3 and len(mem["per_rank"]) == 2
    for r in mem["per_rank"]:
        assert abs(r["param_bytes_held"] - r["param_bytes_full"] / 2) <= 0.01 * r["param_bytes_full"], r


@launched
def test_no_collective_spans_more_than_its_pool(pools_run):
    """Every torch.distributed collective of every rank (DeepSpeed's included) ran over a group of its pool's size:
    with one launch-wide world, DeepSpeed's world-scoped calls would show up here with size 4."""
    sizes = {0: 2, 1: 2, 2: 1, 3: 1}
    for g, pool_size in sizes.items():
        audit = json.load(open(os.path.join(pools_run, "audit", f"rank{g}.json")))
        assert audit["pool_size"] == pool_size and audit["launch_size"] == 4
        assert audit["collectives"], audit  # the audit saw the pool's own collectives
        for key, n in audit["collectives"].items():
            op, size = key.rsplit("/", 1)
            assert int(size) <= pool_size, (g, audit["pool"], key, n)
    teacher = json.load(open(os.path.join(pools_run, "audit", "rank0.json")))["collectives"]
    assert any(k.endswith("/2") for k in teacher)  # ZeRO-3 gathers over the 2 teacher ranks


@launched
def test_pool_outputs_and_exported_students(pools_run):
    transformers = pytest.importorskip("transformers")
    assert json.load(open(os.path.join(pools_run, pools.COMMIT)))["step"] == 6
    for pool, model_type in (("llama2l", "llama"), ("qwen1l", "qwen2")):
        folder = os.path.join(pools_run, pool)
        assert open(os.path.join(folder, "checkpoints", "latest")).read().strip() == "step0000006"
        student = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(folder, "student")).eval()
        assert student.config.model_type == model_type
        with torch.no_grad():
            assert torch.isfinite(student(torch.randint(0, 256, (1, 8))).logits).all()


@launched
def test_killed_teacher_rank_ends_the_job_with_its_name(tmp_path):
    out = str(tmp_path / "teacher_killed")
    proc = launch(out, env={"FASTDISTILL_FAULT_KILL": "teacher:1:4"})
    stopped_after = time.time() - float(open(os.path.join(out, "fault_killed_at")).read())
    assert proc.returncode != 0, output(proc)
    printed = proc.stdout + proc.stderr
    assert "fastdistill: pools: teacher pool = global ranks 0..1" in printed, output(proc)
    # every survivor's last line names the killed rank first, whichever way it stopped (the launcher's SIGTERM sweep,
    # its collective or bridge wait failing, or the store going with rank 0), never a rank the sweep ended
    dead = "teacher pool rank 1 (global rank 1)"
    named = re.findall(r"[Ss]topped first: (?:pools: )?(.*)", printed)
    assert named, output(proc)
    assert all(n.startswith(dead) for n in named), (named, output(proc))
    # no hang: far below pools.timeout_s (300 s in pools_tiny.yaml) and gloo's 30-minute default, with room for the
    # launcher's sequential SIGTERM sweep of 3 survivors on a loaded 2-core machine
    assert stopped_after < 120, (stopped_after, output(proc))
    assert "lost the store" not in printed or "stopped first: " + dead in printed


@launched
def test_two_nodes_student_killed_then_resumed_on_the_same_trajectory(colocated, tmp_path):
    """Teacher pool on node 0, student pools on node 1; the Qwen student SIGKILLs itself after step 6, before its final
    checkpoint (checkpoints at 3 and 6): node 0 has no launcher-side view of node 1, its ranks stop through the bridge
    and the watchdog; the resumed run continues from the committed step 3 and follows the uninterrupted single-node
    trajectory. (Step 3 is committed once every pool saved it: the slowest pool is at most ``ring`` steps behind the
    teacher, so a pool dying at step >= 3 + ring + 1 finds step 3 saved everywhere.) The resumed run ends without a
    final checkpoint (``run.final_checkpoint: false``): every rank still exits 0, each pool writes its summary and
    exports its student, and the commit stays at step 3 (the teacher pool waits for no report of step 6)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    out = str(tmp_path / "two_nodes")
    killed = launch_two_nodes(out, str(hostfile), env={"FASTDISTILL_FAULT_KILL": "qwen1l:0:6"})
    assert all(r.returncode != 0 for r in killed), "\n".join(output(r) for r in killed)
    node0 = killed[0].stdout + killed[0].stderr
    assert "student pool 'qwen1l' rank 0 (global rank 3)" in node0, output(killed[0])
    killed_at = float(open(os.path.join(out, "qwen1l", "fault_killed_at")).read())
    stopped_after = max(r.ended_at for r in killed) - killed_at
    assert stopped_after < DEAD_AFTER_S + 50, stopped_after  # pools.timeout_s is 300 in pools_tiny.yaml
    assert json.load(open(os.path.join(out, pools.COMMIT)))["step"] == 3
    for r in launch_two_nodes(out, str(hostfile), "run.final_checkpoint=false"):
        check(r)
    for pool in ("llama2l", "qwen1l"):
        summary = json.load(open(os.path.join(out, pool, "summary.json")))
        assert summary["start_step"] == 3 and summary["steps"] == 6
        assert_same_trajectory(trajectory(os.path.join(out, pool)), trajectory(colocated[pool]), 6)
        assert os.path.isfile(os.path.join(out, pool, "student", "config.json"))
    assert json.load(open(os.path.join(out, "teacher", "summary.json")))["teacher_forwards"] == 3
    assert json.load(open(os.path.join(out, pools.COMMIT)))["step"] == 3


@launched
def test_a_plan_that_does_not_fit_the_launch_is_one_line(tmp_path):
    """pools_tiny.yaml needs 4 ranks; launched with 3, every rank stops at once with exit code 2 and one line."""
    proc = launch_module("fastdistill.train", common(str(tmp_path / "misfit")), 3, timeout=TIMEOUT)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert lines == [
        "fastdistill train: config error: pools: the pools' ranks add up to 4 (teacher=2, llama2l=1, qwen1l=1), "
        "the launch has 3 ranks; expected them to add up to the launch's"
    ], output(proc)
