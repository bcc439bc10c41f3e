"""On-policy distillation with a teacher pool: the student pools write the completions, the teacher pool scores them.

    student pool k (onpolicy)                                        teacher pool
    Sampler(m) ─► OnPolicy: prompt ─► student samples ──seqs──►  one forward per (pool, micro step) of the pool's
                                                                 prompt + completion rows ─► payload (hidden / topk)
    fused loss on the completion tokens ◄── ring of D records ◄────────────────────────────┘

Per micro step ``m`` and student pool ``p`` with an ``onpolicy`` section, the draw that decides whether ``m`` is the
student's (``OnPolicy``'s own coin, a pure function of ``(run.seed, m)``) is made on both sides, so the teacher knows
without a message which pools send sequences at ``m`` and which take the data record:

- the pools that train on the data's batch at ``m`` (off-policy pools, and on-policy pools on their off-policy micro
  steps) share the teacher pool's one data forward, exactly as without ``onpolicy``;
- each pool whose step ``m`` is on-policy (generated or replayed) gets its own forward: its students wrote their own
  completions, so no other pool needs those sequences. The student rank reads its prompts from its own copy of the
  data order (the same seeded permutation the teacher pool reads: rows ``[j mb, (j+1) mb)`` of the global batch),
  generates, sends ``prompt + completion`` (one message per teacher rank holding some of its rows), and receives the
  payload of its rows at its own width, so its loss sees the same tensors as the colocated on-policy step.
- each pool whose step ``m`` is a ``seq_kd`` step (``onpolicy.seq_kd``, a step that is not the student's) gets the
  teacher's own samples: the teacher ranks sample the completions of their rows of the pool's prompts with the
  colocated stage's own code (``OnPolicy.sample``: KV cache, a ZeRO-3 teacher gathered once per call, each row's
  generator seeded by its global row id, stopped at the student's end-of-sequence ids, which each student rank sends
  once at start), score ``prompt + completion`` in one forward and send the rows' tokens, completion lengths and
  payload; the student rank rebuilds the batch from its own prompts and those completions (``OnPolicy.batch``).

The teacher pool scores the pools in their configured order (its ranks run ZeRO-3 collectives together, so they must
agree on the order), and the data forward of step ``m`` before the pools' scoring of ``m``. Every wait is a bridge wait
bounded by ``pools.timeout_s``; a pool that generates slowly holds the teacher (and so the other pools) at most until
its sequences arrive, never in a cycle: a student rank sends its sequences before it waits for anything.
"""

from __future__ import annotations

import time

import torch

from fastdistill.train import bridge as bridge_lib
from fastdistill.train import targets as tg
from fastdistill.train.config import ConfigError

TAG_SEQ = 3  # student rank -> teacher rank: prompt + completion rows of one micro step


def width(o: dict, seq_len: int) -> int:
    """The widest ``prompt + completion`` row a pool's ``onpolicy`` section can produce (the messages' fixed width)."""
    prompt = o["prompt_tokens"] if o["prompt"] == "packed" else seq_len
    return prompt + o["max_new_tokens"]


def is_scored(o: dict | None, seed: int, m: int) -> bool:
    """Whether micro step ``m`` of a pool is on-policy (its own sequences, generated or replayed): ``OnPolicy.batch``'s
    first draw. The student side checks that its stage made the same choice."""
    if o is None or not o["fraction"]:
        return False
    from fastdistill.train.onpolicy import _coin

    return _coin(seed, m, 0) < o["fraction"]


def is_teacher_step(o: dict | None, seed: int, m: int) -> bool:
    """Whether micro step ``m`` of a pool trains on the teacher's samples (``seq_kd``, on a step that is not the
    student's): the teacher pool samples the completions of the pool's prompts and scores them."""
    return o is not None and o["seq_kd"] and not is_scored(o, seed, m)


def validate(key: str, name: str, resolved: dict, teacher: dict) -> None:
    """A student pool's resolved ``onpolicy`` section, checked for what a pool supports (``key``: the pool's key)."""
    o = resolved.get("onpolicy")
    if o is None:
        return
    for i, loss in enumerate(resolved["losses"]):
        if loss["type"] in ("hint", "attention", "affinity"):
            raise ConfigError(
                f"{key}.losses[{i}].type: {loss['type']!r} with on-policy steps in a pool: the teacher pool sends the "
                f"intermediate states such losses read with the data's records only, not with the scores of a pool's "
                f"own sequences (pool {name!r}); expected logit_kd / hard_ce losses only, or this pool off-policy "
                f"({key}.onpolicy: null), or the run colocated (without 'pools')"
            )
    limit = (teacher.get("config") or {}).get("max_position_embeddings")
    longest = width(o, resolved["data"]["seq_len"])
    if limit is not None and longest > limit:
        raise ConfigError(
            f"{key}.onpolicy.max_new_tokens: got {o['max_new_tokens']}; prompt + completion need {longest} positions, "
            f"the teacher has max_position_embeddings={limit}; expected max_new_tokens <= "
            f"{limit - longest + o['max_new_tokens']}"
        )


def seq_layout(rows: int, w: int) -> bridge_lib.Layout:
    return bridge_lib.Layout(
        [("step", torch.int64, (1,)), ("width", torch.int64, (1,)), ("input_ids", torch.int64, (rows, w))]
    )


def scored_layout(payload: str, rows: int, w: int, meta: dict, pool: str, tokens: bool = False) -> bridge_lib.Layout:
    """The teacher's answer to a pool's sequences: the payload of ``rows`` rows at the pool's fixed width ``w``; with
    ``tokens`` (a ``seq_kd`` step, the teacher's own samples) also the rows' tokens and completion lengths."""
    fields = [("step", torch.int64, (1,))]
    if tokens:
        fields += [("lengths", torch.int64, (rows,)), ("input_ids", torch.int64, (rows, w))]
    if payload == "hidden":
        fields.append(("hidden", meta["dtype"], (rows, w, meta["hidden_size"])))
    else:
        fields += tg.TopKTargets.wire_layout(rows, w, meta["topk"][pool], len(meta["temperatures"][pool]))
    return bridge_lib.Layout(fields)


def _pad_to(t: torch.Tensor, w: int) -> torch.Tensor:
    """``t`` [B, W, ...] right-padded with zeros to [B, w, ...] (positions no loss reads)."""
    if t.shape[1] == w:
        return t
    out = t.new_zeros((t.shape[0], w, *t.shape[2:]))
    out[:, : t.shape[1]] = t
    return out


# ---------------------------------------------------------------------------------------------------------------
# student side
# ---------------------------------------------------------------------------------------------------------------
class StudentScoring:
    """A student pool rank's on-policy teacher source: ``plan.batch(m)`` comes here when the pool has ``onpolicy``."""

    def __init__(self, plan, stage):
        from fastdistill.train.pools import overlaps

        self.plan, self.stage = plan, stage
        self.o, self.seed = plan.cfg["onpolicy"], plan.cfg["run"]["seed"]
        self.width = width(self.o, plan.cfg["data"]["seq_len"])
        mb = plan.cfg["student"]["deepspeed"]["micro_batch_size"]
        self.sends: list = []  # (teacher global rank, (lo, hi) rows of this rank's batch, sequence layout)
        self.pieces = []  # (teacher global rank, scored-record layout): what the ring posts for an on-policy step
        self.teacher_pieces = []  # the same with the teacher's own samples (a seq_kd step)
        for r in range(plan.layout[0][2]):
            ov = overlaps(plan.rank, r, mb, plan.teacher_mb)
            if ov is not None:
                lo, hi = ov[0] - plan.rank * mb, ov[1] - plan.rank * mb
                self.sends.append((r, (lo, hi), seq_layout(hi - lo, self.width)))
                self.pieces.append((r, scored_layout(plan.payload, hi - lo, self.width, plan.meta, plan.pool)))
                self.teacher_pieces.append(
                    (r, scored_layout(plan.payload, hi - lo, self.width, plan.meta, plan.pool, tokens=True))
                )
        self.scored_records = 0
        self.seq_bytes = 0
        self.teacher_record = None  # the record of the seq_kd step being taken
        if self.o["seq_kd"]:
            # the teacher pool samples with this pool's end-of-sequence ids (the student's, as the colocated stage)
            for r, _, _ in self.sends:
                plan.bridge.send_object(list(stage.eos), r, "the teacher pool to take this pool's end-of-sequence ids")
            stage.remote_teacher = self._teacher_samples

    def scored(self, m: int) -> bool:
        return is_scored(self.o, self.seed, m)

    def pieces_for(self, m: int) -> list:
        """What the ring posts for micro step ``m``: the scores of this rank's own sequences, the teacher's samples
        with their scores, or (None) the data record."""
        if self.scored(m):
            return self.pieces
        if is_teacher_step(self.o, self.seed, m):
            return self.teacher_pieces
        return None

    def _teacher_samples(self, m: int, prompts: list[list[int]]) -> list[list[int]]:
        """``OnPolicy``'s seq_kd step with pools: the completions the teacher pool sampled for this rank's prompts of
        micro step ``m`` (the same rows, prompts and per-row generators as the colocated stage's own sampling)."""
        plan = self.plan
        cat = plan.take(m)
        out = []
        for i, p in enumerate(prompts):
            row, n = cat["input_ids"][i].cpu(), int(cat["lengths"][i])
            if row[: len(p)].tolist() != p:
                raise bridge_lib.PoolFault(
                    f"pools: {plan.describe(plan.global_rank)}: the teacher pool's samples of micro step {m} do not "
                    f"start with this rank's prompt of row {i} (the pools read different data orders)"
                )
            out.append(row[len(p) : len(p) + n].tolist())
        self.teacher_record = cat
        return out

    def batch(self, m: int):
        """(input_ids, labels, teacher target, None) of micro step ``m``."""
        plan = self.plan
        # generates, replays, takes the teacher pool's samples (seq_kd), or the data's batch (read here, unchanged)
        input_ids, labels = self.stage.batch(m)
        kind = self.stage.last_kind
        scored = kind in ("student", "replay")
        if scored != self.scored(m) or (kind == "teacher") != is_teacher_step(self.o, self.seed, m):
            raise RuntimeError(
                f"pools: {plan.describe(plan.global_rank)}: micro step {m} is {kind!r} for the student "
                "but the teacher pool's draw says otherwise (fastdistill.train.onpolicy changed its draws without "
                "pools_onpolicy.is_scored / is_teacher_step)"
            )
        if kind == "teacher":  # the teacher pool's samples, scored in the same step
            cat, self.teacher_record = self.teacher_record, None
            w = input_ids.shape[1]
            fields = {k: v[:, :w].contiguous() for k, v in cat.items() if k not in ("step", "lengths", "input_ids")}
            self.scored_records += 1
            return input_ids, labels, plan.target(fields), None
        if not scored:  # the teacher pool's one data forward, shared with the other pools
            return plan.batch_data(m)
        w = input_ids.shape[1]
        step = torch.tensor([m], dtype=torch.int64)
        works = []
        for r, (lo, hi), lay in self.sends:
            msg = lay.pack(
                {
                    "step": step,
                    "width": torch.tensor([w], dtype=torch.int64),
                    "input_ids": _pad_to(input_ids[lo:hi].cpu(), self.width),
                }
            )
            works.append((r, msg, plan.bridge.isend(msg, r, TAG_SEQ)))
            self.seq_bytes += lay.nbytes
        cat = plan.take(m)
        for r, _, work in works:  # answered, so long received; the buffers may go
            plan.bridge.wait(work, r, f"the teacher pool to take the sequences of micro step {m}")
        self.scored_records += 1
        cat = {k: v[:, :w].contiguous() if k != "step" else v for k, v in cat.items()}
        return input_ids, labels, plan.target(cat), None


# ---------------------------------------------------------------------------------------------------------------
# teacher side
# ---------------------------------------------------------------------------------------------------------------
class TeacherScoring:
    """The teacher pool rank's side: which pools need the data forward at ``m`` and the scoring of the others."""

    def __init__(self, plan, teacher, weight, meta: dict, in_flight: dict, teacher_model, sampler, tokenizer):
        import copy

        from fastdistill.train.onpolicy import OnPolicy
        from fastdistill.train.pools import overlaps

        self.plan, self.teacher, self.weight, self.meta, self.in_flight = plan, teacher, weight, meta, in_flight
        self.teacher_model, self.sampler = teacher_model, sampler
        self.teacher_layouts = {}  # (seq_kd pool, student global rank) -> the layout of the teacher's samples
        self.stages = {}  # seq_kd pools: the on-policy stage that samples with the teacher for this rank's rows
        self.pools = []  # (name, onpolicy, seed, payload, width, [(global rank, lo, hi, seq layout, record layout)])
        for name, first, size in plan.layout[1:]:
            cfg = plan.students[name]["config"]
            o = cfg.get("onpolicy")
            if o is None:
                continue
            w = width(o, cfg["data"]["seq_len"])
            payload = plan.students[name]["payload"]
            mb = cfg["student"]["deepspeed"]["micro_batch_size"]
            srcs = []
            for j in range(size):
                ov = overlaps(j, plan.rank, mb, plan.teacher_mb)
                if ov is not None:
                    lo, hi = ov[0] - plan.rank * plan.teacher_mb, ov[1] - plan.rank * plan.teacher_mb
                    rows = hi - lo
                    srcs.append((first + j, lo, hi, seq_layout(rows, w), scored_layout(payload, rows, w, meta, name)))
            self.pools.append((name, o, cfg["run"]["seed"], payload, w, srcs))
            if o["seq_kd"]:
                for g, lo, hi, _, _ in srcs:
                    self.teacher_layouts[(name, g)] = scored_layout(payload, hi - lo, w, meta, name, tokens=True)
                # the colocated stage's own sampling, on this teacher rank's rows of the global batch: its rows are
                # the global rows [rank * teacher_mb, ...), so each row gets the generator the colocated run gives it
                scfg = copy.deepcopy(cfg)
                scfg["student"]["deepspeed"]["micro_batch_size"] = plan.teacher_mb
                stage = OnPolicy(scfg, sampler, teacher_model, teacher_model, tokenizer, plan.rank, plan.size)
                eos = [plan.bridge.recv_object(g, f"the end-of-sequence ids of pool {name!r}") for g, *_ in srcs]
                if any(e != eos[0] for e in eos):
                    raise bridge_lib.PoolFault(f"pools: the ranks of pool {name!r} sent different eos ids {eos}")
                stage.eos = eos[0]  # the student's (the colocated stage stops the teacher's samples at those)
                self.stages[name] = stage
        self.generations = {name: 0 for name in self.stages}
        self.generate_s = 0.0
        self.onpolicy = {name: (o, seed) for name, o, seed, *_ in self.pools}
        self.forwards = {name: 0 for name, *_ in self.pools}
        self.data_forwards = 0
        self.seconds = self.wait_s = 0.0
        self.bytes_sent = 0

    def scored(self, pool: str, m: int) -> bool:
        o, seed = self.onpolicy.get(pool, (None, 0))
        return is_scored(o, seed, m)

    def takes_data(self, pool: str, m: int) -> bool:
        """Pool ``pool`` trains on the data's batch at ``m`` (not on its own nor on the teacher's samples)."""
        o, seed = self.onpolicy.get(pool, (None, 0))
        return not is_scored(o, seed, m) and not is_teacher_step(o, seed, m)

    def data_needed(self, m: int) -> bool:
        """Some pool trains on the data's batch at ``m`` (an off-policy pool, or an on-policy pool's data step)."""
        return any(self.takes_data(name, m) for name, *_ in self.plan.layout[1:])

    def score(self, m: int) -> int:
        """One forward per pool whose step ``m`` is on-policy, on the rows its ranks sent; returns the forwards."""
        plan, n = self.plan, 0
        for name, o, seed, payload, w, srcs in self.pools:
            if is_teacher_step(o, seed, m):
                n += self._sample_and_score(name, payload, w, srcs, m)
                continue
            if not is_scored(o, seed, m):
                continue
            t0 = time.perf_counter()
            works = []
            for g, _, _, seq_lay, _ in srcs:
                buf = seq_lay.empty()
                works.append((g, seq_lay, buf, plan.bridge.irecv(buf, g, TAG_SEQ)))
            rows, widths = [], []
            for g, seq_lay, buf, work in works:
                plan.bridge.wait(work, g, f"the sequences of micro step {m} (pool {name!r})")
                got = seq_lay.unpack(buf)
                if int(got["step"]) != m:
                    raise bridge_lib.PoolFault(
                        f"pools: {plan.describe(g)} sent the sequences of micro step {int(got['step'])}, expected {m}"
                    )
                rows.append(got["input_ids"])
                widths.append(int(got["width"]))
            t1 = time.perf_counter()
            self.wait_s += t1 - t0
            used = max(widths)  # the widest row of this teacher rank's share: the colocated step's own width
            input_ids = torch.cat(rows)[:, :used].contiguous()
            fields = self._payload(name, payload, input_ids, w)
            n += 1
            self.forwards[name] += 1
            self._send(m, srcs, fields, lambda s: s[4])
            del fields
            self.seconds += time.perf_counter() - t1
        return n

    def _payload(self, name: str, payload: str, input_ids: torch.Tensor, w: int) -> dict:
        """The teacher's forward on ``input_ids`` as pool ``name``'s payload fields, padded to its width ``w``."""
        with torch.no_grad():
            hidden, _ = self.teacher(input_ids)
            if payload == "hidden":
                return {"hidden": _pad_to(hidden, w)}
            kd = self.meta["topk"][name], self.meta["temperatures"][name]
            with _gathered(self.weight):
                rec = tg.topk_from_hidden(hidden, self.weight, *kd)
            return {k: _pad_to(v, w) for k, v in rec.wire().items()}

    def _send(self, m: int, srcs: list, fields: dict, layout_of) -> None:
        """Rows ``[lo, hi)`` of ``fields`` to each student rank of a pool (``layout_of(src)``: its record layout)."""
        from fastdistill.train.pools import TAG_RECORD

        plan, step = self.plan, torch.tensor([m], dtype=torch.int64)
        for src in srcs:
            g, lo, hi, lay = src[0], src[1], src[2], layout_of(src)
            q = self.in_flight[g]
            if len(q) >= plan.ring:  # backpressure, shared with the data records to this rank
                plan.bridge.wait(q.popleft(), g, f"room in the ring (micro step {m})")
            msg = lay.pack({"step": step, **{k: v[lo:hi] for k, v in fields.items()}})
            q.append(plan.bridge.isend(msg, g, TAG_RECORD))
            self.bytes_sent += lay.nbytes

    def _sample_and_score(self, name: str, payload: str, w: int, srcs: list, m: int) -> int:
        """A seq_kd step of pool ``name``: the teacher samples the completions of this rank's rows of the pool's
        prompts (``OnPolicy.sample``: KV cache, a ZeRO-3 teacher's parameters gathered once for the call, every
        teacher rank at the same step), scores prompt + completion in one forward, and sends each student rank its
        rows' tokens, completion lengths and payload."""
        from fastdistill.train.onpolicy import TEACHER_SALT, completion_batch

        stage, t0 = self.stages[name], time.perf_counter()
        input_ids, labels = self.sampler.batch(m)  # this teacher rank's rows of the global batch, as the pools read
        prompts, real = stage.prompts(input_ids, labels)
        completions = stage.sample(self.teacher_model, prompts, m, TEACHER_SALT)
        pad = stage.eos[0] if stage.eos else 0
        seqs, _ = completion_batch(prompts, completions, real, pad)
        t1 = time.perf_counter()
        self.generate_s += t1 - t0
        self.generations[name] += 1
        fields = self._payload(name, payload, seqs, w)
        full = torch.full((len(seqs), w), pad, dtype=torch.int64)
        full[:, : seqs.shape[1]] = seqs
        fields.update(input_ids=full, lengths=torch.tensor([len(c) for c in completions], dtype=torch.int64))
        self.forwards[name] += 1
        self._send(m, srcs, fields, lambda s: self.teacher_layouts[(name, s[0])])
        self.seconds += time.perf_counter() - t1
        return 1

    def summary(self) -> dict:
        return {
            "data_forwards": self.data_forwards,
            "onpolicy_forwards": dict(self.forwards),
            "onpolicy_forward_seconds": self.seconds,
            "onpolicy_wait_seconds": self.wait_s,  # waiting for the students' sequences (their generation)
            "onpolicy_bytes_sent": self.bytes_sent,
            "seq_kd_generations": dict(self.generations),  # the teacher's sampling calls per seq_kd pool
            "seq_kd_generate_seconds": self.generate_s,
        }


def _gathered(weight):
    from fastdistill.train import models

    return models.gathered([weight])
