"""Every user-facing input of ``fastdistill train`` and ``fastdistill dataset-distill`` given a bad value: one line on
stderr (``fastdistill <command>: config error: ...``) naming the key, the value and what to do, exit code 2, nothing
left behind. Also the resume compatibility rules. In-process and fast: these checks all run before DeepSpeed is
imported (the ones that need a launch are in test_train.py)."""

from __future__ import annotations

import os

import pytest
import yaml
from conftest import assert_one_line_error

from fastdistill._config import ConfigError
from fastdistill.dataset_distill.cli import main as dd_main
from fastdistill.train import resume as resume_lib
from fastdistill.train.cli import main as train_main
from fastdistill.train.config import dump_config, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def minimal(out: str) -> dict:
    return {
        "run": {"output_dir": out},
        "teacher": {"config": {"model_type": "llama", "vocab_size": 256}},
        "student": {"init_from_teacher": {"layers": [0]}},
        "data": {"tokenizer": "bytes"},
        "schedule": {"max_steps": 6},
    }


def fake_checkpoint(out: str, cfg: dict, step: int, world: int) -> str:
    """What ``save_checkpoint`` leaves that resume reads: latest, the step folder's config.yaml and state.json."""
    root = os.path.join(out, "checkpoints")
    folder = os.path.join(root, f"step{step:07d}")
    os.makedirs(folder)
    dump_config(validate(cfg), os.path.join(folder, "config.yaml"))
    resume_lib.write_state(folder, step, world)
    open(os.path.join(folder, "mp_rank_00_model_states.pt"), "w").close()
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(f"step{step:07d}")
    return folder


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A run file, a writable output folder that does not exist yet, and a launcher-free environment."""
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    path = tmp_path / "run.yaml"
    out = str(tmp_path / "out")
    path.write_text(yaml.safe_dump(minimal(out)))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("run: {output_dir: [x\n")
    return {
        "config": str(path),
        "out": out,
        "file": str(a_file),
        "empty": str(empty),
        "tmp": tmp_path,
        "bad_yaml": str(bad_yaml),
    }


def with_checkpoint(step: int = 3, world: int = 1, **changes):
    def setup(e):
        cfg = minimal(e["out"])
        for dotted, value in changes.items():
            node = cfg
            *parents, last = dotted.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        fake_checkpoint(e["out"], cfg, step, world)

    return setup


# (id, setup(env) or None, overrides (with {file}/{empty}/{out}/{tmp} filled in), words the one line must contain)
TRAIN_CASES = [
    ("config_missing", None, ["--config={tmp}/nope.yaml"], ["--config", "does not exist"]),
    ("override_syntax", None, ["schedule.max_steps"], ["key=value"]),
    ("override_yaml", None, ["losses=[{type: logit_kd"], ["override", "not valid YAML"]),
    ("unknown_key", None, ["schedule.max_step=3"], ["unknown key", "schedule.max_step"]),
    ("threads", None, ["run.threads=0"], ["run.threads", "got 0", ">= 1"]),
    ("keep_checkpoints", None, ["run.keep_checkpoints=-1"], ["run.keep_checkpoints", ">= 0"]),
    ("eval_batches", None, ["schedule.eval_batches=0"], ["schedule.eval_batches", ">= 1"]),
    ("max_train_sequences", None, ["data.max_train_sequences=0"], ["data.max_train_sequences", ">= 1"]),
    ("gradient_clipping", None, ["student.deepspeed.gradient_clipping=-1.0"], ["gradient_clipping", ">= 0"]),
    ("resume_wrong_type", None, ["run.resume=3"], ["run.resume", "a string"]),
    ("config_not_yaml", None, ["--config={bad_yaml}"], ["--config", "not valid YAML"]),
    ("loss_impl", None, ["run.loss_impl=eager"], ["run.loss_impl", "'eager'", "fused"]),
    ("final_checkpoint", None, ["run.final_checkpoint=maybe"], ["run.final_checkpoint", "true/false"]),
    ("teacher_config_no_type", None, ["teacher.config={vocab_size: 256}"], ["teacher.config", "model_type"]),
    ("teacher_dtype", None, ["teacher.dtype=float16"], ["teacher.dtype", "'float16'"]),
    ("nvme_no_path", None, ["teacher.deepspeed.offload_param=nvme"], ["nvme_path"]),
    ("micro_batch", None, ["student.deepspeed.micro_batch_size=0"], ["micro_batch_size", ">= 1"]),
    ("optimizer_no_type", None, ["student.deepspeed.optimizer={type: null}"], ["optimizer.type", "None"]),
    ("optimizer_name", None, ["student.deepspeed.optimizer.type=AdamWW"], ["optimizer.type", "'AdamWW'", "adamw"]),
    ("scheduler_name", None, ["student.deepspeed.scheduler.type=Cosine"], ["scheduler.type", "'Cosine'"]),
    ("optimizer_params", None, ["student.deepspeed.optimizer.params=0.1"], ["optimizer.params", "mapping"]),
    ("seq_len", None, ["data.seq_len=1"], ["data.seq_len", ">= 2"]),
    ("heldout_fraction", None, ["data.heldout_fraction=1.5"], ["data.heldout_fraction", "(0, 1)"]),
    ("divergence", None, ["losses=[{type: logit_kd, divergence: kl}]"], ["divergence", "'kl'"]),
    (
        "teacher_missing",
        None,
        ["teacher.config=null", "teacher.model={tmp}/no_teacher"],
        ["teacher.model", "no_teacher", "does not exist"],
    ),
    (
        "teacher_no_config_json",
        None,
        ["teacher.config=null", "teacher.model={empty}"],
        ["teacher.model", "config.json"],
    ),
    ("teacher_is_file", None, ["teacher.config=null", "teacher.model={file}"], ["teacher.model", "is a file"]),
    (
        "teacher_gguf_missing",
        None,
        ["teacher.config=null", "teacher.model={tmp}/t.gguf"],
        ["teacher.model", "t.gguf", "does not exist"],
    ),
    (
        "teacher_gguf_file_missing",
        None,
        ["teacher.config=null", "teacher.model={empty}", "teacher.gguf_file=q4.gguf"],
        ["gguf_file", "q4.gguf"],
    ),
    (
        "student_missing",
        None,
        ["student.init_from_teacher=null", "student.model={tmp}/no_student"],
        ["student.model", "no_student"],
    ),
    ("tokenizer_missing", None, ["data.tokenizer={tmp}/no_tok"], ["data.tokenizer", "no_tok", "does not exist"]),
    ("data_source_missing", None, ["data.source={tmp}/corpus.txt"], ["data.source", "corpus.txt"]),
    ("output_under_a_file", None, ["run.output_dir={file}/run"], ["run.output_dir", "is a file", "cannot be created"]),
    ("output_is_a_file", None, ["run.output_dir={file}"], ["run.output_dir", "is a file"]),
    ("resume_missing", None, ["run.resume={tmp}/ckpt"], ["run.resume", "does not exist", "'never'"]),
    ("resume_not_a_checkpoint", None, ["run.resume={empty}"], ["run.resume", "no DeepSpeed checkpoint"]),
    (
        "resume_other_zero_stage",
        with_checkpoint(),
        ["student.deepspeed.stage=3"],
        ["student.deepspeed.stage 2 -> 3", "run.resume=never", "run.output_dir"],
    ),
    (
        "resume_other_model_and_data",
        with_checkpoint(),
        ["data.seq_len=64", "student.init_from_teacher.layers=[0, 1]"],
        ["data.seq_len 128 -> 64", "student.init_from_teacher", "run.resume=never"],
    ),
    (
        "resume_other_world_size",
        with_checkpoint(world=2),
        [],
        ["world size 2 -> 1", "ZeRO stage 2"],
    ),
    (
        "resume_other_optimizer",
        with_checkpoint(),
        ["student.deepspeed.optimizer={type: SGD, params: {lr: 0.1}}"],
        ["student.deepspeed.optimizer.type 'AdamW' -> 'SGD'"],
    ),
    (
        "resume_hint_added",
        with_checkpoint(),
        ["losses=[{type: logit_kd}, {type: hint, layer_map: {0: 1}}]"],
        ["losses with learned parameters"],
    ),
]


def _fill(items: list[str], e: dict) -> list[str]:
    out = []
    for x in items:
        for k, v in e.items():
            x = x.replace("{" + k + "}", str(v))
        out.append(x)
    return out


@pytest.mark.parametrize("setup,overrides,words", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input_is_one_line(env, capsys, setup, overrides, words):
    if setup is not None:
        setup(env)
    existed = os.path.exists(env["out"])
    args = _fill(overrides, env)
    config = [a for a in args if a.startswith("--config=")]
    argv = (config or [f"--config={env['config']}"]) + [a for a in args if not a.startswith("--config=")]
    assert train_main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert_one_line_error(err, _fill(words, env), start="fastdistill train: config error: ")
    assert "Traceback" not in captured.out + captured.err
    assert os.path.exists(env["out"]) == existed  # no run folder left holding only config.yaml


def test_train_error_printed_by_rank_0_only(env, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert train_main([f"--config={env['config']}", "teacher.config=null", f"teacher.model={env['tmp']}/x"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert train_main([f"--config={env['config']}", "teacher.config=null", f"teacher.model={env['tmp']}/x"]) == 2
    assert capsys.readouterr().err.count("config error") == 1


def test_finished_run_says_how_to_extend(env, capsys):
    fake_checkpoint(env["out"], minimal(env["out"]), step=6, world=1)
    assert train_main([f"--config={env['config']}"]) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and "already at step 6 of schedule.max_steps=6" in out, out
    assert "schedule.max_steps=12" in out and "run.resume=never" in out
    with pytest.raises(resume_lib.RunFinished):  # max_steps lowered below the checkpoint: finished too
        resume_lib.check(validate({**minimal(env["out"]), "schedule": {"max_steps": 4}}), 1)


def test_changes_a_resume_allows(env):
    fake_checkpoint(env["out"], minimal(env["out"]), step=3, world=2)
    cfg = minimal(env["out"])
    cfg["schedule"] = {"max_steps": 50, "eval_every": 5, "save_every": 5, "log_every": 2}
    cfg["logging"] = {"tensorboard": False, "progress_bar": False}
    cfg["run"].update(threads=1, keep_checkpoints=5)
    cfg["teacher"]["deepspeed"] = {"stage": 0}
    cfg["student"]["deepspeed"] = {"optimizer": {"params": {"lr": 1e-4}}, "gradient_clipping": 0.5}
    cfg["data"]["max_heldout_sequences"] = 8
    cfg["losses"] = [{"type": "logit_kd", "temperature": 2.0}, {"type": "hard_ce", "weight": 0.1}]
    ckpt = resume_lib.check(validate(cfg), world_size=2)
    assert ckpt is not None and ckpt.step == 3 and ckpt.world_size == 2
    assert resume_lib.check(validate({**cfg, "run": {**cfg["run"], "resume": "never"}}), 1) is None
    # ZeRO-0 keeps the whole optimizer state in one file: another world size may continue it
    cfg0 = minimal(env["out"] + "0")
    cfg0["student"]["deepspeed"] = {"stage": 0}
    fake_checkpoint(cfg0["run"]["output_dir"], cfg0, step=3, world=2)
    assert resume_lib.check(validate(cfg0), world_size=1).step == 3


def test_old_checkpoint_without_state_file(env):
    folder = fake_checkpoint(env["out"], minimal(env["out"]), step=3, world=2)
    os.remove(os.path.join(folder, resume_lib.STATE_FILE))
    for r in range(2):  # ZeRO-2 writes one optimizer shard per rank
        open(os.path.join(folder, f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"), "w").close()
    ckpt = resume_lib.read(folder)
    assert (ckpt.step, ckpt.world_size) == (3, 2)
    with pytest.raises(ConfigError, match="world size 2 -> 1"):
        resume_lib.check(validate(minimal(env["out"])), 1)


def test_interrupt_line_names_checkpoint_and_command(env):
    from fastdistill.train.errors import interrupted

    cfg = validate(minimal(env["out"]))
    line = interrupted(cfg, ["--config", "run.yaml", "schedule.max_steps=9"], launched=False)
    assert "before the first checkpoint" in line and "save_every=0" in line
    fake_checkpoint(env["out"], minimal(env["out"]), step=3, world=1)
    line = interrupted(cfg, ["--config", "run.yaml", "--local_rank=0", "schedule.max_steps=9"], launched=False)
    assert "step0000003" in line and "(step 3)" in line
    assert line.endswith("continue with: fastdistill train --config run.yaml schedule.max_steps=9"), line
    cfg["run"]["resume"] = "never"
    assert interrupted(cfg, ["--config", "run.yaml"], launched=True).endswith(
        "continue with the same deepspeed command run.resume=auto"
    )


# ---------------------------------------------------------------- dataset-distill
DD_SMOKE = os.path.join(REPO, "configs", "mtt_digits_smoke.yaml")
DD_CASES = [
    ("config_missing", ["run", "--config={tmp}/nope.yaml"], ["--config", "does not exist"]),
    ("override_syntax", ["run", "distill.iterations"], ["key=value"]),
    ("unknown_key", ["run", "distill.iteration=5"], ["unknown key", "distill.iteration"]),
    ("wrong_type", ["run", "distill.syn_steps=ten"], ["distill.syn_steps", "'ten'"]),
    ("choice", ["run", "distill.unroll=adjoint"], ["distill.unroll", "'adjoint'"]),
    ("positive", ["experts", "experts.lr=-0.1"], ["experts.lr", "positive"]),
    ("run_dir_under_file", ["experts", "run_dir={file}/mtt"], ["run_dir", "is a file"]),
    ("data_root_missing", ["experts", "data.name=fashion_mnist", "data.root={tmp}/fm"], ["data.root", "/fm"]),
]


@pytest.mark.parametrize("argv,words", [c[1:] for c in DD_CASES], ids=[c[0] for c in DD_CASES])
def test_dataset_distill_bad_input_is_one_line(env, capsys, argv, words):
    argv = _fill(argv, env)
    if not any(a.startswith("--config") for a in argv):
        argv.append(f"--config={DD_SMOKE}")
    assert dd_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert_one_line_error(err, _fill(words, env), start="fastdistill dataset-distill: config error: ")


def test_cpu_student_uses_torch_adamw_unless_asked():
    """DeepSpeed's own Adam on CPU is an op compiled on first use: the trainer asks for torch's unless told not to."""
    import torch

    from fastdistill.train.recipe import student_ds_config

    cfg = minimal("runs/x")
    cfg["student"]["deepspeed"] = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    if torch.cuda.is_available():
        pytest.skip("the default concerns CPU-only machines")
    assert student_ds_config(validate(cfg))["optimizer"]["params"] == {"lr": 1e-3, "torch_adam": True}
    cfg["student"]["deepspeed"]["optimizer"]["params"]["torch_adam"] = False
    assert student_ds_config(validate(cfg))["optimizer"]["params"]["torch_adam"] is False


def test_dataset_distill_overrides_use_the_train_syntax():
    from fastdistill.dataset_distill.config import load_config

    cfg = load_config(DD_SMOKE, ["distill.iterations=7", "run_dir=/tmp/x", "threads=null", "distill.lr_init=1e-3"])
    assert (cfg.distill.iterations, cfg.run_dir, cfg.threads, cfg.distill.lr_init) == (7, "/tmp/x", None, 1e-3)


def test_a_rank_that_loses_a_peer_says_so_in_one_line(env, capsys, monkeypatch):
    """Under the launcher, a rank whose collective fails because another rank died prints one line, no traceback."""
    import fastdistill.train.recipe as recipe

    def lost(cfg):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]")

    monkeypatch.setattr(recipe, "run", lost)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    assert train_main([f"--config={env['config']}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("fastdistill train: rank 1: stopping, another rank exited first"), err

    def bug(cfg):
        raise RuntimeError("something else")

    monkeypatch.setattr(recipe, "run", bug)
    with pytest.raises(RuntimeError, match="something else"):  # a real failure keeps its traceback
        train_main([f"--config={env['config']}"])
