"""The cached teacher as a teacher source of the recipe: micro batches of (input_ids, labels, TopKTargets) read and
decoded by a background thread, ``prefetch`` micro steps ahead of the student, so the student never waits on disk."""

from __future__ import annotations

import os
import queue
import threading

import torch

from fastdistill.cache import store
from fastdistill.train import targets as tg
from fastdistill.train.data import IGNORE_INDEX

WAIT_S = 600.0  # a reader thread that produced nothing for this long is reported, never waited on forever


def resolve_teacher_spec(cfg: dict) -> dict:
    """With only ``teacher.cache`` given, the teacher named in the cache's manifest (its tokenizer for
    ``data.tokenizer: teacher``, its layers for ``student.init_from_teacher``); its weights are read only for that."""
    t = cfg["teacher"]
    if t["model"] is None and t["config"] is None:
        spec = store.read_manifest(t["cache"]).get("teacher_spec") or {}
        t["model"], t["config"], t["gguf_file"] = spec.get("model"), spec.get("config"), spec.get("gguf_file")
    return cfg


def teacher_for_init(cfg: dict):
    """The teacher model (plain, on this process, no engine) only when ``student.init_from_teacher`` copies its
    layers; else None: training from a cache reads no teacher weights."""
    from fastdistill.train import models

    if cfg["student"]["init_from_teacher"] is None:
        return None
    t = cfg["teacher"]
    if t["model"] is None and t["config"] is None:
        raise store.CacheError(
            f"student.init_from_teacher needs the teacher's weights, but the cache {t['cache']!r} does not name its "
            "teacher (set teacher.model)"
        )
    return models.build_causal_lm(t["model"], t["config"], t["dtype"], t["gguf_file"])


def teacher_heldout_ppl(folder: str) -> float | None:
    return store.read_manifest(folder).get("teacher_heldout_ppl")


def check_run(cfg: dict, vocab_size: int, manifest: dict | None = None) -> None:
    """The run's identity against the cache's: seq_len, tokenizer, k, the KD temperature, the teacher when the run
    names one, and the student's vocabulary (it must cover the teacher's token ids)."""
    from fastdistill.cache import build

    folder = cfg["teacher"]["cache"]
    manifest = manifest if manifest is not None else store.read_manifest(folder)
    wanted = {"seq_len": cfg["data"]["seq_len"]}
    tok, tok_sha = build.tokenizer_identity(cfg)
    wanted.update(tokenizer=tok, tokenizer_sha256=tok_sha)
    if cfg["teacher"]["model"] is not None or cfg["teacher"]["config"] is not None:
        _, wanted["teacher_sha256"] = build.teacher_identity(cfg)
    store.check_identity(folder, manifest, wanted, "the run")
    kd = [x for x in cfg["losses"] if x["type"] == "logit_kd"]
    if kd:
        tg._temperature_index(manifest["identity"]["temperatures"], float(kd[0]["temperature"]))
    if manifest["identity"]["vocab_size"] > vocab_size:
        raise store.CacheError(
            f"teacher cache {folder!r} holds token ids up to vocab_size={manifest['identity']['vocab_size']}, but "
            f"the student's vocabulary is {vocab_size}; expected a student vocabulary >= the teacher's"
        )


def check_run_per_node(cfg: dict, vocab_size: int) -> None:
    """:func:`check_run` for a launched run: one process per machine (local rank 0) hashes the teacher's and the
    tokenizer's files and compares them with the manifest, then every rank learns the verdict (one ``all_gather``).

    Per machine rather than once for the launch: each node reads its own copy of the files (nodes need not share a
    filesystem), so a node whose copy differs is caught and named; the cost is one read of the weights per node
    instead of one per rank (G ranks of a node each reading and hashing the whole teacher at start)."""
    import socket

    import torch.distributed as dist

    verdict = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            check_run(cfg, vocab_size)
        except (store.CacheError, ValueError) as e:
            verdict = (type(e).__name__, str(e))
    verdicts = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, (verdict, socket.gethostname()))
    for v, host in verdicts:
        if v is not None:
            kind, msg = v
            if dist.get_world_size() > 1 and len({h for _, h in verdicts}) > 1:
                msg = f"{msg} (on node {host})"
            raise (ValueError if kind == "ValueError" else store.CacheError)(msg)


class CachedTeacher:
    """``batch(micro_step) -> (input_ids, labels, TopKTargets, None)`` in the sampler's order, prefetched by a
    thread.

    Sequences missing from the cache raise a ``CacheError`` naming them, or with ``cache.missing: skip`` their rows
    get ``ignore_index`` labels (left out of every loss term) and are counted in ``missing``."""

    def __init__(self, cfg: dict, sampler, start_micro_step: int, end_micro_step: int, rank: int):
        c = cfg["cache"]
        self.reader = store.CacheReader(cfg["teacher"]["cache"], verify=c["verify"])
        kd = [x for x in cfg["losses"] if x["type"] == "logit_kd"]
        self.temperature = float(kd[0]["temperature"]) if kd else self.reader.temperatures[0]
        self.sampler, self.skip = sampler, c["missing"] == "skip"
        self.missing = 0
        self.rank = rank
        # test hook: every served row's targets by key, saved on close (FASTDISTILL_DEBUG_CACHE_DUMP=path prefix)
        self._dump = {} if os.environ.get("FASTDISTILL_DEBUG_CACHE_DUMP") else None
        self._next = start_micro_step
        self._queue: queue.Queue = queue.Queue(maxsize=c["prefetch"])
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(start_micro_step, end_micro_step), name=f"teacher-cache-rank{rank}", daemon=True
        )
        self._thread.start()

    def _targets(self, input_ids: torch.Tensor, labels: torch.Tensor):
        keys = [store.sequence_key(row.numpy()) for row in input_ids]
        real = (labels != IGNORE_INDEX).any(-1).tolist()  # sampler padding rows are all ignore_index
        have, missing = [], 0
        for j, key in enumerate(keys):
            if key in self.reader:
                have.append(j)
            elif real[j]:
                if not self.skip:
                    raise store.CacheError(
                        f"teacher cache {self.reader.folder!r} has no targets for the sequence with key {key.hex()} "
                        f"(tokens {input_ids[j, :8].tolist()}...); build the cache for this run's data "
                        "(fastdistill teacher-cache build --config RUN.yaml) or set cache.missing=skip"
                    )
                missing += 1
        k, t_len = self.reader.k, input_ids.shape[1]
        n_t = len(self.reader.temperatures)
        # rows without a record (padding, skipped): distinct dummy indices, never read (all labels ignored)
        out = tg.TopKTargets(
            torch.arange(k).expand(len(keys), t_len, k).clone(),
            torch.full((len(keys), t_len, k), -float(torch.log(torch.tensor(float(k))))),
            torch.zeros(len(keys), t_len, n_t),
            torch.full((len(keys), t_len, n_t), -float("inf")),
            self.reader.temperatures,
        )
        if have:
            got = self.reader.lookup([keys[j] for j in have])
            for name in ("indices", "logprobs", "lse", "log_tail"):
                getattr(out, name)[have] = getattr(got, name).to(getattr(out, name).dtype)
        if len(have) < len(keys):
            labels = labels.clone()
            labels[[j for j in range(len(keys)) if j not in have]] = IGNORE_INDEX
        return labels, out, missing

    def _produce(self, start: int, end: int) -> None:
        try:
            for m in range(start, end):
                input_ids, labels = self.sampler.batch(m)
                labels, topk, missing = self._targets(input_ids, labels)
                while not self._stop.is_set():
                    try:
                        self._queue.put((m, input_ids, labels, topk, missing), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, raised there
            self._queue.put((None, e, None, None, None))

    def batch(self, micro_step: int):
        """(input_ids, labels, TopKTargets, None) of ``micro_step``: the decoded record (in the place of the online
        source's hidden states; no intermediate states). The loss takes it at its KD temperature."""
        if micro_step != self._next:
            raise RuntimeError(f"CachedTeacher: asked for micro step {micro_step}, expected {self._next}")
        try:
            m, input_ids, labels, topk, missing = self._queue.get(timeout=WAIT_S)
        except queue.Empty:
            raise store.CacheError(
                f"teacher cache reader produced nothing for {WAIT_S:.0f} s (micro step {micro_step})"
            ) from None
        if m is None:
            raise input_ids
        self._next += 1
        self.missing += missing
        if self._dump is not None:
            values, indices = topk.at_temperature(self.temperature)
            for j, row in enumerate(input_ids):
                if (labels[j] != IGNORE_INDEX).any():
                    self._dump[store.sequence_key(row.numpy()).hex()] = (values[j].clone(), indices[j].clone())
        return input_ids, labels, topk, None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._dump is not None:
            torch.save(self._dump, f"{os.environ['FASTDISTILL_DEBUG_CACHE_DUMP']}.rank{self.rank}.pt")
