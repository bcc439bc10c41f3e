"""The online distillation recipe, top to bottom: setup (distributed, data, teacher engine, student engine), the
train loop (teacher forward under no_grad -> fused loss -> student step), evaluation, checkpoints and export.

One optimizer step on each rank (see docs/DESIGN.md):

    batch ──► teacher engine (ZeRO-3 or 0, no_grad) ──► teacher final hidden states
          └─► student engine (ZeRO 0-3)              ──► student final hidden states
    both + both lm_head weights (the teacher's gathered only here) ──► fused linear loss ──► backward ──► step
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import signal
import time

import numpy as np
import torch

from fastdistill.cache import source as cache_source
from fastdistill.train import data as data_lib
from fastdistill.train import errors, models, output
from fastdistill.train import resume as resume_lib
from fastdistill.train.config import ConfigError, dump_config
from fastdistill.train.losses import DistillLoss

CHECKPOINTS = resume_lib.CHECKPOINTS


# ---------------------------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int]:
    """Under the ``deepspeed`` launcher the rank variables are set; a plain single process gets a world of one."""
    if "RANK" not in os.environ:
        import socket

        with socket.socket() as s:  # a free loopback port for the one-process group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    output.prepare_deepspeed()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # gloo on CPU unless oneCCL is installed (DeepSpeed's CPU accelerator picks), nccl on CUDA
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def prepare_models(cfg: dict, rank: int):
    """Rank 0 converts a GGUF / builtin teacher once into the cache while the others wait; returns the tokenizer."""
    import torch.distributed as dist

    t = cfg["teacher"]
    for name, gguf in ((t["model"], t["gguf_file"]), (cfg["data"]["tokenizer"], None)):
        if name and name not in ("teacher", "bytes") and (name in models.BUILTIN or name.endswith(".gguf") or gguf):
            if rank == 0:
                models.resolve_model_path(name, gguf)
    dist.barrier()
    return models.load_tokenizer(cfg["data"]["tokenizer"], t["model"], t["gguf_file"])


def teacher_ds_config(cfg: dict, world_size: int) -> dict:
    tds = cfg["teacher"]["deepspeed"]
    zero: dict = {"stage": tds["stage"]}
    if tds["stage"] == 3:
        zero.update(
            stage3_prefetch_bucket_size=tds["prefetch_bucket_size"],
            stage3_param_persistence_threshold=tds["param_persistence_threshold"],
            stage3_max_live_parameters=tds["max_live_parameters"],
        )
        if tds["offload_param"] != "none":
            zero["offload_param"] = {"device": tds["offload_param"], "pin_memory": torch.cuda.is_available()}
            if tds["offload_param"] == "nvme":
                zero["offload_param"]["nvme_path"] = tds["nvme_path"]
    out = {
        "train_micro_batch_size_per_gpu": cfg["student"]["deepspeed"]["micro_batch_size"],
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg["teacher"]["dtype"] == "bfloat16"},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    out.update(tds["extra"] or {})
    return out


def student_ds_config(cfg: dict) -> dict:
    sds, steps = cfg["student"]["deepspeed"], cfg["schedule"]["max_steps"]
    scheduler = None
    if sds["scheduler"] is not None:
        scheduler = {"type": sds["scheduler"]["type"], "params": dict(sds["scheduler"].get("params") or {})}
        if scheduler["type"] in ("WarmupCosineLR", "WarmupDecayLR"):
            scheduler["params"].setdefault("total_num_steps", steps)
    optimizer = {"type": sds["optimizer"]["type"], "params": dict(sds["optimizer"].get("params") or {})}
    if optimizer["type"].lower() in ("adam", "adamw") and not torch.cuda.is_available():
        # DeepSpeed's default Adam on CPU is an op it compiles on first use (~20 s or more): torch's AdamW unless asked
        optimizer["params"].setdefault("torch_adam", True)
    out = {
        "train_micro_batch_size_per_gpu": sds["micro_batch_size"],
        "gradient_accumulation_steps": sds["gradient_accumulation_steps"],
        "gradient_clipping": sds["gradient_clipping"],
        "zero_optimization": {"stage": sds["stage"]},
        "optimizer": optimizer,
        "bf16": {"enabled": sds["precision"] == "bf16"},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if scheduler is not None:
        out["scheduler"] = scheduler
    out.update(sds["extra"] or {})
    return out


def build_teacher(cfg: dict, world_size: int):
    """The frozen teacher engine. With stage 3 transformers builds the model inside ``zero.Init`` (each rank only ever
    holds its shard) because an ``HfDeepSpeedConfig`` is alive; that object is dropped before the student is built,
    or the student would be sharded as a teacher too."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    t = cfg["teacher"]
    ds_config = teacher_ds_config(cfg, world_size)
    hf_ds = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    model = models.build_causal_lm(t["model"], t["config"], t["dtype"], t["gguf_file"])
    model.requires_grad_(False)
    model.eval()
    engine, *_ = deepspeed.initialize(model=models.TeacherHidden(model), config=ds_config)
    engine.eval()
    del hf_ds
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return engine, model


def teacher_memory(teacher, world_size: int) -> dict:
    """Parameter bytes this rank holds for the teacher (its ZeRO-3 partitions, or everything at stage 0)."""
    held = full = 0
    for p in teacher.parameters():
        if hasattr(p, "ds_tensor"):
            held += p.ds_tensor.numel() * p.ds_tensor.element_size()
            full += p.ds_numel * p.ds_tensor.element_size()
        else:
            held += p.numel() * p.element_size()
            full += p.numel() * p.element_size()
    return {"param_bytes_held": held, "param_bytes_full": full, "world_size": world_size}


def build_student(cfg: dict, teacher_model, loss_fn_factory):
    import deepspeed

    s = cfg["student"]
    if s["init_from_teacher"] is not None:
        model = models.student_from_teacher(teacher_model, s["init_from_teacher"]["layers"], s["dtype"])
    else:
        model = models.build_causal_lm(s["model"], s["config"], s["dtype"])
    model.config.use_cache = False
    if s["freeze_embeddings"]:
        model.get_input_embeddings().weight.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(False)
    wrapper = models.StudentWithLoss(model, loss_fn_factory(model.config.hidden_size))
    wrapper.train()
    optimizer = s["deepspeed"]["optimizer"]
    with errors.translate(
        "student.deepspeed.optimizer",
        (TypeError, ValueError),
        f"expected the keyword arguments of DeepSpeed's {optimizer['type']!r} optimizer (e.g. lr, betas, eps, "
        "weight_decay) under 'params'",
        match="argument",
    ):
        engine, *_ = deepspeed.initialize(
            model=wrapper,
            model_parameters=[p for p in wrapper.parameters() if p.requires_grad],
            config=student_ds_config(cfg),
        )
    if s["deepspeed"]["stage"] == 0 and engine.dp_world_size == 1:
        # one data-parallel rank: DeepSpeed would still flatten every gradient into one bucket, all-reduce it over
        # that one rank and copy it back, a second copy of the gradients per step for nothing
        engine.enable_backward_allreduce = False
    if s["deepspeed"]["stage"] == 3:
        # the loss reads the lm_head weight directly (not through lm_head.forward): ZeRO-3 must gather it for the
        # wrapper's forward and backward
        deepspeed.zero.register_external_parameter(engine.module, engine.module.lm_head_weight())
    return engine


# ---------------------------------------------------------------------------------------------------------------
# state: RNG, checkpoints, metrics
# ---------------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, cfg: dict, step: int, rank: int, keep: int, stage=None) -> str:
    """DeepSpeed's checkpoint of the student (weights, optimizer, scheduler) + data position + per-rank RNG + config.
    DeepSpeed writes ``latest`` last, so a run killed while saving resumes from the previous complete checkpoint."""
    import torch.distributed as dist

    root = os.path.join(cfg["run"]["output_dir"], CHECKPOINTS)
    tag = f"step{step:07d}"
    folder = os.path.join(root, tag)
    os.makedirs(folder, exist_ok=True)
    torch.save(rng_state(), os.path.join(folder, f"rng_rank{rank}.pt"))
    if stage is not None:  # a generation stage's own state (the on-policy replay buffer), before `latest`
        stage.save(folder, rank)
    if rank == 0:
        dump_config(cfg, os.path.join(folder, "config.yaml"))
        resume_lib.write_state(folder, step, dist.get_world_size())
    state = {
        "step": step,
        "micro_step": step * cfg["student"]["deepspeed"]["gradient_accumulation_steps"],
        "world_size": dist.get_world_size(),
        "config": cfg,
    }
    engine.save_checkpoint(root, tag=tag, client_state={"fastdistill": state})
    dist.barrier()
    if rank == 0 and keep > 0:
        # oldest first by write time, not by name: a run restarted with run.resume=never writes lower step numbers
        tags = sorted(
            (d for d in os.listdir(root) if d.startswith("step") and os.path.isdir(os.path.join(root, d))),
            key=lambda d: (d == tag, os.path.getmtime(os.path.join(root, d))),
        )
        for old in tags[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return folder


def load_checkpoint(engine, where: str, rank: int, world_size: int, stage=None) -> int:
    if os.path.isfile(os.path.join(where, "latest")):
        root, tag = where, None
    else:  # a step folder
        root, tag = os.path.dirname(where.rstrip("/")), os.path.basename(where.rstrip("/"))
    fresh = "start a new run with run.resume=never or another run.output_dir"
    with errors.translate("run.resume", (AssertionError, RuntimeError, KeyError, ValueError), fresh):
        # a safety net: resume.check has compared the configs already
        path, client = engine.load_checkpoint(root, tag=tag)
    if path is None:
        raise ConfigError(f"run.resume: DeepSpeed found no checkpoint to load in {where!r}; {fresh}")
    state = client["fastdistill"]
    rng_file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), f"rng_rank{rank}.pt")
    if state["world_size"] == world_size and os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    elif rank == 0:
        print(
            f"fastdistill: resuming on {world_size} ranks from a {state['world_size']}-rank checkpoint; "
            "RNG state not restored",
            flush=True,
        )
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if stage is not None and not stage.load(folder, rank) and rank == 0:
        print("fastdistill: no on-policy state for this world size in the checkpoint; replay buffer empty", flush=True)
    return int(state["step"])


class Metrics:
    """Rank 0: one CSV row per logged step (all keys ever seen) and TensorBoard scalars."""

    def __init__(self, folder: str, tensorboard: bool, resume_step: int | None):
        self.path = os.path.join(folder, "metrics.csv")
        self.rows: list[dict] = []
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path) as f:  # drop what the killed run logged after its last checkpoint
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        elif os.path.isfile(self.path):
            os.remove(self.path)
        self._write()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(folder, "tensorboard"))
            except ImportError:
                print("fastdistill: tensorboard is not installed; metrics go to the CSV only", flush=True)

    def _write(self) -> None:
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys or ["step"])
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def log(self, step: int, values: dict) -> None:
        self.rows.append({"step": step, **values})
        self._write()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(batches, teacher, student, teacher_weight) -> tuple[float, float | None]:
    """Held-out perplexity of the student (and of the teacher when ``teacher`` is given); every rank runs the same
    number of forwards (ZeRO-3 collectives), token sums are all-reduced."""
    import torch.distributed as dist

    student.eval()
    s_sum = torch.zeros(2, dtype=torch.float64)
    t_sum = torch.zeros(2, dtype=torch.float64)
    for input_ids, labels in batches:
        s_sum += student(input_ids, labels).cpu()
        if teacher is not None:
            hidden, _ = teacher(input_ids)
            with models.gathered([teacher_weight]):
                t_sum += DistillLoss.nll(hidden, teacher_weight, labels).cpu()
    student.train()
    both = torch.cat([s_sum, t_sum])
    dist.all_reduce(both)
    s_ppl = math.exp(both[0] / max(both[1].item(), 1))
    t_ppl = math.exp(both[2] / max(both[3].item(), 1)) if teacher is not None else None
    return s_ppl, t_ppl


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------
def prepare_data(cfg: dict, rank: int):
    """(tokenizer, train sequences, held-out sequences); rank 0 converts a GGUF teacher once into the cache while the
    others wait."""
    if cfg["teacher"]["cache"] is not None:
        cache_source.resolve_teacher_spec(cfg)  # teacher named by the cache's manifest, when the run names none
    tokenizer = prepare_models(cfg, rank)
    train_seqs, held_seqs = data_lib.train_heldout(cfg, tokenizer)
    return tokenizer, train_seqs, held_seqs


def run(cfg: dict) -> dict:
    """Distil ``cfg`` (a resolved config); returns the summary rank 0 also writes to ``summary.json``."""
    import torch.distributed as dist

    t_start = time.time()
    plan = ckpt = None  # with `pools`: this rank's pool, its own world, and the bridge to the teacher pool
    if cfg.get("pools"):
        from fastdistill.train import pools

        if cfg["run"]["threads"]:
            torch.set_num_threads(cfg["run"]["threads"])
        plan = pools.PoolPlan(cfg)
        if plan.is_teacher:
            return pools.serve_teacher(cfg, plan)
        cfg = plan.cfg  # this student pool's resolved config (its student, losses, output folder)
        rank, world = plan.rank, plan.size
    else:
        # paths, the output folder and the checkpoint to resume, on every rank before anything is loaded or written
        ckpt = errors.preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        if cfg["run"]["threads"]:
            torch.set_num_threads(cfg["run"]["threads"])
        rank, world = init_distributed()
    out_dir = cfg["run"]["output_dir"]
    os.makedirs(out_dir, exist_ok=True)
    say = (lambda *a: print("fastdistill:", *a, flush=True)) if rank == 0 else (lambda *a: None)
    sched, sds = cfg["schedule"], cfg["student"]["deepspeed"]
    if rank == 0:
        dump_config(cfg, os.path.join(out_dir, "config.yaml"))

    # -- models, tokenizer and data -------------------------------------------------------------------------------
    seed = cfg["run"]["seed"]
    tokenizer, train_seqs, held_seqs = prepare_data(cfg, rank)
    t = cfg["teacher"]
    sampler = data_lib.Sampler(train_seqs, sds["micro_batch_size"], rank, world, seed)
    held = data_lib.Sampler(held_seqs, sds["micro_batch_size"], rank, world, seed, shuffle=False)
    n_eval = (
        held.batches_per_epoch if sched["eval_batches"] is None else min(sched["eval_batches"], held.batches_per_epoch)
    )
    eval_batches = [held.batch(k) for k in range(n_eval)]
    say(
        f"data: {len(train_seqs)} train / {len(held_seqs)} held-out sequences of {cfg['data']['seq_len']} tokens; "
        f"world size {world}"
    )

    # -- teacher (sharded, frozen) then student (its own engine) ---------------------------------------------------
    torch.manual_seed(seed)
    cached = plan is None and t["cache"] is not None
    if cached:  # a teacher cache: no teacher engine; the teacher's weights only to initialise a student from them
        teacher = teacher_weight = all_mem = teacher_vocab = None
        teacher_model = cache_source.teacher_for_init(cfg)
        teacher_hidden_size = teacher_model.config.hidden_size if teacher_model is not None else None
        say(f"teacher: top-k targets from the cache {t['cache']} (no teacher forward)")
    elif plan is None:
        teacher, teacher_model = build_teacher(cfg, world)
        teacher_weight = teacher_model.get_output_embeddings().weight
        mem = teacher_memory(teacher_model, world)
        all_mem = [None] * world
        dist.all_gather_object(all_mem, mem)
        if rank == 0:
            with open(os.path.join(out_dir, "teacher_memory.json"), "w") as f:
                json.dump({"per_rank": all_mem, "stage": cfg["teacher"]["deepspeed"]["stage"]}, f, indent=1)
        say(
            f"teacher: {mem['param_bytes_full'] / 2**20:.1f} MiB of parameters, {mem['param_bytes_held'] / 2**20:.1f} "
            f"MiB held on rank 0 (ZeRO stage {cfg['teacher']['deepspeed']['stage']})"
        )
        teacher_hidden_size, teacher_vocab = teacher_model.config.hidden_size, teacher_model.config.vocab_size
    else:  # the teacher lives in its pool: sizes (and the lm_head for a `hidden` payload) come over the bridge
        meta = plan.handshake()
        teacher, teacher_weight, all_mem = None, meta["lm_head"], None
        teacher_hidden_size, teacher_vocab = meta["hidden_size"], meta["vocab_size"]
        teacher_model = plan.local_teacher() if cfg["student"]["init_from_teacher"] is not None else None
    byte_vocab = isinstance(tokenizer, data_lib.ByteTokenizer)
    if teacher_vocab is not None and byte_vocab and teacher_vocab < tokenizer.vocab_size:
        raise ConfigError(f"data.tokenizer: 'bytes' needs a teacher vocabulary >= 256, the teacher has {teacher_vocab}")

    def make_loss(student_hidden_size: int) -> DistillLoss:
        tail = cfg["cache"]["tail"] if cached else None  # else the logit_kd loss's own topk_tail
        return DistillLoss(cfg["losses"], cfg["run"]["loss_impl"], student_hidden_size, teacher_hidden_size, tail)

    torch.manual_seed(seed + 1)
    student = build_student(cfg, teacher_model, make_loss)
    if cached:
        del teacher_model  # the student holds its copy; nothing of the teacher stays in memory
        head = student.module.lm_head_weight()
        vocab = getattr(head, "ds_shape", head.shape)[0]  # a ZeRO-3 partitioned weight's own shape is [0]
        cache_source.check_run_per_node(cfg, vocab)  # one hash of the teacher files per machine
    else:
        student.module.set_teacher_head(teacher_weight)
    loss_fn: DistillLoss = student.module.loss_fn
    stage = None  # on-policy: the student (or the teacher) writes the completions the teacher then scores
    if cfg.get("onpolicy"):
        from fastdistill.train.onpolicy import OnPolicy

        stage = OnPolicy(cfg, sampler, student.module.model, teacher_model, tokenizer, rank, world)
        if plan is not None:  # its on-policy steps: this rank's sequences go to the teacher pool to be scored
            plan.attach_onpolicy(stage)
    if plan is not None:  # a pool's plain teacher copy only gave the student its layers (a stage keeps its own)
        teacher_model = None
    needs_states = loss_fn.needs_hidden_states
    teacher_attention_layers = sorted(set(loss_fn.attention_layers.values()))

    # -- resume --------------------------------------------------------------------------------------------------
    start_step = 0
    where = ckpt.folder if ckpt is not None else None
    if plan is not None:
        where = plan.resume_folder(plan.committed())
    if where is not None:
        start_step = load_checkpoint(student, where, rank, world, stage)
        say(f"resumed from {where} at step {start_step}")
    metrics = Metrics(out_dir, cfg["logging"]["tensorboard"], start_step if where else None) if rank == 0 else None

    summary: dict = {"world_size": world, "start_step": start_step}
    if plan is not None:
        summary["pool"] = plan.pool
        plan.start(start_step * sds["gradient_accumulation_steps"])

    # -- evaluation before training --------------------------------------------------------------------------------
    t0 = time.time()
    s_ppl, t_ppl = perplexity(eval_batches, teacher, student, teacher_weight)
    if cached:  # measured by teacher-cache build on the same held-out split
        t_ppl = cache_source.teacher_heldout_ppl(t["cache"])
    summary.update(student_ppl_before=s_ppl, teacher_ppl=t_ppl)
    say(
        f"held-out perplexity at step {start_step}: student {s_ppl:.2f}, teacher {_fmt(t_ppl)} "
        f"({time.time() - t0:.1f} s)"
    )
    if metrics:
        metrics.log(start_step, {"eval/student_ppl": s_ppl, **({"eval/teacher_ppl": t_ppl} if t_ppl else {})})
    if os.environ.get("FASTDISTILL_DEBUG_DUMP") and teacher is not None:
        # test hook: the teacher's logits on the first held-out batch (small models only)
        with torch.no_grad():
            hidden, _ = teacher(eval_batches[0][0])
            with models.gathered([teacher_weight]):
                logits = hidden @ teacher_weight.t()
        if rank == 0:
            torch.save(
                {"input_ids": eval_batches[0][0], "logits": logits}, os.path.join(out_dir, "debug_teacher_logits.pt")
            )

    # -- train -----------------------------------------------------------------------------------------------------
    from tqdm import tqdm

    ga = sds["gradient_accumulation_steps"]
    kill_at = int(os.environ.get("FASTDISTILL_FAULT_KILL_AT_STEP", "0"))  # test hook: SIGKILL mid-run
    if plan is not None:
        kill_at = pools.fault_hook(plan.pool, rank) or -1  # FASTDISTILL_FAULT_KILL=pool:rank:step
    bar = tqdm(
        total=sched["max_steps"],
        initial=start_step,
        disable=rank != 0 or not cfg["logging"]["progress_bar"],
        dynamic_ncols=True,
        desc="distill",
        mininterval=0,  # one frame per optimizer step (each step's own loss), however fast the steps are
        miniters=1,
    )
    tokens_per_step = sds["micro_batch_size"] * cfg["data"]["seq_len"] * world * ga
    # the teacher source: the colocated engine (forward per micro batch) or the cache (read ahead by a thread)
    if cached:
        source = cache_source.CachedTeacher(cfg, sampler, start_step * ga, sched["max_steps"] * ga, rank)
    elif plan is not None:  # the teacher pool's records (waits only when the teacher is behind)
        source = plan
    else:
        source = OnlineTeacher(teacher, stage or sampler, needs_states, teacher_attention_layers)
    step = start_step
    step_seconds: list[float] = []
    wait_total = 0.0
    t_train = time.time()
    while step < sched["max_steps"]:
        t_step, cpu_step = time.time(), time.process_time()
        t_teacher = t_student = cpu_teacher = 0.0
        sums: dict[str, float] = {}
        for a in range(ga):
            t0, c0 = time.perf_counter(), time.process_time()
            input_ids, labels, t_hidden, t_states = source.batch(step * ga + a)
            t1 = time.perf_counter()
            cpu_teacher += time.process_time() - c0
            loss, parts = student(input_ids, labels, t_hidden, t_states)
            del t_hidden, t_states  # the teacher's activations are not needed for backward
            student.backward(loss)
            student.step()
            t2 = time.perf_counter()
            t_teacher, t_student = t_teacher + t1 - t0, t_student + t2 - t1
            for k, v in {"loss": loss.detach().float(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / ga
            if stage is not None:
                stage.record(parts)
            del loss, parts
        step += 1
        # mean over ranks, so the logged trajectory is the same on every rank and comparable across launches
        vals = torch.tensor([sums[k] for k in sorted(sums)], dtype=torch.float64)
        dist.all_reduce(vals)
        vals /= world
        row = {f"train/{k}": float(v) for k, v in zip(sorted(sums), vals)}
        elapsed = time.time() - t_step
        step_seconds.append(elapsed)
        row.update(
            {
                "train/lr": float(student.get_lr()[0]),
                "perf/tokens_per_s": tokens_per_step / elapsed,
                "perf/teacher_s": t_teacher,
                "perf/student_s": t_student,
                "perf/cpu_s": time.process_time() - cpu_step,  # this rank's CPU seconds (all threads): load-proof
                "perf/teacher_cpu_s": cpu_teacher,
            }
        )
        if stage is not None:  # generation ran inside the teacher source's batch(): not the teacher's time
            row.update(stage.take_stats(elapsed))
            row["perf/teacher_s"] -= row["onpolicy/generate_s"]
        if plan is not None:
            st = plan.take_stats()  # t_teacher is the wait for the teacher pool's records
            row.update(
                {
                    "pools/wait_s": st["wait_s"],
                    "pools/wait_fraction": st["wait_s"] / max(elapsed, 1e-9),
                    "pools/teacher_lead": st["lead"],
                    "pools/payload_bytes_per_token": st["bytes_per_token"],
                }
            )
            wait_total += st["wait_s"]
        if metrics and step % sched["log_every"] == 0:
            metrics.log(step, row)
        # the postfix first without a refresh, then one refresh by update: one line per step, with this step's loss
        bar.set_postfix_str(
            " ".join(f"{k[6:]}={v:.4f}" for k, v in row.items() if k.startswith("train/") and k != "train/lr")
            + f" tok/s={row['perf/tokens_per_s']:.0f} "
            + (
                f"T/S={t_teacher / max(t_teacher + t_student, 1e-9):.0%}/"
                f"{t_student / max(t_teacher + t_student, 1e-9):.0%}"
                if plan is None
                else f"wait={row['pools/wait_fraction']:.0%} lead={row['pools/teacher_lead']:.1f}"
            ),
            refresh=False,
        )
        bar.update(1)
        if sched["eval_every"] and step % sched["eval_every"] == 0 and step < sched["max_steps"]:
            s_ppl, _ = perplexity(eval_batches, None, student, teacher_weight)
            if rank == 0:
                bar.write(f"step {step}: held-out student perplexity {s_ppl:.2f}")
            if metrics:
                metrics.log(step, {"eval/student_ppl": s_ppl})
        if sched["save_every"] and step % sched["save_every"] == 0 and step < sched["max_steps"]:
            save_checkpoint(student, cfg, step, rank, cfg["run"]["keep_checkpoints"], stage)
            if plan is not None:
                plan.saved(step)
        if plan is not None and step == kill_at:
            pools.fault_kill(cfg)
        if plan is None and kill_at and step == kill_at and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if sched["max_seconds"] is not None and step < sched["max_steps"]:
            # a wall-clock budget: rank 0's clock decides, so every rank stops after the same step
            over = torch.tensor([float(time.time() - t_train >= sched["max_seconds"])])
            dist.broadcast(over, 0)
            if over.item():
                say(f"schedule.max_seconds: {sched['max_seconds']} s reached after step {step}")
                break
    bar.close()
    if source is not plan:  # a pool plan closes after the final checkpoint (its commit report)
        source.close()
    train_s = time.time() - t_train
    if cached:
        missing = torch.tensor([source.missing], dtype=torch.float64)
        dist.all_reduce(missing)
        summary["cache_missing_sequences"] = int(missing.item())
        if missing.item():
            say(f"teacher cache: {int(missing.item())} sequence(s) not in the cache were skipped (cache.missing=skip)")

    # -- final evaluation, checkpoint, export ----------------------------------------------------------------------
    s_ppl, _ = perplexity(eval_batches, None, student, teacher_weight)
    import resource

    rss = [None] * world  # peak resident memory of every rank (ru_maxrss is in KiB on Linux)
    dist.all_gather_object(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    steady = step_seconds[1:] or step_seconds  # the first step pays one-time costs
    summary.update(
        student_ppl_after=s_ppl,
        steps=step,
        train_seconds=train_s,
        peak_rss_mib_per_rank=rss,
        tokens_per_s=tokens_per_step * len(steady) / max(sum(steady), 1e-9),
        step_seconds=step_seconds,
        tokens_per_step=tokens_per_step,
        teacher_param_bytes_per_rank=all_mem,
    )
    if metrics:
        metrics.log(step, {"eval/student_ppl": s_ppl})
    if cfg["run"]["final_checkpoint"] and (
        step > start_step or not os.path.isfile(os.path.join(out_dir, CHECKPOINTS, "latest"))
    ):
        save_checkpoint(student, cfg, step, rank, cfg["run"]["keep_checkpoints"], stage)
        if plan is not None:
            plan.saved(step)
    if stage is not None:
        summary.update(stage.summary(train_s))
    if plan is not None:
        summary.update(
            wait_seconds=wait_total,
            wait_fraction=wait_total / max(train_s, 1e-9),
            payload=plan.payload,
            payload_bytes_per_token=plan.bytes_per_token_total,
            teacher_records_received=plan.records_total,
        )
    export_dir = os.path.join(out_dir, "student")
    export_student(student, tokenizer, export_dir, rank)
    summary.update(export_dir=export_dir, wall_seconds=time.time() - t_start)
    say(
        f"held-out perplexity: student {summary['student_ppl_before']:.2f} -> {s_ppl:.2f} "
        f"(teacher {_fmt(summary['teacher_ppl'])}); {step - start_step} steps in {train_s:.1f} s; "
        f"student saved to {export_dir}"
    )
    if rank == 0:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        metrics.close()
    dist.barrier()
    if plan is not None:
        plan.close()
    return summary


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


class OnlineTeacher:
    """The colocated teacher engine as a teacher source: its forward on each micro batch, under no_grad.
    ``batch(micro_step) -> (input_ids, labels, teacher final hidden states, teacher states or None)``; the other
    source, ``fastdistill.cache.source.CachedTeacher``, gives a ``(values, indices)`` top-k pair instead."""

    def __init__(self, engine, sampler, needs_states: bool, attention_layers: list[int]):
        self.engine, self.sampler = engine, sampler
        self.needs_states, self.attention_layers = needs_states, attention_layers

    def batch(self, micro_step: int):
        input_ids, labels = self.sampler.batch(micro_step)
        with torch.no_grad():
            hidden, states = self.engine(
                input_ids, output_hidden_states=self.needs_states, attention_layers=self.attention_layers
            )
        return input_ids, labels, hidden, states

    def close(self) -> None:
        pass


def export_student(engine, tokenizer, folder: str, rank: int) -> None:
    """``save_pretrained`` (safetensors) of the student alone, plus the tokenizer: loadable by plain transformers."""
    import torch.distributed as dist

    model = engine.module.model
    with models.gathered(list(model.parameters())):
        if rank == 0:
            tmp = folder + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            # no copy of the weights: safetensors writes ZeRO 1/2's views into a flat buffer as they are (a copy held
            # a second student on its device while it was written)
            model.save_pretrained(tmp, state_dict=model.state_dict(), safe_serialization=True)
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    dist.barrier()
