"""Student-pool wait with on-policy vs off-policy distillation through a teacher pool, side by side.

    python benchmarks/bench_pools_onpolicy.py [--config configs/pools_onpolicy_tiny.yaml] [--steps 6]

Launches the config twice at the same time (so both see the same machine load): as shipped (its student pools
on-policy) and with ``onpolicy`` off everywhere (every pool on the teacher pool's data records). Appends one row per
(mode, pool) to ``benchmarks/results/pools_onpolicy.csv``: the pool's wait fraction (share of its training wall-clock
spent waiting for the teacher pool), generation time share, tokens/s, and the teacher pool's forwards and busy
fraction. On-policy a student waits for the teacher's forward on its own sequences every on-policy step (a round trip
the teacher cannot run ahead of); off-policy the teacher runs up to ``pools.ring`` steps ahead.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

import _launch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "pools_onpolicy_tiny.yaml"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "pools_onpolicy.csv"))
    args = ap.parse_args()
    import yaml

    with open(args.config) as f:
        raw = yaml.safe_load(f)
    n = raw["pools"]["teacher"]["ranks"] + sum(s["ranks"] for s in raw["pools"]["students"])
    tmp = tempfile.mkdtemp(prefix="bench_pools_onpolicy_")
    off = dict(raw, onpolicy=None)  # the same run with every pool off-policy
    off["pools"] = dict(raw["pools"], students=[dict(s, onpolicy=None) for s in raw["pools"]["students"]])
    off_config = os.path.join(tmp, "offpolicy.yaml")
    with open(off_config, "w") as f:
        yaml.safe_dump(off, f)
    modes = {"onpolicy": args.config, "offpolicy": off_config}
    procs, outs = [], {}
    for mode, config in modes.items():
        out = os.path.join(tmp, mode)
        outs[mode] = out
        base = ["--config", config, f"run.output_dir={out}", "logging.progress_bar=false"]
        base += [f"schedule.max_steps={args.steps}", "schedule.save_every=0", "run.final_checkpoint=false"]
        procs.append(_launch.start(_launch.deepspeed_cmd("fastdistill.train", base, n)))
    for r in _launch.finish(procs, timeout=3600):
        if r.returncode:
            sys.exit(_launch.output(r))
    load = os.getloadavg()[0]
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    rows = []
    for mode, out in outs.items():
        teacher = json.load(open(os.path.join(out, "teacher", "summary.json")))
        for s in raw["pools"]["students"]:
            p = json.load(open(os.path.join(out, s["name"], "summary.json")))
            rows.append(
                {
                    "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "git": sha.strip(),
                    "config": os.path.basename(args.config),
                    "steps": args.steps,
                    "mode": mode,
                    "pool": s["name"],
                    "payload": p["payload"],
                    "wait_fraction": round(p["wait_fraction"], 4),
                    "generate_fraction": round(p.get("onpolicy_generate_fraction") or 0.0, 4),
                    "tokens_per_s": round(p["tokens_per_s"], 2),
                    "teacher_forwards": teacher["teacher_forwards"],
                    "teacher_busy_fraction": round(teacher["busy_fraction"], 4),
                    "load_average_after": round(load, 1),
                    "device": "cpu",
                }
            )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    new = not os.path.isfile(args.out)
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
