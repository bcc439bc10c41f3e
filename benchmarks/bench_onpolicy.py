"""On-policy distillation: the fastdistill trainer with ``onpolicy.fraction=1`` against TRL's GKDTrainer with lmbda=1
(same teacher, student, prompts and settings), and ZeRO-3 generation (one all-gather per call) against unsharded
generation, in one run.

    python benchmarks/bench_onpolicy.py --preset cpu      # V=49152 (SmolLM2 tokenizer), H=256, 6 -> 2 layers, B=4
    python benchmarks/bench_onpolicy.py --preset cpu --providers generation --repeats 2
    python benchmarks/bench_onpolicy.py --preset smoke    # tiny, seconds per provider
    python benchmarks/bench_onpolicy.py --providers fastdistill,trl-gkd

Providers (each in its own process, so peak memory is its own):
  fastdistill        fastdistill train, one process, teacher and student ZeRO-0, onpolicy fraction 1 (every step: the
                     student samples max_new_tokens after the first prompt_tokens of each packed sequence, the teacher
                     scores, generalized JSD beta 0.5 through the fused lm-head loss)
  trl-gkd            trl.experimental.gkd.GKDTrainer, lmbda=1, beta=0.5, the same prompts, temperature, max_new_tokens
  generation         deepspeed --num_gpus 2: per rank, the same prompts sampled by (a) fastdistill.generate.sample
                     inside ``unsharded`` on the ZeRO-3 student engine, (b) the same on a full copy, (c) transformers'
                     ``generate`` on a full copy, (d) transformers' ``generate`` on the ZeRO-3 module (its hooks gather
                     every layer for every token: the DeepSpeedExamples #718 / TRL #3858 path)

Rows (tokens/s, median step ms, peak RSS MiB, the share of step time spent generating (fastdistill: its generation
stage; TRL: its ``generate`` calls), the machine's load average) are appended to benchmarks/results/onpolicy.csv as
each provider finishes, so a killed or timed-out run keeps the providers that ran.
"""

from __future__ import annotations

import argparse
import csv
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import bench_trainer as BT  # noqa: E402

REPO = BT.REPO
PRESETS = {
    # 3 steps (2 timed after the first), 4 x (32 + 32) tokens: the last 4 x (64 + 64), 4-step attempt ran > 40 min on
    # the loaded 2-core machine and recorded nothing; run the providers separately if need be (--providers)
    "cpu": dict(BT.PRESETS["cpu"], prompt=32, new=32, steps=3),
    "smoke": dict(BT.PRESETS["smoke"], prompt=16, new=16, steps=3),
}
PROVIDERS = ("fastdistill", "trl-gkd", "generation")
TEMPERATURE, BETA = 0.9, 0.5
FIELDS = [
    "bench",
    "provider",
    "mode",
    "shape",
    "dtype",
    "world",
    "tokens_per_s",
    "median_ms",
    "min_ms",
    "max_ms",
    "peak_mib",
    "generate_fraction",
    "vs_baseline",
    "loadavg_1m",
    "device",
    "extra",
    "torch_version",
    "git_sha",
    "date",
]


def prompts_and_sequences(p: dict):
    """The packed training sequences of the run (the trainer's own packing) and their first ``prompt`` tokens."""
    from fastdistill.train import data as data_lib
    from fastdistill.train.models import load_tokenizer

    tok = load_tokenizer(p["tokenizer"], None, None) if p["tokenizer"] != "bytes" else data_lib.ByteTokenizer()
    seqs = data_lib.pack(data_lib.load_text("pydoc_topics"), tok, p["seq_len"])
    train, _ = data_lib.split(seqs, 0.05, None, None)
    return tok, train


def run_fastdistill(p: dict, tdir: str, sdir: str, folder: str) -> dict:
    cfg = BT.run_config(p, tdir, sdir, os.path.join(folder, "run"))
    cfg["losses"] = [{"type": "logit_kd", "weight": 1.0, "divergence": "jsd", "beta": BETA, "temperature": 1.0}]
    cfg["onpolicy"] = {
        "fraction": 1.0,
        "max_new_tokens": p["new"],
        "temperature": TEMPERATURE,
        "top_p": 1.0,
        "prompt_tokens": p["prompt"],
    }
    r = BT.run_fastdistill(cfg, folder, [])
    with open(os.path.join(cfg["run"]["output_dir"], "summary.json")) as f:
        s = json.load(f)
    with open(os.path.join(cfg["run"]["output_dir"], "metrics.csv")) as f:
        rows = [x for x in csv.DictReader(f) if x.get("onpolicy/generate_s")][1:]  # steady state
    gen = sum(float(x["onpolicy/generate_s"]) for x in rows)
    r["generate_fraction"] = gen / max(sum(r["step_seconds"]), 1e-9)
    r["completion_len"] = s["onpolicy_mean_completion_len"]
    r["generated_tokens_per_s"] = s["onpolicy_generated_tokens_per_s"]
    return r


def trl_worker(args_json: str) -> None:
    """Its own process: GKDTrainer lmbda=1 on the same models, prompts and settings; prints one JSON line."""
    a = json.loads(args_json)
    p = a["preset"]
    if p.get("threads"):
        torch.set_num_threads(p["threads"])
    tok, train = prompts_and_sequences(p)

    def collate(features):
        ids = torch.tensor([f["input_ids"] for f in features])
        labels = ids.clone()
        labels[:, : p["prompt"]] = -100
        prompts = ids[:, : p["prompt"]]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "prompts": prompts,
            "prompt_attention_mask": torch.ones_like(prompts),
        }

    # the share of TRL's step spent generating: every generate() call timed, written after each call (a killed worker
    # keeps what it measured)
    from transformers.generation.utils import GenerationMixin

    plain_generate, gen_seconds = GenerationMixin.generate, []

    def timed_generate(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return plain_generate(self, *args, **kwargs)
        finally:
            gen_seconds.append(time.perf_counter() - t0)
            os.makedirs(a["out"], exist_ok=True)
            with open(os.path.join(a["out"], "generate_seconds.json"), "w") as f:
                json.dump(gen_seconds, f)

    GenerationMixin.generate = timed_generate
    BT.gkd_train(a, tok, train, collate, lmbda=1.0, beta=BETA, temperature=TEMPERATURE, max_new_tokens=p["new"])


def run_trl(p: dict, tdir: str, sdir: str, folder: str) -> dict | None:
    r = BT.run_trl(p, tdir, sdir, folder, script=__file__)
    gen_path = os.path.join(folder, "trl", "generate_seconds.json")
    if r is not None and os.path.isfile(gen_path):
        with open(gen_path) as f:
            gen = json.load(f)[1:]  # steady state: the first step (and its generate call) pays one-time costs
        r["generate_fraction"] = (
            sum(gen) / max(sum(r["step_seconds"]), 1e-9) if len(gen) == len(r["step_seconds"]) else None
        )
    return r


def gen_worker(args_json: str) -> None:
    """Under ``deepspeed --num_gpus 2``: the four generation paths on this rank's prompts, timed; rank 0 writes JSON."""
    a = json.loads(args_json)
    p = a["preset"]
    torch.set_num_threads(p.get("threads") or 1)
    from fastdistill.train import output

    output.prepare_deepspeed()
    import deepspeed
    import torch.distributed as dist
    import transformers

    from fastdistill.generate import Codec, SamplingConfig, sample, unsharded

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = dist.get_rank()
    tok, train = prompts_and_sequences(p)
    prompts = train[rank * p["batch"] : (rank + 1) * p["batch"], : p["prompt"]]
    plain = transformers.AutoModelForCausalLM.from_pretrained(a["student"]).eval()
    shard = transformers.AutoModelForCausalLM.from_pretrained(a["student"])
    engine, *_ = deepspeed.initialize(
        model=shard,
        model_parameters=shard.parameters(),
        config={
            "train_micro_batch_size_per_gpu": p["batch"],
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
            "steps_per_print": 2**62,
        },
    )
    engine.module.eval()
    codec = Codec(tok)
    sampling = SamplingConfig(temperature=TEMPERATURE, max_new_tokens=p["new"], seed=0)
    ids = list(range(rank * p["batch"], (rank + 1) * p["batch"]))
    rows = [r.tolist() for r in prompts]
    no_eos: list[int] = [-1]  # every row runs max_new_tokens in every path: equal work

    def ours_zero3():
        with unsharded(engine.module) as m:
            return sample(m, codec, rows, ids, sampling, no_eos)

    def ours_plain():
        return sample(plain, codec, rows, ids, sampling, no_eos)

    def hf(model):
        def go():
            with torch.no_grad():
                return model.generate(
                    input_ids=prompts,
                    attention_mask=torch.ones_like(prompts),
                    do_sample=True,
                    temperature=TEMPERATURE,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=p["new"],
                    min_new_tokens=p["new"],
                    pad_token_id=0,
                )

        return go

    paths = {
        "fastdistill-zero3x2": ours_zero3,
        "fastdistill-unsharded": ours_plain,
        "hf-generate-unsharded": hf(plain),
        "hf-generate-zero3x2-hooks": hf(engine.module),
    }
    out = {}
    for name, fn in paths.items():
        if name in a["skip"]:
            continue
        times = []
        for _ in range(a["repeats"] + 1):  # the first call pays one-time costs
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = times[1:]
    if rank == 0:
        with open(a["result"], "w") as f:
            json.dump({"times": out, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)
    dist.barrier()


def run_generation(p: dict, sdir: str, folder: str, repeats: int, skip: list[str]) -> dict | None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = os.path.join(folder, "gen.json")
    payload = json.dumps({"preset": p, "student": sdir, "result": result, "repeats": repeats, "skip": skip})
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    cmd += [os.path.abspath(__file__), "--gen-worker", payload]
    proc = subprocess.run(cmd, cwd=REPO, env=BT.env(), capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(result):
        print(f"generation: failed:\n{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}")
        return None
    with open(result) as f:
        return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (every provider)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generation calls per path")
    ap.add_argument("--skip-naive-zero3", action="store_true", help="leave out generate() through ZeRO-3 hooks")
    ap.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gen-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.trl_worker:
        trl_worker(a.trl_worker)
        return 0
    if a.gen_worker:
        gen_worker(a.gen_worker)
        return 0
    p = dict(PRESETS[a.preset])
    if a.steps:
        p["steps"] = a.steps
    p["threads"] = a.threads
    p["seq_len"] = p["prompt"] + p["new"]  # every sequence: the prompt and a full-length completion
    providers = [x for x in a.providers.split(",") if x]
    bad = [x for x in providers if x not in PROVIDERS]
    if bad:
        raise SystemExit(f"--providers: unknown {bad}; expected some of {list(PROVIDERS)}")
    device = C.device_name(torch.device("cpu"))
    shape = f"B{p['batch']} prompt{p['prompt']}+new{p['new']} V{p['vocab']} H{p['hidden']} L{p['layers']}->2"
    print(f"# on-policy benchmark, preset {a.preset}: {shape}, {p['steps']} steps, {a.threads} thread(s) ({device})")
    print(f"# load average before: {os.getloadavg()}")
    rows: list[dict] = []
    path = os.path.join(C.results_dir(), "onpolicy.csv")
    sha, stamp = C.git_sha(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # one run: one sha, one date

    def row(provider, mode, world, tps, step_s, peak, gen_frac=None, extra=None):
        st = [x * 1e3 for x in step_s]
        rows.append(
            {
                "bench": "onpolicy",
                "provider": provider,
                "mode": mode,
                "shape": shape,
                "dtype": "float32",
                "world": world,
                "tokens_per_s": round(tps, 2),
                "median_ms": round(statistics.median(st), 1),
                "min_ms": round(min(st), 1),
                "max_ms": round(max(st), 1),
                "peak_mib": round(peak, 1) if peak else "",
                "generate_fraction": "" if gen_frac is None else round(gen_frac, 3),
                "vs_baseline": "",
                "loadavg_1m": round(os.getloadavg()[0], 2),
                "device": device,
                "extra": json.dumps(extra or {}),
                "torch_version": torch.__version__,
                "git_sha": sha,
                "date": stamp,
            }
        )

    def baseline_of(r: dict) -> dict | None:  # train steps against TRL, generation against unsharded generate
        name = "trl-gkd" if r["mode"] == "train-step" else "hf-generate-unsharded"
        return next((b for b in rows if b["provider"] == name), None)

    def flush(new_rows: list[dict]) -> None:
        """Append one provider's rows to the CSV as soon as it finished (a killed run keeps what ran); a row whose
        baseline was measured before it gets its ratio, a baseline measured after its rows names them in ``extra``."""
        for r in new_rows:
            base = baseline_of(r)
            if base is r:
                r["vs_baseline"] = 1.0
                extra = json.loads(r["extra"])
                for o in rows:
                    if o is not r and baseline_of(o) is r and o not in new_rows:
                        o["vs_baseline"] = round(o["tokens_per_s"] / r["tokens_per_s"], 3)
                        extra[f"{o['provider']}_vs_this"] = o["vs_baseline"]
                r["extra"] = json.dumps(extra)
            elif base is not None:
                r["vs_baseline"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerows(new_rows)

    with tempfile.TemporaryDirectory(prefix="bench_onpolicy_") as folder:
        tdir, sdir = BT.build_models(p, folder)
        done = 0
        for prov in providers:
            sub = os.path.join(folder, prov)
            os.makedirs(sub)
            t0 = time.time()
            if prov == "fastdistill":
                r = run_fastdistill(p, tdir, sdir, sub)
                tps = r["tokens_per_step"] * len(r["step_seconds"]) / sum(r["step_seconds"])
                extra = {k: r[k] for k in ("completion_len", "generated_tokens_per_s")}
                row(prov, "train-step", 1, tps, r["step_seconds"], max(r["peak_rss_mib_per_rank"]),
                    r["generate_fraction"], extra)  # fmt: skip
            elif prov == "trl-gkd":
                r = run_trl(p, tdir, sdir, sub)
                if r is not None:
                    tps = r["tokens_per_step"] * len(r["step_seconds"]) / sum(r["step_seconds"])
                    row(prov, "train-step", 1, tps, r["step_seconds"], max(r["peak_rss_mib_per_rank"]),
                        r.get("generate_fraction"))  # fmt: skip
            else:
                skip = ["hf-generate-zero3x2-hooks"] if a.skip_naive_zero3 else []
                r = run_generation(p, sdir, sub, a.repeats, skip)
                if r is not None:
                    for name, times in r["times"].items():
                        tps = p["batch"] * p["new"] / statistics.median(times)  # generated tokens/s per rank
                        # peak: rank 0's process, which holds a full copy and a shard for all four paths
                        row(name, "generate", 2 if "zero3" in name else 1, tps, times, r["peak_rss_mib"],
                            extra={"peak_mib": "rank-0 process, all generation paths together"})  # fmt: skip
            flush(rows[done:])
            done = len(rows)
            print(f"{prov}: done in {time.time() - t0:.0f} s (rows appended to {path})", flush=True)
    if not rows:
        return 1
    print()
    print(f"{'provider':<28}{'mode':<12}{'world':>6}{'tokens/s':>10}{'median ms':>11}{'peak MiB':>10}{'gen share':>10}"
          f"{'vs base':>9}")  # fmt: skip
    for r in rows:
        print(
            f"{r['provider']:<28}{r['mode']:<12}{r['world']:>6}{r['tokens_per_s']:>10.1f}{r['median_ms']:>11.1f}"
            f"{str(r['peak_mib']):>10}{str(r['generate_fraction']):>10}{str(r['vs_baseline']):>9}"
        )
    print(f"# load average after: {os.getloadavg()}")
    print("csv:", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
