"""The generation stage, top to bottom: distributed set-up, teacher (the trainer's teacher engine), prompts, resume
set, then one collective gather per batch while every rank samples its own prompts, atomic part files, merge.

Ranks split the pending prompts by batch (batch k on rank k mod world); every rank runs the same number of rounds
(a rank without a batch still joins the ZeRO-3 gather), so no rank waits on a collective another never reaches.
"""

from __future__ import annotations

import json
import os
import signal
import time

import torch
import yaml

from fastdistill.generate.config import fingerprint
from fastdistill.generate.core import SamplingConfig, sample, unsharded
from fastdistill.generate.prompts import Codec, Prompt, build_prompts, read_records
from fastdistill.generate.store import PartStore, to_rows


def load_teacher(cfg: dict, rank: int, world: int):
    """The trainer's frozen teacher engine (ZeRO-3 sharded or a full copy) and its ``*ForCausalLM``, plus the codec.
    Rank 0 converts a builtin / GGUF teacher once into the cache while the others wait."""
    import torch.distributed as dist

    from fastdistill.train import models, recipe

    t = cfg["teacher"]
    for name, gguf in ((t["model"], t["gguf_file"]), (cfg["tokenizer"], None)):
        if name and name not in ("teacher", "bytes") and (name in models.BUILTIN or name.endswith(".gguf") or gguf):
            if rank == 0:
                models.resolve_model_path(name, gguf)
    dist.barrier()
    codec = Codec(models.load_tokenizer(cfg["tokenizer"], t["model"], t["gguf_file"]))
    # build_teacher reads the micro batch size from the student section: a generation run has no student
    shim = {"teacher": t, "student": {"deepspeed": {"micro_batch_size": 1}}}
    engine, model = recipe.build_teacher(shim, world)
    return engine, model, codec


class ResumeError(ValueError):
    """The output folder holds a different run's generations."""


def _check_resume(out_dir: str, cfg: dict) -> None:
    path = os.path.join(out_dir, "generate_config.yaml")
    if os.path.isfile(path):
        with open(path) as f:
            old = yaml.safe_load(f)
        old_fp, new_fp = old.get("fingerprint"), fingerprint(cfg)
        if old_fp != new_fp:
            diff = [k for k in new_fp if old_fp is None or old_fp.get(k) != new_fp[k]]
            raise ResumeError(
                f"run.output_dir {out_dir!r} holds generations made with different {diff}; finished prompts would mix "
                "two datasets: use a new output_dir (or delete that folder to start over)"
            )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("# resolved fastdistill generate config; re-run (resumes) with:\n")
        f.write("#   fastdistill generate --config generate_config.yaml\n")
        yaml.safe_dump({**cfg, "fingerprint": fingerprint(cfg)}, f, sort_keys=False)
    os.replace(tmp, path)


def generate_to_store(
    model,
    codec: Codec,
    prompts: list[Prompt],
    sampling: SamplingConfig | None,
    store: PartStore,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    desc: str = "generate",
    extra=None,
) -> dict:
    """Generate every prompt not yet in ``store`` (one part file per batch); a collective per round under ZeRO-3.

    ``sampling`` None generates nothing (the rows then carry only what ``extra`` adds). ``extra(model, prompts,
    results)``, called with the unsharded model right after sampling, returns one JSON-able dict per prompt, stored in
    the row's ``extra`` column (weak labels score the verbalizers there, in the same gather) with ``batch_seconds``
    added: the batch's sampling + ``extra`` time per prompt.
    Returns {"tokens": generated tokens on this rank, "seconds": ..., "prompts": generated on this rank}."""
    import torch.distributed as dist
    from tqdm import tqdm

    if dist.is_initialized():
        done = [store.done_ids() if rank == 0 else None]
        dist.broadcast_object_list(done, src=0)  # one view of the folder for every rank
        done_ids = done[0]
    else:
        done_ids = store.done_ids()
    pending = [p for p in prompts if p.id not in done_ids]
    batches = [pending[i : i + batch_size] for i in range(0, len(pending), batch_size)]
    rounds = -(-len(batches) // world)
    kill_after = int(os.environ.get("FASTDISTILL_FAULT_KILL_AFTER_BATCHES", "0"))  # test hook: SIGKILL mid-run
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(pending), disable=rank != 0 or not progress, desc=desc)
    tokens = n_prompts = 0
    t0 = time.time()
    for k in range(rounds):
        idx = k * world + rank
        batch = batches[idx] if idx < len(batches) else []
        with unsharded(model) as m:  # every rank joins the gather, with or without a batch
            results: list = [[] for _ in batch]
            t_batch = time.perf_counter()
            if batch and sampling is not None:
                prompt_ids = [codec.encode(p.text) for p in batch]
                results = sample(m, codec, prompt_ids, [p.id for p in batch], sampling, _eos(codec, model))
            extras = extra(m, batch, results) if batch and extra is not None else None
            if extras is not None:  # the sampling time per prompt travels with the row (a resumed run still has it)
                per_prompt = (time.perf_counter() - t_batch) / len(batch)
                extras = [{**e, "batch_seconds": per_prompt} for e in extras]
        store.write(to_rows(batch, results, extras))
        tokens += sum(len(s.token_ids) for g in results for s in g)
        n_prompts += len(batch)
        bar.update(sum(len(b) for b in batches[k * world : (k + 1) * world]))  # every rank's batch of this round
        bar.set_postfix_str(f"tok/s/rank={tokens / max(time.time() - t0, 1e-9):.1f}")
        if kill_after and k + 1 == kill_after and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    return {"tokens": tokens, "seconds": time.time() - t0, "prompts": n_prompts}


def _eos(codec: Codec, model) -> list[int]:
    ids = []
    for source in (codec.eos_token_id, getattr(model.config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.append(source)
        elif isinstance(source, (list, tuple)):
            ids.extend(int(x) for x in source)
    return list(dict.fromkeys(ids))


def run(cfg: dict) -> dict:
    """Generate ``cfg`` (a resolved GEN config) into ``run.output_dir``; returns the summary (``summary.json``)."""
    import torch.distributed as dist

    from fastdistill.train import recipe

    if cfg["run"]["threads"]:
        torch.set_num_threads(cfg["run"]["threads"])
    rank, world = recipe.init_distributed()
    out_dir = cfg["run"]["output_dir"]
    say = (lambda *a: print("fastdistill:", *a, flush=True)) if rank == 0 else (lambda *a: None)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        _check_resume(out_dir, cfg)
        PartStore(out_dir, cfg["output"]["format"]).clean_temporaries()
    dist.barrier()
    store = PartStore(out_dir, cfg["output"]["format"])
    torch.manual_seed(cfg["run"]["seed"])
    engine, model, codec = load_teacher(cfg, rank, world)
    p = cfg["prompts"]
    records = read_records(p["source"])[: p["max_prompts"]]
    prompts = build_prompts(
        records, p["template"], codec, chat_template=p["chat_template"], system=p["system"], id_field=p["id_field"]
    )
    sampling = SamplingConfig(seed=cfg["run"]["seed"], **cfg["sampling"])
    say(f"{len(prompts)} prompts x {sampling.num_samples} samples; world size {world}; output {out_dir}")
    stats = generate_to_store(
        model, codec, prompts, sampling, store, cfg["output"]["batch_size"], rank, world, cfg["logging"]["progress_bar"]
    )
    every = [None] * world
    dist.all_gather_object(every, stats)
    dist.barrier()
    summary = {
        "prompts": len(prompts),
        "generated_now": sum(s["prompts"] for s in every),
        "tokens_now": sum(s["tokens"] for s in every),
        "tokens_per_s": sum(s["tokens"] for s in every) / max(max(s["seconds"] for s in every), 1e-9),
        "world_size": world,
    }
    if rank == 0:
        summary["output"] = store.merge()
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        say(
            f"{summary['generated_now']} prompts generated now ({summary['prompts']} in all), "
            f"{summary['tokens_per_s']:.1f} tokens/s; dataset: {summary['output']}"
        )
    dist.barrier()
    return summary
