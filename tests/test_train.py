"""The distillation trainer end to end, on CPU with the real ``deepspeed`` launcher (gloo, loopback only).

A tiny Llama teacher (saved once to a folder) is sharded with ZeRO-3 over 2 ranks and distilled into a 2-layer student
(ZeRO-2). Against that run: the teacher holds half its parameter bytes per rank, its logits equal an unsharded copy's,
a stage-0 teacher gives the same loss trajectory, a two-node launch (one slot each, simulated on this machine) gives the
same trajectory, a run SIGKILLed mid-way and resumed gives the same trajectory, and the exported student loads with
plain transformers. One single-process run goes through the shipped demo config with a tiny model.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time

import pytest
import torch

pytest.importorskip("deepspeed")
transformers = pytest.importorskip("transformers")

from _launch import LAUNCHED, REPO, TIMEOUT, check, launch_nodes, losses, run, save_tiny_teacher, start  # noqa: E402
from _launch import launch as launch_module  # noqa: E402

TINY = os.path.join(REPO, "configs", "tiny_llama_zero3.yaml")
DEMO = os.path.join(REPO, "configs", "demo_smollm2.yaml")

pytestmark = LAUNCHED


def launch(out: str, teacher: str, *overrides: str, nproc: int = 2, env: dict | None = None):
    args = ["--config", TINY, f"run.output_dir={out}", f"teacher.model={teacher}", "teacher.config=null"]
    return launch_module("fastdistill.train", [*args, "logging.progress_bar=false", *overrides], nproc, env)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    """The tiny Llama of configs/tiny_llama_zero3.yaml with fixed random weights, saved as a folder."""
    return save_tiny_teacher(str(tmp_path_factory.mktemp("teacher")), TINY)


@pytest.fixture(scope="module")
def zero3_run(teacher_dir, tmp_path_factory) -> str:
    """Teacher ZeRO-3 + student ZeRO-2 on 2 ranks, 6 steps, checkpoints at 3 and 6: the reference run."""
    out = str(tmp_path_factory.mktemp("zero3"))
    t0 = time.time()
    check(launch(out, teacher_dir, env={"FASTDISTILL_DEBUG_DUMP": "1"}))
    print(f"zero3 run: {time.time() - t0:.1f} s")
    return out


def test_zero3_teacher_is_sharded_and_matches_unsharded_logits(zero3_run, teacher_dir):
    mem = json.load(open(os.path.join(zero3_run, "teacher_memory.json")))
    assert mem["stage"] == 3 and len(mem["per_rank"]) == 2
    for r in mem["per_rank"]:
        assert abs(r["param_bytes_held"] - r["param_bytes_full"] / 2) <= 0.01 * r["param_bytes_full"], r
    dump = torch.load(os.path.join(zero3_run, "debug_teacher_logits.pt"))
    unsharded = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        ref = unsharded(dump["input_ids"]).logits
    torch.testing.assert_close(dump["logits"], ref, rtol=1e-5, atol=1e-5)


def test_zero3_run_outputs(zero3_run):
    traj = losses(zero3_run)
    assert sorted(traj) == [1, 2, 3, 4, 5, 6]
    summary = json.load(open(os.path.join(zero3_run, "summary.json")))
    assert summary["world_size"] == 2
    assert summary["student_ppl_after"] < summary["student_ppl_before"]
    assert os.path.isfile(os.path.join(zero3_run, "config.yaml"))
    ckpts = os.path.join(zero3_run, "checkpoints")
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step0000006"
    for tag in ("step0000003", "step0000006"):
        assert os.path.isfile(os.path.join(ckpts, tag, "config.yaml"))
        assert os.path.isfile(os.path.join(ckpts, tag, "rng_rank1.pt"))
    assert any(f.startswith("events.") for f in os.listdir(os.path.join(zero3_run, "tensorboard")))


def test_exported_student_loads_with_plain_transformers(zero3_run):
    folder = os.path.join(zero3_run, "student")
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    student = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert student.config.num_hidden_layers == 2
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        logits = student(ids).logits
    assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()


def test_export_writes_the_weights_of_flat_buffer_views(tmp_path):
    """ZeRO 1/2 keep the parameters as views into one flat buffer: the export writes them without a copy of the
    model, every trained weight as it is, and a tied lm_head stays tied."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from fastdistill.train.recipe import export_student

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    at = 0
    for p in params:  # what DeepSpeed's ZeRO 1/2 do with the trained parameters
        p.data = flat[at : at + p.numel()].view_as(p)
        at += p.numel()
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        export_student(SimpleNamespace(module=SimpleNamespace(model=model)), None, str(tmp_path / "student"), 0)
    finally:
        dist.destroy_process_group()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"))
    want = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, want[name]), name
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_stage0_teacher_gives_the_same_trajectory(zero3_run, teacher_dir, tmp_path):
    out = str(tmp_path / "stage0")
    check(launch(out, teacher_dir, "teacher.deepspeed.stage=0", "schedule.save_every=0"))
    mem = json.load(open(os.path.join(out, "teacher_memory.json")))
    assert all(r["param_bytes_held"] == r["param_bytes_full"] for r in mem["per_rank"])
    ref, got = losses(zero3_run), losses(out)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, got[step], ref[step])


def test_sigkill_and_resume_follow_the_same_trajectory(zero3_run, teacher_dir, tmp_path):
    out = str(tmp_path / "killed")
    # rank 0 SIGKILLs itself right after step 5 (checkpoints at 3): the launcher tears the other rank down
    proc = launch(out, teacher_dir, env={"FASTDISTILL_FAULT_KILL_AT_STEP": "5"})
    assert proc.returncode != 0
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step0000003"
    assert max(losses(out)) == 5
    check(launch(out, teacher_dir))  # run.resume: auto picks up checkpoints/latest
    ref, got = losses(zero3_run), losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, got[step], ref[step])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["start_step"] == 3 and summary["steps"] == 6


def test_two_node_launch_simulated_on_one_machine(zero3_run, teacher_dir, tmp_path):
    """Two 'nodes' of one slot each: ``deepspeed --hostfile H --no_ssh --node_rank R`` started once per node."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = str(tmp_path / "twonode")
    args = ["--config", TINY, f"run.output_dir={out}", f"teacher.model={teacher_dir}", "teacher.config=null"]
    results = launch_nodes("fastdistill.train", [*args, "logging.progress_bar=false"], str(hostfile))
    for r in results:
        check(r)
    assert json.load(open(os.path.join(out, "summary.json")))["world_size"] == 2
    ref, got = losses(zero3_run), losses(out)
    for step in ref:  # the same 2-rank world as the reference run, so the same trajectory
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, got[step], ref[step])


def test_single_process_demo_config_with_tiny_model(teacher_dir, tmp_path):
    """The shipped demo config, end to end in one process without the launcher, with the tiny teacher swapped in."""
    out = str(tmp_path / "demo")
    cmd = [
        sys.executable,
        "-m",
        "fastdistill.cli",
        "train",
        "--config",
        DEMO,
        f"run.output_dir={out}",
        f"teacher.model={teacher_dir}",
        "data.tokenizer=bytes",
        "student.init_from_teacher.layers=[0, 3]",
        "data.seq_len=32",
        "data.max_train_sequences=16",
        "data.max_heldout_sequences=8",
        "schedule.max_steps=3",
    ]
    proc = run(cmd)
    check(proc)
    assert "held-out perplexity: student" in proc.stdout
    printed = proc.stdout + proc.stderr
    for noise in ("built successfully", "FutureWarning", "[WARNING]", "Writing model shards", "Traceback"):
        assert noise not in printed, (noise, printed[-3000:])
    # the progress bar: one frame per step, showing that step's loss (never the previous step's)
    shown: dict[int, set[str]] = {}
    for frame in proc.stderr.replace("\n", "\r").split("\r"):  # tqdm redraws with \r
        if frame.startswith("distill:") and "loss=" in frame:
            shown.setdefault(int(frame.split("|")[2].split("/")[0]), set()).add(frame.split("loss=")[1].split()[0])
    ref = losses(out)
    assert sorted(shown) == [1, 2, 3], proc.stderr[-3000:]
    for step, values in shown.items():
        assert values == {f"{ref[step]:.4f}"}, (step, values, ref)
    # the demo keeps the exported student only (run.final_checkpoint: false), no optimizer-state checkpoint
    assert not os.path.exists(os.path.join(out, "checkpoints"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["world_size"] == 1 and summary["steps"] == 3
    assert summary["student_ppl_after"] < summary["student_ppl_before"]
    assert summary["teacher_ppl"] > 0
    student = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "student"))
    assert student.config.num_hidden_layers == 2


def test_every_loss_with_a_narrower_student_single_process(teacher_dir, tmp_path):
    """logit KD + CE + hint (learned projection, the widths differ) + attention + affinity, student ZeRO-3."""
    out = str(tmp_path / "losses")
    student = (
        "{model_type: llama, vocab_size: 256, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
        "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}"
    )
    losses_ = (
        "[{type: logit_kd, temperature: 2.0}, {type: hard_ce, weight: 0.5}, "
        "{type: hint, weight: 0.1, layer_map: {0: 1, 1: 3}}, {type: attention, weight: 0.1, layer_map: {1: 3}}, "
        "{type: affinity, weight: 0.1, layer_map: {1: 3}}]"
    )
    cmd = [
        sys.executable,
        "-m",
        "fastdistill.train",
        "--config",
        TINY,
        f"run.output_dir={out}",
        f"teacher.model={teacher_dir}",
        "teacher.config=null",
        "student.init_from_teacher=null",
        f"student.config={student}",
        "student.deepspeed.stage=3",
        f"losses={losses_}",
        "schedule.max_steps=3",
        "schedule.save_every=0",
        "logging.progress_bar=false",
    ]
    check(run(cmd))
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 3
    for key in ("train/kd", "train/ce", "train/hint", "train/attention", "train/affinity"):
        assert all(float(r[key]) >= 0 and float(r[key]) == float(r[key]) for r in rows), key
    exported = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "student"))
    assert exported.config.hidden_size == 32


def test_resume_refuses_an_incompatible_checkpoint_once_per_launch(zero3_run, teacher_dir, tmp_path):
    """The README's second command after the first (ZeRO-2 checkpoint, ZeRO-3 requested), another number of
    processes, a finished run: one line from rank 0, before anything is built; nothing in the folder changes."""
    from fastdistill.train import resume as resume_lib
    from fastdistill.train.config import ConfigError, load_config

    out = str(tmp_path / "copy")
    shutil.copytree(zero3_run, out)
    before = sorted(os.listdir(os.path.join(out, "checkpoints")))
    base = [f"run.output_dir={out}", f"teacher.model={teacher_dir}", "teacher.config=null", "schedule.max_steps=20"]
    cfg = load_config(TINY, base)
    assert resume_lib.check(cfg, world_size=2).step == 6  # what DeepSpeed wrote is read back: step, world size
    with pytest.raises(ConfigError, match="world size 2 -> 1"):  # ZeRO-2: one optimizer shard per rank
        resume_lib.check(cfg, world_size=1)
    for overrides, nproc, code, words in [
        (["student.deepspeed.stage=3", "schedule.max_steps=20"], 2, 2, ["student.deepspeed.stage 2 -> 3"]),
        ([], 2, 0, ["already at step 6 of schedule.max_steps=6", "schedule.max_steps=12"]),
    ]:
        proc = launch(out, teacher_dir, *overrides, nproc=nproc)
        printed = proc.stdout + proc.stderr
        assert proc.returncode == code, printed[-3000:]
        assert printed.count("fastdistill train:") == 1, printed[-3000:]  # rank 0 only
        for w in words:
            assert w in printed, (w, printed[-3000:])
        if code:
            assert "config error" in printed and "run.resume=never" in printed and "Traceback" not in printed
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == before


def test_optimizer_typo_is_one_line_from_rank_0(teacher_dir, tmp_path):
    out = str(tmp_path / "typo")
    proc = launch(out, teacher_dir, "student.deepspeed.optimizer.params.lrr=0.1", "schedule.max_steps=1")
    printed = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert printed.count("fastdistill train: config error: student.deepspeed.optimizer") == 1, printed[-3000:]
    assert "lrr" in printed and "Traceback" not in printed
    assert not os.path.exists(out)  # nothing but set-up files had been written: no run folder left behind


def test_ctrl_c_names_the_last_checkpoint_and_the_command(teacher_dir, tmp_path):
    import signal

    out = str(tmp_path / "interrupted")
    cmd = [sys.executable, "-m", "fastdistill.train", "--config", TINY, f"run.output_dir={out}"]
    cmd += [f"teacher.model={teacher_dir}", "teacher.config=null", "schedule.max_steps=500", "schedule.save_every=2"]
    cmd += ["logging.progress_bar=false", "logging.tensorboard=false"]
    proc = start(cmd)
    latest = os.path.join(out, "checkpoints", "latest")
    deadline = time.time() + TIMEOUT
    while not os.path.isfile(latest) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    tag = open(latest).read().strip()
    assert last.startswith("fastdistill train: interrupted; last checkpoint") and tag in last, stderr[-3000:]
    assert "continue with: fastdistill train --config" in last and f"run.output_dir={out}" in last
    assert "Traceback" not in stderr
