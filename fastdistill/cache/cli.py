"""``fastdistill teacher-cache build --config RUN.yaml [--output DIR] [key=value ...]`` and
``fastdistill teacher-cache info DIR [--json] [--config RUN.yaml [key=value ...]]``.

``build`` runs under the same launchers as training (the teacher sharded with ZeRO-3 over every rank):

    deepspeed [--num_gpus G] --module fastdistill.cache build --config RUN.yaml [--output DIR] [key=value ...]

The output folder is ``--output``, else the config's ``teacher.cache``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastdistill teacher-cache", description="Build or inspect a teacher cache.")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="score the run's training data with its teacher; top-k targets to DIR")
    b.add_argument("--config", required=True, help="the run's YAML file")
    b.add_argument("--output", default=None, help="cache folder (default: the config's teacher.cache)")
    b.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    b.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. cache.k=32")
    i = sub.add_parser("info", help="sequences, tokens, bytes/token, k, top-k mass; coverage of a run config")
    i.add_argument("folder")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.add_argument("--config", default=None, help="a run config: how many of its training sequences are covered")
    i.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every shard")
    i.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def _load(path: str, overrides: list[str]) -> dict:
    from fastdistill.train.config import load_config

    return load_config(path, overrides)


def info(folder: str, cfg: dict | None = None, verify: bool = True) -> dict:
    """The summary ``teacher-cache info`` prints (also used by the benchmark)."""
    import numpy as np
    import pyarrow.parquet as pq

    from fastdistill.cache import store

    reader = store.CacheReader(folder, verify=verify)
    m = reader.manifest
    nt = len(reader.temperatures)
    log_tail = [
        np.frombuffer(b, dtype="<f4").reshape(-1, nt)[:, 0]
        for path, _, _ in reader.files
        for b in pq.read_table(path, columns=["log_tail"], memory_map=True).column("log_tail").to_pylist()
    ]
    tails = np.concatenate(log_tail) if log_tail else np.zeros(0, dtype=np.float32)
    mass = -np.expm1(tails.astype(np.float64))
    sequences = len(reader)
    tokens = sequences * reader.seq_len
    size = reader.bytes_on_disk()
    out = {
        "folder": folder,
        "complete": bool(m.get("complete")),
        "sequences": sequences,
        "tokens": tokens,
        "shards": len(reader.files),
        "bytes": size,
        "bytes_per_token": size / tokens if tokens else None,
        "k": reader.k,
        "temperatures": list(reader.temperatures),
        "topk_mass_mean": float(mass.mean()) if mass.size else None,
        "topk_mass_p5": float(np.percentile(mass, 5)) if mass.size else None,
        "teacher": m["identity"]["teacher"],
        "teacher_sha256": m["identity"]["teacher_sha256"],
        "tokenizer": m["identity"]["tokenizer"],
        "seq_len": reader.seq_len,
        "vocab_size": reader.vocab_size,
        "coding": m["identity"]["coding"],
        "logprob_step": reader.logprob_step,
        "teacher_heldout_ppl": m.get("teacher_heldout_ppl"),
        "verified": verify,
    }
    if cfg is not None:
        from fastdistill.cache import source
        from fastdistill.train import data as data_lib
        from fastdistill.train import models

        cfg = dict(cfg, teacher=dict(cfg["teacher"], cache=folder))
        source.resolve_teacher_spec(cfg)
        t = cfg["teacher"]
        tokenizer = models.load_tokenizer(cfg["data"]["tokenizer"], t["model"], t["gguf_file"])
        source.check_run(cfg, reader.vocab_size, m)
        train, _ = data_lib.train_heldout(cfg, tokenizer)
        keys = [store.sequence_key(s.numpy()) for s in train]
        out["run_sequences"] = len(keys)
        out["run_covered"] = sum(k in reader for k in keys)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from fastdistill.cache.store import CacheError
    from fastdistill.train.config import ConfigError

    try:
        if args.command == "build":
            cfg = _load(args.config, args.overrides)
            folder = args.output or cfg["teacher"]["cache"]
            if not folder:
                raise ConfigError("teacher-cache build: give --output DIR or set teacher.cache in the config")
            cfg["teacher"]["cache"] = None  # the teacher is built from teacher.model / teacher.config
            if cfg["teacher"]["model"] is None and cfg["teacher"]["config"] is None:
                raise ConfigError("teacher-cache build: expected teacher.model or teacher.config (the teacher to run)")
            from fastdistill.train.cli import _environment

            _environment()
            from fastdistill.cache.build import build

            build(cfg, os.path.abspath(folder))
            return 0
        # the run as it would read this folder: teacher.cache set to it
        cfg = _load(args.config, [f"teacher.cache={args.folder}", *args.overrides]) if args.config else None
        out = info(args.folder, cfg, verify=not args.no_verify)
    except (ConfigError, CacheError) as e:
        print(f"fastdistill teacher-cache: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for key, value in out.items():
            print(f"{key:>20}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
