"""Online distillation throughput and memory: the fastdistill trainer (fused lm-head loss) against the same loop with
unfused torch losses (materialized logits) and against TRL's GKDTrainer, same teacher, student and data, one run.

    python benchmarks/bench_trainer.py                  # CPU preset: vocab 49152 (SmolLM2 tokenizer), H=256, T=128, B=4
    python benchmarks/bench_trainer.py --preset smoke   # tiny, seconds per provider
    python benchmarks/bench_trainer.py --providers fastdistill,trl-gkd

Providers (each in its own process, so peak memory is its own):
  fastdistill          fastdistill train, single process, teacher and student ZeRO stage 0 (the equal-settings row)
  fastdistill-unfused  the same loop with run.loss_impl=unfused: [tokens x vocab] logits + torch divergence and CE
  trl-gkd              trl.experimental.gkd.GKDTrainer (lmbda=0: no on-policy generation, beta=0 forward KL), where
                       trl is installed
  fastdistill-zero3x2  deepspeed --num_gpus 2: teacher ZeRO-3 over 2 ranks, student ZeRO-2 (teacher bytes per rank)

Reported: tokens/s (steady state: the first step is left out), median / min / max step time, peak resident memory per
rank (ru_maxrss; CPU) and the teacher's parameter bytes per rank against full size / world size. Rows are appended to
benchmarks/results/bench_trainer.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    # teacher: a Llama with SmolLM2's vocabulary; student: teacher layers [0, last]
    "cpu": dict(
        vocab=49152,
        hidden=256,
        inter=768,
        layers=6,
        heads=4,
        kv=2,
        seq_len=128,
        batch=4,
        steps=6,
        tokenizer="smollm2-135m-instruct",
    ),
    "smoke": dict(
        vocab=256, hidden=64, inter=128, layers=2, heads=4, kv=2, seq_len=32, batch=2, steps=3, tokenizer="bytes"
    ),
}
PROVIDERS = ("fastdistill", "fastdistill-unfused", "trl-gkd", "fastdistill-zero3x2")


def env() -> dict:
    e = dict(os.environ)
    e.update(
        DS_ACCELERATOR="cpu" if not torch.cuda.is_available() else e.get("DS_ACCELERATOR", ""),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DS_BUILD_OPS="0",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=REPO + os.pathsep + e.get("PYTHONPATH", ""),
    )
    e.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
    return {k: v for k, v in e.items() if v != ""}


def build_models(p: dict, folder: str) -> tuple[str, str]:
    """Teacher (fixed random weights) and the student cut from it, both saved: every provider starts identically."""
    import transformers

    from fastdistill.train.models import student_from_teacher

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["inter"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv"],
        max_position_embeddings=max(2 * p["seq_len"], 128),
        tie_word_embeddings=True,
    )
    teacher = transformers.AutoModelForCausalLM.from_config(cfg)
    student = student_from_teacher(teacher, [0, p["layers"] - 1], "float32")
    tdir, sdir = os.path.join(folder, "teacher"), os.path.join(folder, "student")
    teacher.save_pretrained(tdir)
    student.save_pretrained(sdir)
    return tdir, sdir


def run_config(p: dict, tdir: str, sdir: str, out: str) -> dict:
    return {
        "run": {"output_dir": out, "resume": "never", "keep_checkpoints": 1, "threads": p.get("threads")},
        "teacher": {"model": tdir, "deepspeed": {"stage": 0}},
        "student": {
            "model": sdir,
            "deepspeed": {
                "stage": 0,
                "micro_batch_size": p["batch"],
                "gradient_clipping": 0.0,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0, "torch_adam": True}},
                "scheduler": None,
            },
        },
        "data": {"tokenizer": p["tokenizer"], "seq_len": p["seq_len"], "max_heldout_sequences": p["batch"]},
        "losses": [{"type": "logit_kd", "weight": 1.0, "divergence": "forward_kl"}],
        "schedule": {"max_steps": p["steps"], "eval_batches": 1},
        "logging": {"tensorboard": False, "progress_bar": False},
    }


def run_fastdistill(cfg: dict, folder: str, overrides: list[str], world: int = 1) -> dict:
    path = os.path.join(folder, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    if world == 1:
        cmd = [sys.executable, "-m", "fastdistill.train", "--config", path, *overrides]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        cmd = [
            deepspeed,
            "--num_gpus",
            str(world),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "--module",
            "fastdistill.train",
            "--config",
            path,
            *overrides,
        ]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(cfg["run"]["output_dir"], "summary.json")) as f:
        s = json.load(f)
    return {
        "step_seconds": s["step_seconds"][1:],
        "tokens_per_step": s["tokens_per_step"],
        "peak_rss_mib_per_rank": s["peak_rss_mib_per_rank"],
        "teacher": s["teacher_param_bytes_per_rank"],
    }


def trl_worker(args_json: str) -> None:
    """Runs in its own process: GKDTrainer on the same models and batches; prints one JSON line."""
    a = json.loads(args_json)
    p = a["preset"]
    if p.get("threads"):
        torch.set_num_threads(p["threads"])
    from fastdistill.train import data as data_lib
    from fastdistill.train.models import load_tokenizer

    tok = load_tokenizer(p["tokenizer"], None, None) if p["tokenizer"] != "bytes" else data_lib.ByteTokenizer()
    seqs = data_lib.pack(data_lib.load_text("pydoc_topics"), tok, p["seq_len"])
    train, _ = data_lib.split(seqs, 0.05, None, None)

    def collate(features):
        ids = torch.tensor([f["input_ids"] for f in features])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    gkd_train(a, tok, train, collate, lmbda=0.0, beta=0.0, temperature=1.0)


def gkd_train(a: dict, tok, train: torch.Tensor, collate, **gkd) -> None:
    """TRL's GKDTrainer on ``train`` (packed sequences) batched by ``collate``, ``gkd`` its GKDConfig settings (lmbda,
    beta, temperature, ...); prints one ``TRL_RESULT`` JSON line (step seconds, tokens per step, peak RSS)."""
    import transformers
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from fastdistill.train.models import load_tokenizer

    p = a["preset"]
    ds = Dataset.from_dict({"input_ids": train[: p["batch"] * (p["steps"] + 1)].tolist()})
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t0)

    args = GKDConfig(
        output_dir=a["out"],
        per_device_train_batch_size=p["batch"],
        max_steps=p["steps"],
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        seq_kd=False,
        max_length=p["seq_len"],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        optim="adamw_torch",
        remove_unused_columns=False,
        disable_tqdm=True,
        **gkd,
    )
    student = transformers.AutoModelForCausalLM.from_pretrained(a["student"])
    teacher = transformers.AutoModelForCausalLM.from_pretrained(a["teacher"])
    # TRL wants a tokenizer object even though our collator does the batching: SmolLM2's (cached) when bytes are used
    processing = tok if hasattr(tok, "save_pretrained") else load_tokenizer("smollm2-135m-instruct", None, None)
    if processing.pad_token_id is None:  # TRL pads generated completions (lmbda > 0)
        processing.pad_token = processing.eos_token
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=ds,
        data_collator=collate,
        processing_class=processing,
        callbacks=[Timer()],
    )
    trainer.train()
    print(
        "TRL_RESULT "
        + json.dumps(
            {
                "step_seconds": times[1:],
                "tokens_per_step": p["batch"] * p["seq_len"],
                "peak_rss_mib_per_rank": [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024],
            }
        )
    )


def run_trl(p: dict, tdir: str, sdir: str, folder: str, script: str = __file__) -> dict | None:
    """Runs ``script --trl-worker`` (this file's worker, or another benchmark's) in its own process."""
    try:
        from trl.experimental.gkd import GKDTrainer  # noqa: F401
    except ImportError as e:
        print(f"trl-gkd: skipped ({e}); pip install trl")
        return None
    payload = json.dumps({"preset": p, "teacher": tdir, "student": sdir, "out": os.path.join(folder, "trl")})
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), "--trl-worker", payload],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("TRL_RESULT ")]
    if proc.returncode != 0 or not line:
        print(f"trl-gkd: failed:\n{proc.stderr[-3000:]}")
        return None
    return json.loads(line[0][len("TRL_RESULT ") :])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (every provider)")
    ap.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.trl_worker:
        trl_worker(a.trl_worker)
        return 0
    p = dict(PRESETS[a.preset])
    if a.steps:
        p["steps"] = a.steps
    p["threads"] = a.threads
    providers = [x for x in a.providers.split(",") if x]
    device = torch.device("cpu")
    shape = f"B{p['batch']}xT{p['seq_len']} V{p['vocab']} H{p['hidden']} L{p['layers']}->2"
    print(f"# trainer benchmark, preset {a.preset}: {shape}, {p['steps']} steps ({C.device_name(device)})")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as folder:
        tdir, sdir = build_models(p, folder)
        for prov in providers:
            sub = os.path.join(folder, prov)
            os.makedirs(sub)
            cfg = run_config(p, tdir, sdir, os.path.join(sub, "run"))
            t0 = time.time()
            if prov == "fastdistill":
                r = run_fastdistill(cfg, sub, [])
            elif prov == "fastdistill-unfused":
                r = run_fastdistill(cfg, sub, ["run.loss_impl=unfused"])
            elif prov == "fastdistill-zero3x2":
                r = run_fastdistill(
                    cfg,
                    sub,
                    [
                        "teacher.deepspeed.stage=3",
                        "teacher.deepspeed.param_persistence_threshold=0",
                        "student.deepspeed.stage=2",
                        "run.threads=1",
                    ],
                    world=2,
                )
            elif prov == "trl-gkd":
                r = run_trl(p, tdir, sdir, sub)
            else:
                raise SystemExit(f"--providers: unknown {prov!r}; expected some of {PROVIDERS}")
            if r is not None:
                results[prov] = r
                print(f"{prov}: done in {time.time() - t0:.0f} s")
    rows = []
    for prov, r in results.items():
        st = [x * 1e3 for x in r["step_seconds"]]
        world = len(r["peak_rss_mib_per_rank"])
        tps = r["tokens_per_step"] * len(st) / (sum(st) / 1e3)
        extra = {
            "tokens_per_s": round(tps, 1),
            "world": world,
            "peak_rss_mib_per_rank": [round(x, 1) for x in r["peak_rss_mib_per_rank"]],
        }
        if "teacher" in r:
            full = r["teacher"][0]["param_bytes_full"]
            extra["teacher_param_mib_per_rank"] = [round(t["param_bytes_held"] / 2**20, 3) for t in r["teacher"]]
            extra["teacher_vs_full_over_world"] = round(
                max(t["param_bytes_held"] for t in r["teacher"]) / (full / world), 4
            )
        rows.append(
            C.Row(
                "trainer",
                prov,
                "train-step",
                shape,
                "float32",
                statistics.median(st),
                min(st),
                max(st),
                max(r["peak_rss_mib_per_rank"]),
                C.device_name(device),
                json.dumps(extra),
            )
        )
    if not rows:
        return 1
    print()
    print(
        f"{'provider':<22}{'world':>6}{'tokens/s':>10}{'median ms':>11}{'min':>9}{'max':>9}{'peak RSS MiB/rank':>19}"
        f"{'vs trl':>8}{'teacher/rank vs full/world':>28}"
    )
    base = {r.provider: json.loads(r.extra)["tokens_per_s"] for r in rows}
    for r in rows:
        e = json.loads(r.extra)
        vs = f"{e['tokens_per_s'] / base['trl-gkd']:.2f}x" if "trl-gkd" in base else "-"
        tv = f"{e['teacher_vs_full_over_world']:.4f}" if "teacher_vs_full_over_world" in e else "-"
        print(
            f"{r.provider:<22}{e['world']:>6}{e['tokens_per_s']:>10.1f}{r.median_ms:>11.1f}{r.min_ms:>9.1f}"
            f"{r.max_ms:>9.1f}{r.peak_mib:>19.1f}{vs:>8}{tv:>28}"
        )
    print("csv:", C.write_csv(rows, "bench_trainer"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
