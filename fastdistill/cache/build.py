"""``teacher-cache build``: the run's teacher over the run's training data (the trainer's packing), top-k targets to
disk. The same set-up as training (distributed init, teacher engine sharded with ZeRO-3 over every rank); each rank
scores its share of the sequences the cache does not hold yet and writes its own shards.

Resumable: keys already in the folder's shards are skipped (whatever world size wrote them), so a build killed at
any point and started again finishes the cache and writes no sequence twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time

import torch

from fastdistill.cache import store
from fastdistill.train import data as data_lib
from fastdistill.train import models, recipe
from fastdistill.train import targets as tg
from fastdistill.train.losses import DistillLoss


def temperatures(cfg: dict) -> list[float]:
    if cfg["cache"]["temperatures"] is not None:
        return [float(t) for t in cfg["cache"]["temperatures"]]
    kd = [x for x in cfg["losses"] if x["type"] == "logit_kd"]
    return [float(kd[0]["temperature"]) if kd else 1.0]


def _hash_files(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def teacher_identity(cfg: dict) -> tuple[str, str]:
    """(a readable name of the teacher, sha256 of its weights and config) for the manifest."""
    t = cfg["teacher"]
    if t["model"] is not None:
        path = models.resolve_model_path(t["model"], t["gguf_file"], convert=False)
        files = [
            os.path.join(path, n)
            for n in os.listdir(path)
            if n.endswith((".safetensors", ".bin", ".gguf")) or n == "config.json"
        ]
        return t["model"], _hash_files(files)
    # random weights from a config: identified by the config, dtype and the seed they were drawn with
    spec = json.dumps({"config": t["config"], "dtype": t["dtype"], "seed": cfg["run"]["seed"]}, sort_keys=True)
    return "config:" + hashlib.sha256(spec.encode()).hexdigest()[:12], hashlib.sha256(spec.encode()).hexdigest()


def tokenizer_identity(cfg: dict) -> tuple[str, str]:
    name = cfg["data"]["tokenizer"]
    if name == "bytes":
        return "bytes", "bytes"
    t = cfg["teacher"]
    source = t["model"] if name == "teacher" else name
    path = models.resolve_model_path(source, t["gguf_file"] if name == "teacher" else None, convert=False)
    files = [os.path.join(path, n) for n in os.listdir(path) if n.startswith(("tokenizer", "vocab", "merges"))]
    return name, _hash_files(files)


def run_identity(cfg: dict, vocab_size: int | None) -> dict:
    teacher, teacher_sha = teacher_identity(cfg)
    tok, tok_sha = tokenizer_identity(cfg)
    out = {
        "teacher": teacher,
        "teacher_sha256": teacher_sha,
        "tokenizer": tok,
        "tokenizer_sha256": tok_sha,
        "seq_len": cfg["data"]["seq_len"],
        "k": cfg["cache"]["k"],
        "temperatures": temperatures(cfg),
        "coding": tg.CODING,
        "logprob_step": cfg["cache"]["logprob_step"],
    }
    if vocab_size is not None:
        out["vocab_size"] = vocab_size
    return out


def build(cfg: dict, folder: str) -> dict:
    """Build (or finish) the teacher cache of ``cfg`` in ``folder``; returns the manifest (every rank)."""
    import torch.distributed as dist

    t_start = time.time()
    if cfg["run"]["threads"]:
        torch.set_num_threads(cfg["run"]["threads"])
    rank, world = recipe.init_distributed()
    say = (lambda *a: print("fastdistill teacher-cache:", *a, flush=True)) if rank == 0 else (lambda *a: None)
    tokenizer = recipe.prepare_models(cfg, rank)
    train_seqs, held_seqs = data_lib.train_heldout(cfg, tokenizer)
    mb = cfg["cache"]["micro_batch_size"] or cfg["student"]["deepspeed"]["micro_batch_size"]
    k = cfg["cache"]["k"]

    torch.manual_seed(cfg["run"]["seed"])  # a teacher from teacher.config draws its weights from the run's seed
    teacher, teacher_model = recipe.build_teacher(cfg, world)
    weight = teacher_model.get_output_embeddings().weight
    vocab = int(teacher_model.config.vocab_size)
    if k > vocab:
        raise ValueError(f"cache.k: got {k}; expected at most the teacher's vocabulary size {vocab}")

    # identity: rank 0 hashes the teacher once; a folder built by another teacher / tokenizer / k is an error
    ident = [run_identity(cfg, vocab) if rank == 0 else None]
    dist.broadcast_object_list(ident, src=0)
    ident = ident[0]
    error = [None]
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        try:
            manifest = store.read_manifest(folder) if os.path.isfile(os.path.join(folder, store.MANIFEST)) else None
            if manifest is None:
                t = cfg["teacher"]
                manifest = {
                    "format_version": store.FORMAT_VERSION,
                    "identity": ident,
                    # how a run with only teacher.cache finds the teacher's tokenizer / layers (init_from_teacher)
                    "teacher_spec": {k_: t[k_] for k_ in ("model", "config", "gguf_file", "dtype")},
                    "complete": False,
                }
                store.write_manifest(folder, manifest)
            else:
                store.check_identity(folder, manifest, ident, "this build")
                if manifest["identity"]["temperatures"] != ident["temperatures"]:
                    raise store.CacheError(
                        f"teacher cache {folder!r} was built with temperatures="
                        f"{manifest['identity']['temperatures']}, but this build has {ident['temperatures']}"
                    )
        except store.CacheError as e:
            error = [str(e)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise store.CacheError(error[0])

    # what is left: unique keys not in any finished shard, in data order, dealt round-robin to the ranks
    store.remove_temporaries(folder, rank)
    done: set[bytes] = set()
    for path in store.list_shards(folder):
        store.verify_shard(path)
        done.update(store.shard_keys(path))
    keys = [store.sequence_key(s.numpy()) for s in train_seqs]
    todo, seen = [], set(done)
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            todo.append(i)
    mine = todo[rank::world]
    n_steps = math.ceil(math.ceil(len(todo) / world) / mb)  # the same on every rank (ZeRO-3 collectives)
    say(
        f"{len(train_seqs)} training sequences ({len(set(keys))} distinct), {len(done)} already cached, "
        f"{len(todo)} to score on {world} rank(s): k={k}, temperatures {ident['temperatures']}, {n_steps} steps"
    )

    writer = store.ShardWriter(folder, rank, cfg["cache"]["shard_sequences"])
    kill_at = int(os.environ.get("FASTDISTILL_FAULT_KILL_AT_STEP", "0"))  # test hook: SIGKILL mid-build
    t_loop, tokens, t_forward = time.time(), 0, 0.0
    for step in range(n_steps):
        rows = mine[step * mb : (step + 1) * mb]
        input_ids = torch.zeros(mb, cfg["data"]["seq_len"], dtype=torch.long)  # padding rows: scored, not written
        if rows:
            input_ids[: len(rows)] = train_seqs[rows]
        t0 = time.perf_counter()
        with torch.no_grad():
            hidden, _ = teacher(input_ids)
            with models.gathered([weight]):
                t_forward += time.perf_counter() - t0
                record = tg.topk_from_hidden(hidden[: len(rows)], weight, k, tuple(ident["temperatures"]))
        coded = tg.encode(record, vocab, cfg["cache"]["logprob_step"])
        for j, i in enumerate(rows):
            writer.add(keys[i], {c: v[j] for c, v in coded.items()})
        tokens += len(rows) * cfg["data"]["seq_len"]
        if kill_at and step + 1 == kill_at and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    writer.flush()
    loop_s = time.time() - t_loop

    # the teacher's held-out perplexity, for the trainer's report (it has no teacher to ask)
    held = data_lib.Sampler(held_seqs, mb, rank, world, 0, shuffle=False)
    nll = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for b in range(held.batches_per_epoch):
            input_ids, labels = held.batch(b)
            hidden, _ = teacher(input_ids)
            with models.gathered([weight]):
                nll += DistillLoss.nll(hidden, weight, labels).cpu()
    stats = torch.tensor([tokens, loop_s, t_forward], dtype=torch.float64)
    dist.all_reduce(nll)
    dist.all_reduce(stats)
    dist.barrier()  # every rank's shards are renamed into place

    manifest = [None]
    if rank == 0:
        shards = []
        total = 0
        for path in store.list_shards(folder):
            n = len(store.shard_keys(path))
            total += n
            shards.append({"file": os.path.basename(path), "sequences": n, "sha256": store.file_sha256(path)})
        m = store.read_manifest(folder)
        m.update(
            complete=True,
            shards=shards,
            sequences=total,
            teacher_heldout_ppl=math.exp(nll[0] / max(nll[1].item(), 1)),
            build={"world_size": world, "micro_batch_size": mb, "seconds": time.time() - t_start},
        )
        store.write_manifest(folder, m)
        manifest = [m]
        say(
            f"{int(stats[0])} new tokens in {loop_s:.1f} s ({stats[0] / max(stats[1] / world, 1e-9):.0f} tokens/s "
            f"over {world} rank(s)); {total} sequences in {len(shards)} shards at {folder}"
        )
    dist.broadcast_object_list(manifest, src=0)
    dist.barrier()
    return manifest[0]
