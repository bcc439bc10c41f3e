"""Off-policy vs on-policy distillation after the same wall-clock budget, evaluated on held-out prompts.

Two ``fastdistill train`` runs of one config on prompt / completion data (``data.format: prompt_completion``), the same
teacher, student, loss (generalized JSD, beta 0.5) and optimizer, each stopped by ``schedule.max_seconds``:
  off-policy   ``onpolicy.fraction: 0``: every micro step trains on the dataset's completions (SFT-style KD)
  on-policy    ``onpolicy.fraction: 1``: every micro step trains on the student's own samples of the prompts
then, on the held-out prompts, for the initial student and both trained ones:
  ppl_teacher_greedy   perplexity of the student on the teacher's greedy continuations (completion tokens only)
  reverse_kl_own       per-token KL(student || teacher) on the student's own samples (temperature 1), exact over the
                       vocabulary at every generated position
Rows go to benchmarks/results/onpolicy_vs_offpolicy.csv as each evaluation finishes; the trained students stay in
--out.

    python benchmarks/onpolicy_vs_offpolicy.py --preset full     # the embedded demo: SmolLM2-135M-Instruct -> 6 layers
    python benchmarks/onpolicy_vs_offpolicy.py --preset smoke    # tiny random models, seconds (tested in CI)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TEACHER = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
PRESETS = {
    # configs/demo_smollm2.yaml's teacher and student on the builtin pydoc_qa examples (chat template applied)
    "full": dict(
        teacher="smollm2-135m-instruct",
        layers=[0, 6, 12, 18, 24, 29],
        tokenizer="teacher",
        source="pydoc_qa",
        seq_len=192,
        batch=4,
        lr=5e-4,
        new=48,
        budget_s=300.0,
        heldout=24,
        max_train=None,
    ),
    # tiny random Llama, byte tokenizer, a small JSONL cut from pydoc_qa (short prompts and completions)
    "smoke": dict(
        teacher=None,
        layers=[0, 3],
        tokenizer="bytes",
        source=None,
        seq_len=96,
        batch=2,
        lr=1e-3,
        new=8,
        budget_s=3.0,
        heldout=4,
        max_train=48,
    ),
}
FIELDS = [
    "bench",
    "preset",
    "student",
    "budget_s",
    "steps",
    "train_seconds",
    "ppl_teacher_greedy",
    "reverse_kl_own",
    "eval_prompts",
    "new_tokens",
    "loadavg_1m",
    "device",
    "threads",
    "torch_version",
    "git_sha",
    "date",
]


def env() -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DS_BUILD_OPS="0")
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    if not torch.cuda.is_available():
        e["DS_ACCELERATOR"] = "cpu"
    return e


def smoke_data(folder: str, n: int = 64) -> str:
    """A small prompt / completion JSONL derived from the builtin pydoc_qa examples: the last 32 characters of each
    prompt passage and the first 32 of its continuation (offline, deterministic)."""
    from fastdistill.train.data import pydoc_qa

    path = os.path.join(folder, "smoke_qa.jsonl")
    with open(path, "w") as f:
        for r in pydoc_qa()[:: max(1, 1000 // n)][:n]:
            head = r["messages"][0]["content"].split("\n", 1)[1]
            f.write(json.dumps({"prompt": head[-32:], "completion": r["messages"][1]["content"][:32]}) + "\n")
    return path


def run_config(p: dict, teacher: str, source: str, out: str, fraction: float, threads: int | None) -> dict:
    return {
        "run": {"output_dir": out, "seed": 0, "resume": "never", "final_checkpoint": False, "threads": threads},
        "teacher": {"model": teacher, "deepspeed": {"stage": 0}},
        "student": {
            "init_from_teacher": {"layers": p["layers"]},
            "deepspeed": {
                "stage": 0,
                "micro_batch_size": p["batch"],
                "optimizer": {"type": "AdamW", "params": {"lr": p["lr"], "weight_decay": 0.0, "torch_adam": True}},
                "scheduler": None,  # a constant learning rate: a budget, not a step count, ends the run
            },
        },
        "data": {
            "format": "prompt_completion",
            "source": source,
            "tokenizer": p["tokenizer"],
            "seq_len": p["seq_len"],
            "max_heldout_sequences": p["heldout"],
            "max_train_sequences": p["max_train"],
        },
        "losses": [{"type": "logit_kd", "weight": 1.0, "divergence": "jsd", "beta": 0.5, "temperature": 1.0}],
        "onpolicy": {"fraction": fraction, "max_new_tokens": p["new"], "temperature": 0.9},
        "schedule": {"max_steps": 100_000, "max_seconds": p["budget_s"], "eval_batches": 1},
        "logging": {"tensorboard": False, "progress_bar": False},
    }


def train(cfg: dict, folder: str) -> dict:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    cmd = [sys.executable, "-m", "fastdistill.train", "--config", path]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(cfg["run"]["output_dir"], "summary.json")) as f:
        return json.load(f)


@torch.no_grad()
def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


@torch.no_grad()
def evaluate(student, teacher, prompts, teacher_greedy, codec, eos, new: int, batch: int = 4) -> dict:
    """Student perplexity on the teacher's greedy continuations; per-token KL(student || teacher) on its own samples."""
    from fastdistill.generate import SamplingConfig, sample
    from fastdistill.train.data import IGNORE_INDEX
    from fastdistill.train.onpolicy import completion_batch

    pad = eos[0] if eos else 0
    own = sample(student, codec, prompts, list(range(len(prompts))), SamplingConfig(temperature=1.0,
                 max_new_tokens=new, seed=1), eos)  # fmt: skip
    own = [g[0].token_ids for g in own]
    nll = n = kl = n_kl = 0.0
    for i in range(0, len(prompts), batch):
        ps = prompts[i : i + batch]
        ids, labels = completion_batch(ps, teacher_greedy[i : i + batch], [True] * len(ps), pad)
        s = logits_of(student, ids)
        mask = labels != IGNORE_INDEX
        nll += torch.nn.functional.cross_entropy(s[mask], labels[mask], reduction="sum").item()
        n += int(mask.sum())
        ids, labels = completion_batch(ps, own[i : i + batch], [True] * len(ps), pad)
        mask = labels != IGNORE_INDEX
        ls = torch.log_softmax(logits_of(student, ids)[mask], -1)
        lt = torch.log_softmax(logits_of(teacher, ids)[mask], -1)
        kl += (ls.exp() * (ls - lt)).sum().item()
        n_kl += int(mask.sum())
    return {"ppl_teacher_greedy": math.exp(nll / max(n, 1)), "reverse_kl_own": kl / max(n_kl, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--budget", type=float, default=None, help="training wall-clock seconds per run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="folder for the runs (default runs/onpolicy_vs_offpolicy_PRESET)")
    a = ap.parse_args(argv)
    p = dict(PRESETS[a.preset])
    if a.budget:
        p["budget_s"] = a.budget
    out = os.path.abspath(a.out or os.path.join(REPO, "runs", f"onpolicy_vs_offpolicy_{a.preset}"))
    os.makedirs(out, exist_ok=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastdistill.generate import Codec, SamplingConfig, sample
    from fastdistill.generate.core import _eos_ids
    from fastdistill.train import data as data_lib
    from fastdistill.train import models
    from fastdistill.train.config import validate

    if p["teacher"] is None:  # a random tiny teacher written once, so the runs and the evaluation share it
        tdir = os.path.join(out, "teacher")
        if not os.path.isfile(os.path.join(tdir, "config.json")):
            cfg = dict(TINY_TEACHER)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).save_pretrained(tdir)
        teacher_name = tdir
    else:
        teacher_name = p["teacher"]
        models.resolve_model_path(teacher_name, None)  # the builtin converted once into the cache
    source = p["source"] or smoke_data(out)
    device = C.device_name(torch.device("cpu"))
    sha, stamp = C.git_sha(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    csv_path = os.path.join(C.results_dir(), "onpolicy_vs_offpolicy.csv")
    print(f"# off- vs on-policy, preset {a.preset}: budget {p['budget_s']} s per run, {device}, load {os.getloadavg()}")

    # the held-out prompts of the run's own split, the teacher, its greedy continuations (once)
    cfg0 = validate(run_config(p, teacher_name, source, os.path.join(out, "off"), 0.0, a.threads))
    tok = models.load_tokenizer(cfg0["data"]["tokenizer"], teacher_name, None)
    _, held = data_lib.train_heldout(cfg0, tok)
    first = ((held.labels != data_lib.IGNORE_INDEX).int().argmax(-1) + 1).tolist()
    prompts = [held.input_ids[i, :n].tolist() for i, n in enumerate(first)]
    teacher = models.build_causal_lm(teacher_name, None, "float32").eval()
    codec = Codec(tok)
    eos = _eos_ids(teacher, codec)
    t0 = time.time()
    greedy = sample(teacher, codec, prompts, list(range(len(prompts))), SamplingConfig(temperature=0.0,
                    max_new_tokens=p["new"]), eos)  # fmt: skip
    greedy = [g[0].token_ids for g in greedy]
    print(f"teacher greedy continuations of {len(prompts)} held-out prompts: {time.time() - t0:.0f} s")

    def row(name: str, metrics: dict, steps, train_s) -> dict:
        r = {
            "bench": "onpolicy_vs_offpolicy",
            "preset": a.preset,
            "student": name,
            "budget_s": p["budget_s"],
            "steps": steps,
            "train_seconds": train_s,
            "ppl_teacher_greedy": round(metrics["ppl_teacher_greedy"], 4),
            "reverse_kl_own": round(metrics["reverse_kl_own"], 5),
            "eval_prompts": len(prompts),
            "new_tokens": p["new"],
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "device": device,
            "threads": a.threads or torch.get_num_threads(),
            "torch_version": torch.__version__,
            "git_sha": sha,
            "date": stamp,
        }
        new = not os.path.exists(csv_path)
        with open(csv_path, "a", newline="") as f:  # each row as soon as it is measured: a killed run keeps them
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerow(r)
        print(f"{name:<12} steps {steps!s:>6}  ppl on teacher greedy {r['ppl_teacher_greedy']:>10.3f}  "
              f"KL(student||teacher) on own samples {r['reverse_kl_own']:.4f}", flush=True)  # fmt: skip
        return r

    rows = []
    torch.manual_seed(1)
    init = models.student_from_teacher(teacher, p["layers"], "float32").eval()
    rows.append(row("init", evaluate(init, teacher, prompts, greedy, codec, eos, p["new"]), 0, 0.0))
    del init
    for name, fraction in (("off-policy", 0.0), ("on-policy", 1.0)):
        run_dir = os.path.join(out, name)
        summary = train(run_config(p, teacher_name, source, run_dir, fraction, a.threads), run_dir)
        student = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "student")).float().eval()
        metrics = evaluate(student, teacher, prompts, greedy, codec, eos, p["new"])
        rows.append(row(name, metrics, summary["steps"], round(summary["train_seconds"], 1)))
        del student
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("csv:", csv_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
