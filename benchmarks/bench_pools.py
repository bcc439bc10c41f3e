"""Teacher and student pools against separate colocated runs: does one teacher pass shared by K students pay?

    python benchmarks/bench_pools.py                          # preset cpu: 8-layer H=256 teacher, 2-4 layer students
    python benchmarks/bench_pools.py --preset demo --ks 1 2 3 # configs/pools_demo.yaml (SmolLM2 teacher, 4/6/8 layers)
    python benchmarks/bench_pools.py --preset smoke --ks 1 2  # the tiny test models (startup-dominated)

First the preset's students are each trained colocated (one process each, the teacher in it: the trainer without
pools), all at once; from their ``metrics.csv`` (steady steps, the first left out): the teacher time T and student time
S_i per step (wall clock, as the issue defines the ideal) and the CPU seconds per step (``perf/cpu_s``). Then, for each
K and payload (``hidden``, ``topk``), one ``deepspeed`` launch: a teacher pool of ``--teacher-ranks`` ranks and the
first K students as pools of one rank each.

The figure: aggregate throughput at equal compute, ``speedup = sum_i cpu_i(colocated) / (cpu(teacher pool) + sum_i
cpu_i(pool))`` per step (CPU seconds: what K separate runs and one pools launch cost for the same K student steps),
against the ideal ``sum_i (T + S_i) / (T + sum_i S_i)`` (= K(T+S)/(T+KS) for equal students) with T and S in CPU
seconds too (``perf/teacher_cpu_s``; the wall-clock ideal is in the row as ``ideal_wall_clock``): ``fraction_of_ideal``.
CPU seconds are used, not wall clock, because a shared machine gives each process a share of the cores that depends
on everyone else's load; wall-clock tokens/s per pool and the students' wait fraction (the time a student waited for
its teacher records) are in the row too, with the load average. Rows are appended to benchmarks/results/bench_pools.csv.
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
# the launcher next to this interpreter (a venv that is not on PATH), else the one on PATH
_VENV_DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
DEEPSPEED = _VENV_DEEPSPEED if os.path.exists(_VENV_DEEPSPEED) else "deepspeed"


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


def run(cmd: list[str], timeout: float) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def steady(folder: str) -> dict:
    """Medians over the steady steps (the first left out) of a run folder's metrics.csv, and its summary."""
    with open(os.path.join(folder, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/cpu_s")][1:]
    keys = ("perf/teacher_s", "perf/student_s", "perf/cpu_s", "perf/teacher_cpu_s")
    med = {k: statistics.median(float(r[k]) for r in rows) for k in keys}
    summary = json.load(open(os.path.join(folder, "summary.json")))
    waits = [float(r["pools/wait_fraction"]) for r in rows if r.get("pools/wait_fraction")]
    return {
        "T": med["perf/teacher_s"],
        "S": med["perf/student_s"],
        "cpu": med["perf/cpu_s"],
        "T_cpu": med["perf/teacher_cpu_s"],  # the teacher forward's CPU seconds per step (colocated)
        "S_cpu": med["perf/cpu_s"] - med["perf/teacher_cpu_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "wait_fraction": statistics.mean(waits) if waits else None,
        "payload_bytes_per_token": summary.get("payload_bytes_per_token"),
    }


def colocated_config(cfg: dict, student: dict, folder: str) -> str:
    """The colocated single-process run of ``student`` (the same student, losses, seed and data); its YAML path."""
    c = copy.deepcopy(cfg)
    c.pop("pools")
    base = c["student"]
    if any((student.get("student") or {}).get(k) is not None for k in ("model", "config", "init_from_teacher")):
        base.update(model=None, config=None, init_from_teacher=None)
    c["student"] = {**base, **(student.get("student") or {})}
    if student.get("losses"):
        c["losses"] = student["losses"]
    c["run"]["output_dir"] = folder
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(c, f)
    return path


def colocated_all(cfg: dict, students: list[dict], tmp: str, timeout: float) -> dict[str, dict]:
    """Every student's colocated run, all at once (one process each); their steady figures by name."""
    procs, folders = [], {}
    for s in students:
        folders[s["name"]] = folder = os.path.join(tmp, f"coloc_{s['name']}")
        cmd = [sys.executable, "-m", "fastdistill.train", "--config", colocated_config(cfg, s, folder)]
        procs.append((cmd, subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    deadline = time.time() + timeout
    for cmd, p in procs:
        try:
            out, err = p.communicate(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for _, q in procs:
                q.kill()
            raise
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}\n{out.decode()[-3000:]}\n{err.decode()[-3000:]}")
    return {name: steady(folder) for name, folder in folders.items()}


def pools_launch(cfg: dict, students: list[dict], payload: str, teacher_ranks: int, folder: str, timeout) -> dict:
    """One launch: a teacher pool and the ``students`` as pools of one rank; per pool its steady figures, and the
    teacher pool's CPU seconds per micro step (all its ranks)."""
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
        [DEEPSPEED, "--num_gpus", str(n), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        + ["--module", "fastdistill.train", "--config", path],
        timeout,
    )
    out = {s["name"]: steady(os.path.join(folder, s["name"])) for s in students}
    teacher = json.load(open(os.path.join(folder, "teacher", "summary.json")))
    teacher_cpu = sum(r["loop_cpu_seconds"] / max(r["teacher_forwards"], 1) for r in teacher["per_rank"])
    return {"pools": out, "teacher_cpu": teacher_cpu, "teacher_busy": teacher["busy_fraction"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=["cpu", "demo", "smoke"])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--payloads", nargs="+", default=["hidden", "topk"], choices=["hidden", "topk"])
    p.add_argument("--teacher-ranks", type=int, default=1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--timeout", type=float, default=900, help="seconds any one launch may take")
    args = p.parse_args()
    cfg = preset(args.preset, args.steps)
    students = cfg["pools"]["students"][: max(args.ks)]
    tmp = tempfile.mkdtemp(prefix="bench_pools_")
    t0 = time.time()
    coloc = colocated_all(cfg, students, tmp, args.timeout)
    for name, c in coloc.items():
        print(f"colocated {name}: {json.dumps({k: v for k, v in c.items() if v is not None})}", flush=True)
    rows = []
    tokens_per_step = cfg["student"]["deepspeed"]["micro_batch_size"] * cfg["data"]["seq_len"]
    for k in args.ks:
        chosen = students[:k]
        T = statistics.mean(coloc[s["name"]]["T"] for s in chosen)
        S = [coloc[s["name"]]["S"] for s in chosen]
        ideal_wall = sum(T + si for si in S) / (T + sum(S))
        # the same ideal from CPU seconds (wall-clock T and S carry the machine's load: a loaded run queue stretches
        # them unevenly); the figure below is in CPU seconds, so is the ideal it is held against
        t_cpu = statistics.mean(coloc[s["name"]]["T_cpu"] for s in chosen)
        s_cpu = [coloc[s["name"]]["S_cpu"] for s in chosen]
        ideal = sum(t_cpu + si for si in s_cpu) / (t_cpu + sum(s_cpu))
        coloc_cpu = sum(coloc[s["name"]]["cpu"] for s in chosen)
        for payload in args.payloads:
            got = pools_launch(
                cfg, chosen, payload, args.teacher_ranks, os.path.join(tmp, f"pools_k{k}_{payload}"), args.timeout
            )
            pools_cpu = got["teacher_cpu"] + sum(g["cpu"] for g in got["pools"].values())
            speedup = coloc_cpu / pools_cpu
            row = {
                "preset": args.preset,
                "K": k,
                "payload": payload,
                "teacher_ranks": args.teacher_ranks,
                "speedup_equal_compute": round(speedup, 3),
                "ideal": round(ideal, 3),
                "ideal_wall_clock": round(ideal_wall, 3),
                "T_cpu_s": round(t_cpu, 4),
                "S_cpu_s": " ".join(f"{x:.4f}" for x in s_cpu),
                "fraction_of_ideal": round(speedup / ideal, 3),
                "colocated_cpu_s_per_step": round(coloc_cpu, 4),
                "pools_cpu_s_per_step": round(pools_cpu, 4),
                "teacher_pool_cpu_s_per_step": round(got["teacher_cpu"], 4),
                "T_s": round(T, 4),
                "S_s": " ".join(f"{x:.4f}" for x in S),
                "wait_fraction": " ".join(f"{g['wait_fraction']:.3f}" for g in got["pools"].values()),
                "teacher_busy_fraction": round(got["teacher_busy"], 3),
                "tokens_per_s_per_pool": " ".join(f"{n}={g['tokens_per_s']:.0f}" for n, g in got["pools"].items()),
                "tokens_per_s_total": round(sum(g["tokens_per_s"] for g in got["pools"].values()), 1),
                "colocated_tokens_per_s": " ".join(f"{coloc[s['name']]['tokens_per_s']:.0f}" for s in chosen),
                "tokens_per_step_per_student": tokens_per_step,
                "payload_bytes_per_token": round(
                    statistics.mean(g["payload_bytes_per_token"] for g in got["pools"].values()), 1
                ),
                "load_average": round(os.getloadavg()[0], 1),
                "steps": cfg["schedule"]["max_steps"],
                "seq_len": cfg["data"]["seq_len"],
                "micro_batch": cfg["student"]["deepspeed"]["micro_batch_size"],
                "device": "cpu, 1 thread per process, float32",
                "git": C.git_sha(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            rows.append(row)
            print(
                f"K={k} {payload:>6}: speedup at equal compute {speedup:.3f} of ideal {ideal:.3f} "
                f"= {speedup / ideal:.0%} (goal >= 90%); wait fraction {row['wait_fraction']} (goal < 10%); "
                f"{row['payload_bytes_per_token']} payload bytes/token; load {row['load_average']}",
                flush=True,
            )
    path = os.path.join(C.results_dir(), "bench_pools.csv")
    if os.path.isfile(path):  # rows of other columns (an older version) are kept aside, never misaligned
        with open(path) as f:
            header = f.readline().strip().split(",")
        if header != list(rows[0]):
            os.replace(path, path[:-4] + f".before-{time.strftime('%Y%m%dT%H%M%S')}.csv")
    new = not os.path.isfile(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"rows appended to {path} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
