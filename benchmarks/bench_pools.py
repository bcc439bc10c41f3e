"""Teacher and student pools against separate colocated runs: does one teacher pass shared by K students pay?

    python benchmarks/bench_pools.py                          # preset cpu: 8-layer H=256 teacher, 2-4 layer students
    python benchmarks/bench_pools.py --preset demo --ks 1 2 3 # configs/pools_demo.yaml (SmolLM2 teacher, 4/6/8 layers)
    python benchmarks/bench_pools.py --preset smoke --ks 1 2  # the tiny test models (startup-dominated)

For each K: the K students of the preset are each trained colocated (one process, teacher in it: the trainer today),
giving per step the teacher time T and the student time S_i and tokens/s; then one ``deepspeed`` launch with a
teacher pool of ``--teacher-ranks`` ranks and K student pools of one rank each, per payload (``hidden``, ``topk``).

Reported per row: tokens/s of each student pool and their total; the colocated total of the K separate runs; both
per process (the pools launch uses K + teacher ranks processes, the K colocated runs K), their ratio ("speedup per
process") against the ideal sum_i(T + S_i) / (T + sum_i S_i) (= K(T+S)/(T+KS) for equal students: the compute one
teacher pass saves); the student wait fraction and payload bytes per token. All figures are steady-state (first step
left out) wall-clock, so on a shared machine they carry its load: the load average is in the row. Rows are appended to
benchmarks/results/bench_pools.csv.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llama(hidden: int, layers: int, inter: int, heads: int = 4, kv: int = 2) -> dict:
    return dict(
        model_type="llama",
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def preset(name: str, steps: int | None) -> dict:
    """The run config (pools section with 3 students) of a preset."""
    if name == "demo":
        with open(os.path.join(REPO, "configs", "pools_demo.yaml")) as f:
            cfg = yaml.safe_load(f)
        cfg["schedule"]["max_steps"] = steps or 20
    else:
        with open(os.path.join(REPO, "configs", "pools_tiny.yaml")) as f:
            cfg = yaml.safe_load(f)
        if name == "cpu":
            cfg["teacher"]["config"] = llama(256, 8, 768)
            cfg["data"].update(seq_len=128, max_train_sequences=256)
            shapes = [(128, 2), (128, 3), (160, 4)]
        else:
            shapes = [(32, 2), (48, 1), (32, 3)]
        cfg["pools"]["students"] = [
            {"name": f"s{i}", "ranks": 1, "payload": "hidden", "student": {"config": llama(h, n, 2 * h)}}
            for i, (h, n) in enumerate(shapes)
        ]
        cfg["schedule"]["max_steps"] = steps or 20
    cfg["schedule"].update(save_every=0, eval_batches=1)
    cfg["data"]["max_heldout_sequences"] = 4
    cfg["logging"].update(progress_bar=False, tensorboard=False)
    cfg["run"]["resume"] = "never"
    return cfg


def env() -> dict:
    e = dict(os.environ)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET"):
        e.pop(k, None)
    e.update(
        DS_ACCELERATOR=e.get("DS_ACCELERATOR", "cpu"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DS_BUILD_OPS="0",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=REPO + os.pathsep + e.get("PYTHONPATH", ""),
    )
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def colocated(cfg: dict, student: dict, folder: str) -> dict:
    """One colocated single-process run of ``student``: tokens/s and the median teacher / student seconds per step."""
    c = copy.deepcopy(cfg)
    c.pop("pools")
    base = c["student"]
    for k in ("model", "config", "init_from_teacher"):
        if (student.get("student") or {}).get(k) is not None:
            base.update(model=None, config=None, init_from_teacher=None)
    c["student"] = {**base, **(student.get("student") or {})}
    if student.get("losses"):
        c["losses"] = student["losses"]
    c["run"]["output_dir"] = folder
    path = os.path.join(folder, "run.yaml")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(c, f)
    run([sys.executable, "-m", "fastdistill.train", "--config", path])
    summary = json.load(open(os.path.join(folder, "summary.json")))
    with open(os.path.join(folder, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/teacher_s")][1:]  # the first step pays one-time costs
    return {
        "tokens_per_s": summary["tokens_per_s"],
        "T": statistics.median(float(r["perf/teacher_s"]) for r in rows),
        "S": statistics.median(float(r["perf/student_s"]) for r in rows),
    }


def pools_launch(cfg: dict, students: list[dict], payload: str, teacher_ranks: int, folder: str) -> dict:
    c = copy.deepcopy(cfg)
    c["pools"]["teacher"] = {"ranks": teacher_ranks}
    c["pools"]["students"] = []
    for s in students:
        s = copy.deepcopy(s)
        s["payload"] = payload
        if payload == "topk":
            s["losses"] = [
                {"type": "logit_kd", "weight": 1.0, "temperature": 1.0, "topk": 32, "topk_tail": "bucket"},
                {"type": "hard_ce", "weight": 0.5},
            ]
        c["pools"]["students"].append(s)
    mb = c["student"]["deepspeed"]["micro_batch_size"]
    if mb % teacher_ranks:
        raise SystemExit(f"--teacher-ranks {teacher_ranks} must divide the micro batch {mb}")
    c["run"]["output_dir"] = folder
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(c, f)
    n = teacher_ranks + len(students)
    run(
        ["deepspeed", "--num_gpus", str(n), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        + ["--module", "fastdistill.train", "--config", path]
    )
    return {s["name"]: json.load(open(os.path.join(folder, s["name"], "summary.json"))) for s in students}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=["cpu", "demo", "smoke"])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--payloads", nargs="+", default=["hidden", "topk"], choices=["hidden", "topk"])
    p.add_argument("--teacher-ranks", type=int, default=1)
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args()
    cfg = preset(args.preset, args.steps)
    students = cfg["pools"]["students"]
    tmp = tempfile.mkdtemp(prefix="bench_pools_")
    coloc: dict[str, dict] = {}
    rows = []
    for k in args.ks:
        chosen = students[:k]
        for s in chosen:
            if s["name"] not in coloc:
                coloc[s["name"]] = colocated(cfg, s, os.path.join(tmp, f"coloc_{s['name']}"))
                print(f"colocated {s['name']}: {coloc[s['name']]}", flush=True)
        T = statistics.mean(coloc[s["name"]]["T"] for s in chosen)
        S = [coloc[s["name"]]["S"] for s in chosen]
        ideal = sum(T + si for si in S) / (T + sum(S))
        coloc_total = sum(coloc[s["name"]]["tokens_per_s"] for s in chosen)
        for payload in args.payloads:
            got = pools_launch(cfg, chosen, payload, args.teacher_ranks, os.path.join(tmp, f"pools_k{k}_{payload}"))
            total = sum(g["tokens_per_s"] for g in got.values())
            per_proc = (total / (k + args.teacher_ranks)) / (coloc_total / k)
            row = {
                "preset": args.preset,
                "K": k,
                "payload": payload,
                "teacher_ranks": args.teacher_ranks,
                "tokens_per_s_per_pool": " ".join(f"{n}={g['tokens_per_s']:.0f}" for n, g in got.items()),
                "tokens_per_s_total": round(total, 1),
                "colocated_tokens_per_s_total": round(coloc_total, 1),
                "T_s": round(T, 4),
                "S_s": " ".join(f"{x:.4f}" for x in S),
                "speedup_per_process": round(per_proc, 3),
                "ideal": round(ideal, 3),
                "fraction_of_ideal": round(per_proc / ideal, 3),
                "wait_fraction": " ".join(f"{g['wait_fraction']:.3f}" for g in got.values()),
                "payload_bytes_per_token": round(
                    statistics.mean(g["payload_bytes_per_token"] for g in got.values()), 1
                ),
                "load_average": round(os.getloadavg()[0], 1),
                "steps": cfg["schedule"]["max_steps"],
                "seq_len": cfg["data"]["seq_len"],
                "micro_batch": cfg["student"]["deepspeed"]["micro_batch_size"],
                "device": "cpu, 1 thread per process",
                "git": C.git_sha(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    path = os.path.join(C.results_dir(), "bench_pools.csv")
    new = not os.path.isfile(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
