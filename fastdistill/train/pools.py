"""Pools: one ``deepspeed`` launch split into a teacher pool and K student pools (see README "Teacher and student
pools").

    teacher pool (ZeRO-3, its own world)                          student pool k (its own world, its own engine)
    Sampler(global batch G) ─► teacher forward ─► record ──bridge──► ring of D buffers ─► fused loss ─► engine.step
                                    (one forward per micro step, sent to all K pools)

The teacher pool owns the data order: micro step ``m`` is rows ``[m G, (m + 1) G)`` of the seeded permutation the
colocated trainer uses, the teacher rank ``r`` runs rows ``[r G/Pt, (r+1) G/Pt)`` and sends each student rank exactly
the rows that rank trains on (token ids, labels and the payload). Payloads, per student pool:

- ``hidden``: the teacher's final hidden states; the pool holds a frozen copy of the teacher's lm_head (sent once
  at start) and gets exact dense KD through ``fused_linear_distill_loss``;
- ``topk``: the teacher target record of the teacher cache, ``fastdistill.train.targets.TopKTargets`` (top-k
  indices and log-probs at the distillation temperature, the log-sum-exp and the exact log tail mass), sent in its
  uncoded wire form and trained through the fused top-k loss exactly as a cached record is.

With ``hint`` / ``affinity`` / ``attention`` losses, a pool's record also carries the teacher's intermediate hidden
states or attention q / k of the layers those losses read, captured in the same forward (``pools_intermediate``).

A student pool's run is ``recipe.run`` itself with a :class:`PoolPlan` as its teacher source; the teacher pool runs
:func:`serve_teacher`, the same teacher engine writing records to the bridge instead of to the loss.

Checkpoints commit in two phases: every student pool saves ``step{s}`` into its own folder and its rank 0 reports to
the teacher pool's rank 0, which then writes ``<run.output_dir>/pools_commit.json``; ``run.resume: auto`` resumes
every pool from the committed step only.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import signal
import sys
import time

import torch

from fastdistill.train import bridge as bridge_lib
from fastdistill.train import pools_intermediate, pools_onpolicy
from fastdistill.train import targets as tg
from fastdistill.train.config import ConfigError

COMMIT = "pools_commit.json"
PAYLOADS = ("hidden", "topk")
TAG_RECORD, TAG_ACK = 0, 2
POOL_KEYS = ("name", "ranks", "nodes", "payload", "student", "losses", "output_dir", "onpolicy")


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------
def _size_of(spec: dict, key: str) -> dict:
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: expected a mapping with 'ranks' or 'nodes', got {spec!r}")
    given = {k: spec[k] for k in ("ranks", "nodes") if spec.get(k) is not None}
    if len(given) != 1:
        raise ConfigError(f"{key}: expected exactly one of 'ranks' or 'nodes', got {sorted(given) or 'neither'}")
    ((k, v),) = given.items()
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{key}.{k}: got {v!r}; expected an integer >= 1 (an empty pool is not allowed)")
    return given


def validate_pools(cfg: dict, validate) -> dict:
    """Resolve ``cfg["pools"]`` (``cfg`` otherwise validated): every student pool's config is the top-level one with
    its ``student`` merged, its ``losses`` and output folder, validated by ``validate`` itself (errors are prefixed
    with the pool's key)."""
    pools = cfg["pools"]
    if not isinstance(pools, dict):
        raise ConfigError(f"pools: expected a mapping (teacher, students, ring, timeout_s), got {pools!r}")
    known = ("teacher", "students", "ring", "timeout_s", "dead_after_s")
    unknown = [k for k in pools if k not in known]
    if unknown:
        raise ConfigError(f"unknown key 'pools.{unknown[0]}'; expected one of {sorted(known)}")
    out = {
        "teacher": _size_of(pools.get("teacher"), "pools.teacher"),
        "ring": pools.get("ring", 2),
        "timeout_s": pools.get("timeout_s", 300.0),
        "dead_after_s": pools.get("dead_after_s", 30.0),
        "students": [],
    }
    if not isinstance(out["ring"], int) or isinstance(out["ring"], bool) or out["ring"] < 1:
        raise ConfigError(f"pools.ring: got {out['ring']!r}; expected an integer >= 1 (records in flight per pool)")
    for key in ("timeout_s", "dead_after_s"):
        t = out[key]
        if not isinstance(t, (int, float)) or isinstance(t, bool) or t < 3:
            raise ConfigError(f"pools.{key}: got {t!r}; expected a number of seconds >= 3")
    students = pools.get("students")
    if not isinstance(students, list) or not students:
        raise ConfigError(f"pools.students: expected a non-empty list of student pools, got {students!r}")
    kinds = {"ranks" in out["teacher"]}
    names = set()
    for i, sp in enumerate(students):
        key = f"pools.students[{i}]"
        if not isinstance(sp, dict):
            raise ConfigError(f"{key}: expected a mapping (name, ranks or nodes, payload, student, losses), got {sp!r}")
        bad = [k for k in sp if k not in POOL_KEYS]
        if bad:
            raise ConfigError(f"unknown key '{key}.{bad[0]}'; expected one of {sorted(POOL_KEYS)}")
        name = sp.get("name")
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{key}.name: got {name!r}; expected a folder-safe name (letters, digits, - and _)")
        if name in names or name == "teacher":
            raise ConfigError(f"{key}.name: {name!r} is used twice (or is 'teacher'); expected unique pool names")
        names.add(name)
        size = _size_of(sp, key)
        kinds.add("ranks" in size)
        payload = sp.get("payload", "hidden")
        if payload not in PAYLOADS:
            raise ConfigError(f"{key}.payload: got {payload!r}; expected one of {list(PAYLOADS)}")
        sub = copy.deepcopy({k: v for k, v in cfg.items() if k != "pools"})
        given_student = sp.get("student") or {}
        if not isinstance(given_student, dict):
            raise ConfigError(f"{key}.student: expected a mapping (the student section), got {given_student!r}")
        if any(given_student.get(k) is not None for k in ("model", "config", "init_from_teacher")):
            for k in ("model", "config", "init_from_teacher"):  # the pool names its own student: drop the base one's
                sub["student"][k] = None
        sub["student"] = _merge(sub["student"], given_student)
        if sp.get("losses") is not None:
            sub["losses"] = sp["losses"]
        if "onpolicy" in sp:  # this pool's own on-policy settings (null: off-policy), else the top-level section
            sub["onpolicy"] = sp["onpolicy"]
        sub["run"]["output_dir"] = sp.get("output_dir") or os.path.join(cfg["run"]["output_dir"], name)
        if sub["run"]["resume"] not in ("auto", "never"):
            raise ConfigError(
                f"run.resume: got {sub['run']['resume']!r}; with pools expected 'auto' (the committed step) or 'never'"
            )
        try:
            resolved = validate(sub)
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
        for loss in resolved["losses"]:  # hint / attention / affinity: checked against the teacher when it is built
            if loss["type"] == "logit_kd" and payload == "topk" and not loss.get("topk"):
                raise ConfigError(
                    f"{key}.payload: 'topk' sends top-k records, but its logit_kd loss has no 'topk: K'; set "
                    f"losses[].topk or use payload 'hidden'"
                )
        pools_onpolicy.validate(key, name, resolved, cfg["teacher"])
        if resolved["run"]["loss_impl"] != "fused":
            raise ConfigError(f"{key}: run.loss_impl {resolved['run']['loss_impl']!r}; pools expect 'fused'")
        out["students"].append({"name": name, **size, "payload": payload, "config": resolved})
    if len(kinds) != 1:
        raise ConfigError("pools: expected every pool sized the same way, all by 'ranks' or all by 'nodes'")
    ga = {s["config"]["student"]["deepspeed"]["gradient_accumulation_steps"] for s in out["students"]}
    if len(ga) != 1:
        raise ConfigError(f"pools.students: gradient_accumulation_steps differ ({sorted(ga)}); expected one value")
    return out


def _merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "config" else v
    return out


# ---------------------------------------------------------------------------------------------------------------
# the plan: which ranks are which pool, which rows go where
# ---------------------------------------------------------------------------------------------------------------
def assign_ranks(pools: dict, world: int, node_of: list[int]) -> list[tuple[str, int, int]]:
    """``[(pool name, first global rank, size)]``: the teacher pool first, then the student pools in order, each a
    contiguous block of ranks (by count, or by whole nodes in hostfile order: the launcher numbers ranks node by
    node)."""
    entries = [("teacher", pools["teacher"])] + [(s["name"], s) for s in pools["students"]]
    out, first = [], 0
    if "ranks" in pools["teacher"]:
        for name, spec in entries:
            out.append((name, first, spec["ranks"]))
            first += spec["ranks"]
        if first != world:
            raise ConfigError(
                f"pools: the pools' ranks add up to {first} ({', '.join(f'{n}={s}' for n, _, s in out)}), "
                f"the launch has {world} ranks; expected them to add up to the launch's"
            )
        return out
    nodes = sorted(set(node_of))
    node = 0
    for name, spec in entries:
        mine = nodes[node : node + spec["nodes"]]
        node += spec["nodes"]
        ranks = [r for r in range(world) if node_of[r] in mine]
        out.append((name, ranks[0] if ranks else first, len(ranks)))
        first += len(ranks)
    if node != len(nodes) or any(size == 0 for _, _, size in out):
        raise ConfigError(
            f"pools: the pools ask for {node} nodes, the launch has {len(nodes)}; "
            "expected them to add up (no empty pool)"
        )
    return out


def overlaps(a: int, b: int, size_a: int, size_b: int):
    """Rows of the global batch held by both rank ``a`` (blocks of ``size_a``) and rank ``b`` (blocks of
    ``size_b``): ``[(lo, hi)]`` or ``[]``."""
    lo, hi = max(a * size_a, b * size_b), min((a + 1) * size_a, (b + 1) * size_b)
    return (lo, hi) if lo < hi else None


def global_batch(pools: dict, layout: list[tuple[str, int, int]]) -> tuple[int, int]:
    """(G, teacher micro batch): every student pool trains on the same G = micro_batch_size x ranks sequences per micro
    step, and the teacher pool's ranks split them evenly."""
    students = {s["name"]: s for s in pools["students"]}
    g = {n: students[n]["config"]["student"]["deepspeed"]["micro_batch_size"] * size for n, _, size in layout[1:]}
    if len(set(g.values())) != 1:
        raise ConfigError(
            "pools.students: micro_batch_size x ranks differ between pools "
            f"({', '.join(f'{n}={v}' for n, v in g.items())}); expected one global batch for all"
        )
    total, t_size = next(iter(g.values())), layout[0][2]
    if total % t_size:
        raise ConfigError(
            f"pools.teacher: the global batch of {total} sequences cannot be divided over {t_size} teacher ranks; "
            "expected a number of teacher ranks that divides it"
        )
    return total, total // t_size


class PoolPlan:
    """This rank's pool, its world and the bridge; for a student rank also its teacher source (:meth:`receive`)."""

    def __init__(self, cfg: dict):
        self.cfg_all = cfg
        pools = cfg["pools"]
        self.ring, self.timeout_s = pools["ring"], float(pools["timeout_s"])
        self.global_rank, self.global_size, host, port = bridge_lib.launch_env()
        store = bridge_lib.open_store(host, port, self.global_rank, self.global_size, self.timeout_s)
        # node of every rank (the launcher's CROSS_RANK), shared through the store
        store.set(f"node/{self.global_rank}", os.environ.get("CROSS_RANK", "0"))
        node_of = [int(store.get(f"node/{r}")) for r in range(self.global_size)]
        try:  # a plan that does not fit the launch: one line (from global rank 0) and exit code 2 on every rank
            self.layout = assign_ranks(pools, self.global_size, node_of)
            self.global_batch, self.teacher_mb = global_batch(pools, self.layout)
        except ConfigError as e:
            if self.global_rank == 0:
                print(f"fastdistill train: config error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        self.students = {s["name"]: s for s in pools["students"]}
        for name, first, size in self.layout:
            if first <= self.global_rank < first + size:
                self.pool, self.first, self.size = name, first, size
        self.rank = self.global_rank - self.first
        self.is_teacher = self.pool == "teacher"
        self.cfg = cfg if self.is_teacher else self.students[self.pool]["config"]
        self.heartbeat = bridge_lib.Watchdog(
            host, port, self.global_rank, self.global_size, pools["dead_after_s"], self.describe
        )
        self.heartbeat.install_excepthook()
        if self.global_rank == 0:
            print("fastdistill: pools: " + ", ".join(self.describe_block(*x) for x in self.layout), flush=True)
        self.audit = bridge_lib.CollectiveAudit() if os.environ.get("FASTDISTILL_POOLS_AUDIT") else None
        bridge_lib.init_pool_world(store, self.pool, self.rank, self.size, self.timeout_s)
        self.bridge = bridge_lib.Bridge(
            store, self.global_rank, self.global_size, self.timeout_s, self.describe, self.heartbeat
        )
        self.wait_s = self.lead = 0.0
        self.records = 0
        self.records_total = 0
        self.bytes = self.tokens = self.bytes_total = self.tokens_total = 0  # records received: data or scored
        self.acks: list = []
        self.onpolicy = None  # with `onpolicy`: pools_onpolicy.StudentScoring (attach_onpolicy)

    # -- naming ------------------------------------------------------------------------------------------------------
    @staticmethod
    def describe_block(name: str, first: int, size: int) -> str:
        pool = "teacher pool" if name == "teacher" else f"pool {name!r}"
        return f"{pool} = global ranks {first}..{first + size - 1}"

    def describe(self, global_rank: int) -> str:
        for name, first, size in self.layout:
            if first <= global_rank < first + size:
                pool = "teacher pool" if name == "teacher" else f"student pool {name!r}"
                return f"{pool} rank {global_rank - first} (global rank {global_rank})"
        return f"global rank {global_rank}"

    # -- rows and layouts ----------------------------------------------------------------------------------------------
    def student_ranks(self):
        """``[(pool name, pool rank, global rank, micro batch)]`` of every student rank."""
        out = []
        for name, first, size in self.layout[1:]:
            mb = self.students[name]["config"]["student"]["deepspeed"]["micro_batch_size"]
            out += [(name, j, first + j, mb) for j in range(size)]
        return out

    def record_layout(self, pool: str, rows: int, meta: dict) -> bridge_lib.Layout:
        """The message of ``rows`` sequences for student pool ``pool`` (same on both ends)."""
        payload = self.students[pool]["payload"]
        seq = self.cfg_all["data"]["seq_len"]
        fields = [
            ("step", torch.int64, (1,)),
            ("input_ids", torch.int64, (rows, seq)),
            ("labels", torch.int64, (rows, seq)),
        ]
        if payload == "hidden":
            fields.append(("hidden", meta["dtype"], (rows, seq, meta["hidden_size"])))
        else:  # the teacher cache's record, uncoded
            fields += tg.TopKTargets.wire_layout(rows, seq, meta["topk"][pool], len(meta["temperatures"][pool]))
        # the teacher states this pool's hint / affinity / attention losses read (none for lm-head losses only)
        fields += [(name, dtype, (rows, *shape)) for name, dtype, shape in meta["intermediates"].get(pool, ())]
        return bridge_lib.Layout(fields)

    # -- student side ----------------------------------------------------------------------------------------------
    def handshake(self) -> dict:
        """Sizes from the teacher pool (and its lm_head for a ``hidden`` pool): ``{"hidden_size", "vocab_size",
        "dtype", "topk", "temperatures", "intermediates", "lm_head"}`` (``topk`` / ``temperatures``: each pool's
        record's k and temperatures; ``intermediates``: each pool's intermediate-state fields, see
        ``pools_intermediate``)."""
        meta = self.bridge.recv_object(0, "the teacher pool's handshake")
        from deepspeed.accelerator import get_accelerator

        self.device = torch.device(get_accelerator().current_device_name())  # the bridge stages through host memory
        if meta["lm_head"] is not None:
            meta["lm_head"] = meta["lm_head"].to(self.device).requires_grad_(False)
        self.meta = meta
        self.payload = self.students[self.pool]["payload"]
        mb = self.cfg["student"]["deepspeed"]["micro_batch_size"]
        self.pieces = []  # (teacher global rank, layout) in row order
        for r in range(self.layout[0][2]):
            ov = overlaps(self.rank, r, mb, self.teacher_mb)
            if ov is not None:
                self.pieces.append((r, self.record_layout(self.pool, ov[1] - ov[0], meta)))
        return meta

    def local_teacher(self):
        """A plain (unsharded) copy of the teacher in this pool, only to initialise the student from its layers."""
        from fastdistill.train import models

        t = self.cfg["teacher"]
        torch.manual_seed(self.cfg["run"]["seed"])
        return models.build_causal_lm(t["model"], t["config"], t["dtype"], t["gguf_file"])

    def start(self, start_micro: int) -> None:
        """Post the ring of ``pools.ring`` receives from micro step ``start_micro`` on."""
        self.slots: collections.deque = collections.deque()
        for m in range(start_micro, min(start_micro + self.ring, self.total_micro)):
            self._post(m)

    @property
    def total_micro(self) -> int:
        return self.cfg["schedule"]["max_steps"] * self.cfg["student"]["deepspeed"]["gradient_accumulation_steps"]

    def attach_onpolicy(self, stage) -> None:
        """This pool's on-policy stage (``fastdistill.train.onpolicy.OnPolicy``): on its on-policy micro steps the
        rank sends its own sequences to the teacher pool and receives their scores (before :meth:`start`)."""
        self.onpolicy = pools_onpolicy.StudentScoring(self, stage)

    def _post(self, m: int) -> None:
        pieces = self.onpolicy.pieces_for(m) if self.onpolicy is not None else None
        bufs = [(src, lay, lay.empty()) for src, lay in (self.pieces if pieces is None else pieces)]
        works = [self.bridge.irecv(buf, src, TAG_RECORD) for src, _, buf in bufs]
        self.slots.append((m, bufs, works))

    def receive(self, m: int):
        """(input_ids, labels, teacher target, teacher states) of micro step ``m``: the hidden states tensor, or the
        top-k record (``TopKTargets``); the intermediate states this pool's losses read, or None."""
        cat = self.take(m)
        return cat["input_ids"], cat["labels"], self.target(cat), self.states(cat)

    def take(self, m: int) -> dict:
        """The fields of micro step ``m``'s record (on this rank's device). Waits (bounded by ``pools.timeout_s``)
        only when the teacher has not delivered yet; the wait and the number of records already waiting (the
        teacher's lead) are kept."""
        slot_m, bufs, works = self.slots.popleft()
        assert slot_m == m, (slot_m, m)
        self.lead += sum(all(w.is_completed() for w in self.slots[i][2]) for i in range(len(self.slots)))
        t0 = time.perf_counter()
        parts = []
        for (src, lay, buf), work in zip(bufs, works):
            self.bridge.wait(work, src, f"the teacher record of micro step {m}")
            parts.append(lay.unpack(buf))
        self.wait_s += time.perf_counter() - t0
        self.records += 1
        self.records_total += 1
        self.bytes += sum(lay.nbytes for _, lay, _ in bufs)
        self.tokens += sum(lay.tokens for _, lay, _ in bufs)
        for p in parts:
            if int(p["step"]) != m:
                raise bridge_lib.PoolFault(
                    f"pools: {self.describe(self.global_rank)} expected the record of micro "
                    f"step {m}, got {int(p['step'])}"
                )
        cat = {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k].clone() for k in parts[0]}
        if m + self.ring < self.total_micro:
            self._post(m + self.ring)
        return {k: v.to(self.device, non_blocking=True) for k, v in cat.items()}

    def target(self, cat: dict):
        """The teacher target of a record's fields: the hidden states tensor, or the top-k record."""
        if self.payload == "hidden":
            return cat["hidden"]
        return tg.TopKTargets.from_wire(cat, self.meta["temperatures"][self.pool])

    def states(self, cat: dict):
        """The intermediate teacher states of a record's fields that this pool's losses read (None when none)."""
        return pools_intermediate.teacher_states(cat, self.meta["intermediates"].get(self.pool))

    def batch(self, m: int):
        """The teacher-source interface of the recipe (as ``OnlineTeacher`` and ``CachedTeacher``): (input_ids,
        labels, teacher target, teacher states or None) of micro step ``m``."""
        if self.onpolicy is not None:  # the student writes the sequences of its on-policy steps
            return self.onpolicy.batch(m)
        return self.batch_data(m)

    def batch_data(self, m: int):
        return self.receive(m)

    def take_stats(self) -> dict:
        """Stats since the last call: student wait seconds, records received, mean teacher lead (records ready),
        bytes per token of the records received (data records, or the scores of the pool's own sequences)."""
        out = {
            "wait_s": self.wait_s,
            "records": self.records,
            "lead": self.lead / max(self.records, 1),
            "bytes_per_token": self.bytes / max(self.tokens, 1),
        }
        self.bytes_total, self.tokens_total = self.bytes_total + self.bytes, self.tokens_total + self.tokens
        self.wait_s = self.lead = 0.0
        self.records = self.bytes = self.tokens = 0
        return out

    @property
    def bytes_per_token_total(self) -> float:
        """Bytes per token over every record received so far (the pool's summary)."""
        return (self.bytes_total + self.bytes) / max(self.tokens_total + self.tokens, 1)

    def committed(self) -> int:
        """The last committed step (0 when none, or with run.resume: never)."""
        if self.cfg["run"]["resume"] == "never":
            return 0
        path = os.path.join(self.cfg_all["run"]["output_dir"], COMMIT)
        if not os.path.isfile(path):
            return 0
        with open(path) as f:
            return int(json.load(f)["step"])

    def resume_folder(self, step: int) -> str | None:
        if step == 0:
            return None
        folder = os.path.join(self.cfg["run"]["output_dir"], "checkpoints", f"step{step:07d}")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"pools: committed step {step} but {folder!r} is missing ({self.pool})")
        return folder

    def saved(self, step: int) -> None:
        """Phase one of the commit: this pool has saved ``step`` on all its ranks (after the save's barrier)."""
        if self.rank == 0:  # not waited for here: the teacher pool takes it when it is D steps further
            ack = torch.tensor([step], dtype=torch.int64)
            self.acks.append((step, ack, self.bridge.isend(ack, 0, TAG_ACK)))

    def close(self) -> None:
        for step, _, work in self.acks:
            self.bridge.wait(work, 0, f"the teacher pool to take the checkpoint report of step {step}")
        self.acks = []
        if self.audit is not None:
            self.audit.write(
                os.path.join(self.cfg_all["run"]["output_dir"], "audit", f"rank{self.global_rank}.json"),
                pool=self.pool,
                pool_size=self.size,
                launch_size=self.global_size,
            )
        self.heartbeat.done(wait_for_all_s=self.timeout_s)


# ---------------------------------------------------------------------------------------------------------------
# the teacher pool
# ---------------------------------------------------------------------------------------------------------------
def serve_teacher(cfg: dict, plan: PoolPlan) -> dict:
    """The teacher pool's loop: one forward per micro step, records to every student rank, commits."""
    import torch.distributed as dist

    from fastdistill.train import models, recipe

    t_start = time.time()
    rank, world = plan.rank, plan.size
    if cfg["run"]["threads"]:
        torch.set_num_threads(cfg["run"]["threads"])
    out_dir = os.path.join(cfg["run"]["output_dir"], "teacher")
    os.makedirs(out_dir, exist_ok=True)
    tcfg = copy.deepcopy(cfg)
    tcfg["student"]["deepspeed"]["micro_batch_size"] = plan.teacher_mb
    tokenizer, train_seqs, _ = recipe.prepare_data(tcfg, rank)
    from fastdistill.train import data as data_lib

    sampler = data_lib.Sampler(train_seqs, plan.teacher_mb, rank, world, cfg["run"]["seed"])
    torch.manual_seed(cfg["run"]["seed"])
    teacher, teacher_model = recipe.build_teacher(tcfg, world)
    weight = teacher_model.get_output_embeddings().weight
    mem = recipe.teacher_memory(teacher_model, world)
    all_mem = [None] * world
    dist.all_gather_object(all_mem, mem)

    # -- handshake: sizes, and the lm_head for the pools that take hidden states ---------------------------------
    students = plan.student_ranks()
    topk, temps = {}, {}
    for name, s in plan.students.items():
        kd = next((x for x in s["config"]["losses"] if x["type"] == "logit_kd"), None)
        topk[name] = (kd or {}).get("topk") or 1  # a hard_ce-only topk pool still gets a (tiny) record
        temps[name] = (float(kd["temperature"]) if kd else 1.0,)
    meta = {
        "hidden_size": teacher_model.config.hidden_size,
        "dtype": models.torch_dtype(cfg["teacher"]["dtype"]),
        "topk": topk,
        "temperatures": temps,
        "vocab_size": teacher_model.config.vocab_size,
    }
    # the states the pools' hint / affinity / attention losses read, captured in the same forward (a ConfigError
    # naming the loss's layer_map for a layer the teacher does not have)
    mid = pools_intermediate.TeacherIntermediates(plan.students, teacher_model, meta["dtype"], cfg["data"]["seq_len"])
    meta["intermediates"] = mid.layouts
    need_head = any(s["payload"] == "hidden" for s in plan.students.values())
    with models.gathered([weight]):
        head = weight.detach().clone() if need_head and rank == 0 else None
    if rank == 0:
        for name, _, g, _ in students:
            m = dict(meta, lm_head=head if plan.students[name]["payload"] == "hidden" else None)
            plan.bridge.send_object(m, g, "the handshake")

    # -- destinations of this teacher rank: (global rank, pool, payload, row slice, layout) -----------------------
    dests = []
    for name, j, g, mb in students:
        ov = overlaps(j, rank, mb, plan.teacher_mb)
        if ov is None:
            continue
        lo, hi = ov[0] - rank * plan.teacher_mb, ov[1] - rank * plan.teacher_mb
        payload = plan.students[name]["payload"]
        dests.append((g, name, payload, lo, hi, plan.record_layout(name, hi - lo, meta)))
    in_flight = {g: collections.deque() for g, *_ in dests}
    # the pools with `onpolicy`: scoring their own sequences, and sampling (then scoring) the seq_kd ones' steps
    scoring = pools_onpolicy.TeacherScoring(plan, teacher, weight, meta, in_flight, teacher_model, sampler, tokenizer)
    need_topk = {(topk[n], temps[n]) for _, n, p, *_ in dests if p == "topk"}
    # every teacher rank runs the gathered-lm_head top-k (a pool collective) the same number of times
    all_need = [None] * world
    dist.all_gather_object(all_need, sorted(need_topk))
    need_topk_all = sorted({tuple(x) for per in all_need for x in per})

    start = plan.committed()
    ga = cfg_ga(plan)
    max_steps = cfg["schedule"]["max_steps"]
    pending = reported_steps(cfg, start)
    kill = fault_hook("teacher", rank)
    reports = post_reports(plan, pending) if rank == 0 else {}
    forwards, t_fwd, t_send, bytes_sent = 0, 0.0, 0.0, 0
    if rank == 0:
        print(
            f"fastdistill: teacher pool: {world} ranks, {mem['param_bytes_held'] / 2**20:.1f} of "
            f"{mem['param_bytes_full'] / 2**20:.1f} MiB of parameters on rank 0; global batch {plan.global_batch}; "
            f"serving {len(plan.students)} student pools from step {start}",
            flush=True,
        )
    t_loop, cpu_loop = time.time(), time.process_time()
    for m in range(start * ga, max_steps * ga):
        # the data's batch, scored once for every pool that trains on it at m (see pools_onpolicy for the others)
        if scoring.data_needed(m):
            input_ids, labels = sampler.batch(m)
            t0 = time.perf_counter()
            with torch.no_grad():
                hidden, states = teacher(input_ids, **mid.forward_kwargs)
                records = {}
                if need_topk_all:
                    with models.gathered([weight]):
                        for k, temp in need_topk_all:
                            records[(k, temp)] = tg.topk_from_hidden(hidden, weight, k, temp)
            forwards += 1
            scoring.data_forwards += 1
            t1 = time.perf_counter()
            step_tensor = torch.tensor([m], dtype=torch.int64)
            for g, name, payload, lo, hi, lay in dests:
                if not scoring.takes_data(name, m):  # this pool trains on its own or the teacher's samples at m
                    continue
                fields = {"step": step_tensor, "input_ids": input_ids[lo:hi], "labels": labels[lo:hi]}
                if payload == "hidden":
                    fields["hidden"] = hidden[lo:hi]
                else:
                    fields.update(records[(topk[name], temps[name])].select(slice(lo, hi)).wire())
                fields.update(mid.select(name, states, lo, hi))
                q = in_flight[g]
                if len(q) >= plan.ring:  # backpressure: at most `ring` records in flight per destination
                    plan.bridge.wait(q.popleft(), g, f"room in the ring (micro step {m})")
                q.append(plan.bridge.isend(lay.pack(fields), g, TAG_RECORD))
                bytes_sent += lay.nbytes
            del hidden, records, states
            t_send += time.perf_counter() - t1
            t_fwd += t1 - t0
        # one forward per pool whose micro step m is on-policy (its own sequences) or seq_kd (the teacher's samples)
        forwards += scoring.score(m)
        step = (m + 1) // ga if (m + 1) % ga == 0 else None
        if step is not None:
            while rank == 0 and pending and pending[0] + plan.ring <= step:
                commit(plan, pending.pop(0), reports)
            if kill and step == kill:
                fault_kill(cfg)
    for g, q in in_flight.items():
        while q:
            plan.bridge.wait(q.popleft(), g, "the last records")
    while rank == 0 and pending:
        commit(plan, pending.pop(0), reports)
    loop_s, loop_cpu_s = time.time() - t_loop, time.process_time() - cpu_loop
    summary = {
        "pool": "teacher",
        "world_size": world,
        "teacher_forwards": forwards,
        "start_step": start,
        "steps": max_steps,
        "forward_seconds": t_fwd,
        "send_seconds": t_send,
        "loop_seconds": loop_s,
        "loop_cpu_seconds": loop_cpu_s,  # this rank's CPU time in the loop (the teacher's cost, whatever the load)
        "busy_fraction": (t_fwd + scoring.seconds + scoring.generate_s) / max(loop_s, 1e-9),
        "bytes_sent": bytes_sent,
        "teacher_param_bytes_per_rank": all_mem,
        "wall_seconds": time.time() - t_start,
        **scoring.summary(),
    }
    per_rank = [None] * world
    keys = ("teacher_forwards", "bytes_sent", "forward_seconds", "loop_seconds", "loop_cpu_seconds", "data_forwards")
    dist.all_gather_object(per_rank, {k: summary[k] for k in keys})
    if rank == 0:
        summary["per_rank"] = per_rank
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(out_dir, "teacher_memory.json"), "w") as f:
            json.dump({"per_rank": all_mem, "stage": cfg["teacher"]["deepspeed"]["stage"]}, f, indent=1)
        print(
            f"fastdistill: teacher pool: {forwards} forwards in {loop_s:.1f} s (busy {summary['busy_fraction']:.0%})",
            flush=True,
        )
    dist.barrier()
    plan.close()
    return summary


def cfg_ga(plan: PoolPlan) -> int:
    return next(iter(plan.students.values()))["config"]["student"]["deepspeed"]["gradient_accumulation_steps"]


def reported_steps(cfg: dict, start: int) -> list[int]:
    """The steps after ``start`` at which every student pool saves a checkpoint and reports it, so the ones the
    teacher pool commits: the recipe's rule, every ``schedule.save_every`` steps before the last, and the last step
    only with ``run.final_checkpoint`` (without it no pool reports the last step, and waiting for that report would
    end the run in a bridge timeout). ``run`` and ``schedule`` are the same in every pool."""
    max_steps, every = cfg["schedule"]["max_steps"], cfg["schedule"]["save_every"]
    steps = [s for s in range(start + 1, max_steps) if every and s % every == 0]
    if cfg["run"]["final_checkpoint"] and start < max_steps:
        steps.append(max_steps)
    return steps


def post_reports(plan: PoolPlan, steps: list[int]) -> dict:
    """Receives for every student pool's checkpoint report of every step in ``steps``, posted up front: a pool that
    saved, reported and then died has still delivered its report (gloo moves a message only into a posted receive)."""
    return {s: [(name, first, *_recv_ack(plan, first)) for name, first, _ in plan.layout[1:]] for s in steps}


def _recv_ack(plan: PoolPlan, src: int):
    buf = torch.zeros(1, dtype=torch.int64)
    return buf, plan.bridge.irecv(buf, src, TAG_ACK)


def commit(plan: PoolPlan, step: int, reports: dict) -> None:
    """Phase two: every student pool reported ``step`` saved; write the marker (atomically)."""
    for name, first, ack, work in reports.pop(step):
        plan.bridge.wait(work, first, f"the checkpoint report of step {step}")
        if int(ack) != step:
            raise bridge_lib.PoolFault(f"pools: pool {name!r} reported step {int(ack)}, expected {step}")
    path = os.path.join(plan.cfg_all["run"]["output_dir"], COMMIT)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step, "pools": [n for n, _, _ in plan.layout[1:]], "time": time.time()}, f)
    os.replace(tmp, path)


def fault_kill(cfg: dict) -> None:
    """The test hook's SIGKILL, after noting the time in ``<run.output_dir>/fault_killed_at`` (how long the others
    take to stop is measured from it)."""
    with open(os.path.join(cfg["run"]["output_dir"], "fault_killed_at"), "w") as f:
        f.write(str(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def fault_hook(pool: str, rank: int) -> int:
    """Test hook ``FASTDISTILL_FAULT_KILL=pool:rank:step``: that rank SIGKILLs itself after that step."""
    spec = os.environ.get("FASTDISTILL_FAULT_KILL", "")
    if spec.count(":") == 2:
        p, r, s = spec.split(":")
        if p == pool and int(r) == rank:
            return int(s)
    return 0
