"""Per-pool torch.distributed worlds on one store, and the bridge that carries teacher records between pools.

One ``deepspeed`` launch starts ``W`` processes with ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``.
Here they do not join one world. Instead:

- rank 0 hosts one ``TCPStore`` on ``MASTER_ADDR:MASTER_PORT`` (every rank connects to it);
- each pool calls ``torch.distributed.init_process_group(store=PrefixStore("pool/<name>", store), rank=pool_rank,
  world_size=pool_size)``: DeepSpeed's world *is* the pool, so its world-scoped calls (batch-size checks, the lazily
  created data-parallel group, ZeRO-3 init barriers, checkpoint barriers, ``latest`` written by rank 0) stay inside it
  and no engine needs an ``mpu``;
- one ``ProcessGroupGloo(PrefixStore("bridge", store), global_rank, W)`` carries the payloads, point to point only
  (:class:`Bridge` exposes no collective, so nothing world-scoped can ever run across pools).

Every wait has a timeout (``pools.timeout_s``), and a :class:`Watchdog` per rank ends the job within
``pools.dead_after_s`` of any rank's death, naming its pool and rank, never a hang.
"""

from __future__ import annotations

import datetime
import os
import threading
import time

import torch

HEARTBEAT_S = 1.0


class PoolFault(RuntimeError):
    """A peer pool stopped answering (dead, or slower than ``pools.timeout_s``); the message names pool and rank."""


# ---------------------------------------------------------------------------------------------------------------
# records packed into one byte buffer per message
# ---------------------------------------------------------------------------------------------------------------
class Layout:
    """A fixed layout of named tensors in one uint8 buffer: both ends build the same layout from the config, so a
    message is a single send / recv of ``nbytes`` bytes (one gloo message, no per-tensor headers)."""

    def __init__(self, fields: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.fields, self.offsets, off = fields, [], 0
        for _, dtype, shape in fields:
            size = torch.empty((), dtype=dtype).element_size()
            off = (off + size - 1) // size * size  # aligned views
            self.offsets.append(off)
            off += size * int(torch.Size(shape).numel())
        self.nbytes = off

    def empty(self) -> torch.Tensor:
        return torch.empty(self.nbytes, dtype=torch.uint8)

    @property
    def tokens(self) -> int:
        """The tokens a record carries: rows x positions of its first [rows, positions, ...] field."""
        return next(int(shape[0]) * int(shape[1]) for _, _, shape in self.fields if len(shape) >= 2)

    def pack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        buf = self.empty()
        for (name, dtype, shape), off in zip(self.fields, self.offsets):
            t = tensors[name]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"record field {name!r}: got {tuple(t.shape)} {t.dtype}, layout says {shape} {dtype}")
            n = t.numel() * t.element_size()
            buf[off : off + n] = t.detach().contiguous().view(-1).view(torch.uint8)
        return buf

    def unpack(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for (name, dtype, shape), off in zip(self.fields, self.offsets):
            size = torch.empty((), dtype=dtype).element_size()
            n = size * int(torch.Size(shape).numel())
            out[name] = buf[off : off + n].view(dtype).view(shape)
        return out


# ---------------------------------------------------------------------------------------------------------------
# worlds and the bridge
# ---------------------------------------------------------------------------------------------------------------
class Bridge:
    """Point-to-point messages between any two ranks of the launch (gloo), each wait bounded by ``timeout_s``.

    ``describe(global_rank)`` names a rank as ``pool 'x' rank r (global g)`` in fault messages."""

    def __init__(self, store, rank: int, size: int, timeout_s: float, describe, heartbeat: Watchdog | None):
        self.rank, self.size, self.timeout_s, self.describe, self.heartbeat = rank, size, timeout_s, describe, heartbeat
        self.pg = torch.distributed.ProcessGroupGloo(
            torch.distributed.PrefixStore("bridge", store), rank, size, datetime.timedelta(seconds=timeout_s)
        )

    def isend(self, buf: torch.Tensor, dst: int, tag: int = 0):
        return self.pg.send([buf], dst, tag)

    def irecv(self, buf: torch.Tensor, src: int, tag: int = 0):
        return self.pg.recv([buf], src, tag)

    def wait(self, work, peer: int, what: str) -> None:
        """``work.wait`` with the timeout; a closed connection or a timeout becomes a :class:`PoolFault` that names
        the peer (and any rank whose heartbeat stopped)."""
        try:
            work.wait(datetime.timedelta(seconds=self.timeout_s))
        except Exception as e:  # gloo raises RuntimeError for both a timeout and a peer that went away
            raise PoolFault(self.fault_message(peer, what, e)) from None

    def fault_message(self, peer: int, what: str, err: BaseException | None = None) -> str:
        dead = self.heartbeat.stale() if self.heartbeat is not None else []
        reason = str(err).strip().splitlines()[0][:200] if err is not None else "timeout"
        msg = f"pools: {self.describe(self.rank)} gave up waiting for {what} from {self.describe(peer)}: {reason}"
        if dead:
            msg += "; stopped (no heartbeat): " + ", ".join(self.describe(r) for r in dead)
        return msg

    def send_object(self, obj, dst: int, what: str) -> None:
        import pickle

        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        self.wait(self.isend(torch.tensor([data.numel()], dtype=torch.int64), dst, 1), dst, what)
        self.wait(self.isend(data, dst, 1), dst, what)

    def recv_object(self, src: int, what: str):
        import pickle

        n = torch.zeros(1, dtype=torch.int64)
        self.wait(self.irecv(n, src, 1), src, what)
        data = torch.empty(int(n), dtype=torch.uint8)
        self.wait(self.irecv(data, src, 1), src, what)
        return pickle.loads(data.numpy().tobytes())


def _host_id() -> str:
    """This machine: hostname plus the kernel's boot id (two containers may share a hostname, not a kernel)."""
    import socket

    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def pid_dead(pid: int) -> bool:
    """Whether process ``pid`` of this machine has ended (gone, or a zombie its launcher has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (not Linux): signal 0 tells whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False


class Watchdog:
    """Liveness across pools, independent of any collective. Each rank refreshes ``hb/<rank>`` in the store every
    second from a daemon thread (its own store client) and checks the others: a rank silent for ``dead_after_s``
    (SIGKILLed, OOM-killed, its node gone) ends this process with a message naming its pool and rank, so every node
    of the launch stops within about ``dead_after_s`` instead of hanging in a collective. A rank that finishes marks
    itself ``done``; rank 0 hosts the store and so waits for everyone's ``done`` before it exits.

    Who stopped *first* (:meth:`first_stopped`, in every line a stopping rank prints): a rank that stops in an orderly
    way (the launcher's SIGTERM, a failed collective, a lost peer) first marks ``hb/<rank>`` as ``stopping`` and
    lingers a beat so its peers see the mark; a killed rank cannot. Ranks on the same machine (the same kernel) also
    watch each other's process ids every beat and note when each was first seen dead. So the rank named is the one
    that died without marking itself, found positively by its pid on this machine, in the order they were seen to die,
    and by a stale heartbeat on other machines. On one node this no longer depends on the launcher's sweep (which
    SIGTERMs the survivors one after another, store host first, within about a second of the death) being slower than
    the heartbeat staleness.

    When the launcher SIGTERMs the survivors (one of its ranks exited abnormally), the main thread may be blocked in
    a C++ wait where no Python signal handler runs; the signal's wakeup fd wakes a thread here instead, which names
    the rank that stopped first and exits.

    A rank of this machine whose process is alive is never called dead for a late heartbeat (on a loaded machine a
    heartbeat thread can starve for longer than ``dead_after_s``); its pid says whether it is."""

    def __init__(self, host: str, port: int, rank: int, size: int, dead_after_s: float, describe):
        self.rank, self.size, self.dead_after_s, self.describe = rank, size, dead_after_s, describe
        self._store = torch.distributed.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=30))
        self._stop = threading.Event()
        self._last_ages: dict[int, float] = {}
        self._orderly: set[int] = set()  # ranks seen marked 'stopping' or 'done': not the first to stop
        self._local: dict[int, int] | None = None  # rank -> pid of the ranks on this machine (once all registered)
        self._seen_dead: dict[int, float] = {}  # local rank -> when its pid was first seen dead
        self._lock = threading.Lock()
        self._stopping = False
        self._host = _host_id()
        self._store.set(f"pid/{rank}", f"{self._host}|{os.getpid()}")
        self._beat()
        threading.Thread(target=self._run, name="fastdistill-watchdog", daemon=True).start()
        self._watch_sigterm()

    def _beat(self) -> None:
        if not self._stopping:  # a stopping rank keeps its mark
            self._store.set(f"hb/{self.rank}", str(time.time()))

    def ages(self) -> dict[int, float]:
        """Seconds since each other rank's last heartbeat (ranks not started yet, done or stopping are left out)."""
        now, out = time.time(), {}
        for r in range(self.size):
            if r == self.rank or not self._store.check([f"hb/{r}"]):
                continue
            v = self._store.get(f"hb/{r}").decode()
            if v in ("done", "stopping"):
                self._orderly.add(r)
            else:
                out[r] = now - float(v)
        self._last_ages = out
        return out

    def _watch_local(self) -> None:
        """Note the ranks of this machine whose process has ended (first time seen)."""
        if self._local is None:
            try:
                if not self._store.check([f"pid/{r}" for r in range(self.size)]):
                    return
                entries = {r: self._store.get(f"pid/{r}").decode().rsplit("|", 1) for r in range(self.size)}
            except Exception:
                return
            self._local = {r: int(pid) for r, (host, pid) in entries.items() if host == self._host and r != self.rank}
        now = time.time()
        with self._lock:
            for r, pid in self._local.items():
                if r not in self._seen_dead and pid_dead(pid):
                    self._seen_dead[r] = now

    def _alive_here(self, r: int) -> bool:
        """Rank ``r`` runs on this machine and its process is alive: slow (a starved heartbeat thread on a loaded
        machine, a long import holding the GIL), not dead; its collectives' own timeouts bound a real hang."""
        return self._local is not None and r in self._local and not pid_dead(self._local[r])

    def stale(self, after: float | None = None) -> list[int]:
        try:
            ages = self.ages()
        except Exception:  # the store died with rank 0: blame a rank already late at the last look, else rank 0
            late = [r for r, a in self._last_ages.items() if a > 1.5 * HEARTBEAT_S and r not in self._orderly]
            return [r for r in late if not self._alive_here(r)] or [0]
        limit = self.dead_after_s if after is None else after
        return sorted(r for r, a in ages.items() if a > limit and not self._alive_here(r))

    def _die(self, msg: str) -> None:
        import sys

        print(f"fastdistill: {msg}", file=sys.stderr, flush=True)
        os._exit(1)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._watch_local()
            try:
                self._beat()
                self.ages()  # the store answers (it lives in global rank 0's process)
            except Exception:
                if not self._stop.is_set():
                    self._die(
                        f"pools: {self.describe(self.rank)}: lost the store hosted by {self.describe(0)}; stopping; "
                        f"stopped first: {self.first_stopped()}"
                    )
                return
            dead = self.stale()
            if dead and not self._stop.is_set():
                self._die(
                    f"pools: {', '.join(self.describe(r) for r in dead)} stopped (no heartbeat for "
                    f"{self.dead_after_s:g} s, pools.dead_after_s); {self.describe(self.rank)} ends the job"
                )

    def _watch_sigterm(self) -> None:
        import signal
        import socket

        if threading.current_thread() is not threading.main_thread():
            return
        rfd, wfd = socket.socketpair()
        wfd.setblocking(False)
        signal.set_wakeup_fd(wfd.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda *_: self._on_term())  # runs if the main thread is in Python
        self._wake = (rfd, wfd)

        def wait_for_term():
            while True:
                data = rfd.recv(64)
                if not data or signal.SIGTERM in data:
                    self._on_term()

        threading.Thread(target=wait_for_term, name="fastdistill-sigterm", daemon=True).start()

    def _killed_locally(self) -> list[int]:
        """Ranks of this machine that ended without marking themselves, in the order they were seen to end."""
        self._watch_local()
        with self._lock:
            dead = sorted(self._seen_dead.items(), key=lambda x: (x[1], x[0]))
        return [r for r, _ in dead if r not in self._orderly]

    def first_stopped(self) -> str:
        """Who stopped first, for the line this rank prints as it stops: the ranks of this machine whose process
        ended without marking itself (positive, at once), else the ranks whose heartbeat is missing, given a few beats
        to show (a crash elsewhere is usually what made this rank's collective or the launcher fail). Marks this rank
        ``stopping`` first, and lingers a beat so that its peers see the mark before its process ends."""
        self._stopping = True
        try:
            self._store.set(f"hb/{self.rank}", "stopping")
            linger_until = time.time() + 1.5 * HEARTBEAT_S
        except Exception:  # the store is gone: nobody left to tell
            linger_until = 0.0
        try:
            self.ages()  # fresh marks of the others
        except Exception:
            pass
        dead = self._killed_locally()
        for _ in range(8):
            if dead:
                break
            dead = [r for r in self.stale(after=2.5 * HEARTBEAT_S) if r not in self._orderly] or self._killed_locally()
            if not dead:
                time.sleep(HEARTBEAT_S / 2)
        time.sleep(max(0.0, linger_until - time.time()))
        return ", ".join(self.describe(r) for r in dead) or "no other rank (all heartbeats present)"

    def _on_term(self) -> None:
        self._die(f"pools: {self.describe(self.rank)} stopped by the launcher; stopped first: {self.first_stopped()}")

    def install_excepthook(self) -> None:
        """An uncaught error (e.g. a collective that failed because a peer died) also says which rank stopped."""
        import sys

        previous = sys.excepthook

        def hook(kind, value, tb):
            previous(kind, value, tb)
            self._stop.set()
            print(
                f"fastdistill: pools: {self.describe(self.rank)} failed ({kind.__name__}); stopped first: "
                f"{self.first_stopped()}",
                file=sys.stderr,
                flush=True,
            )

        sys.excepthook = hook
        from fastdistill.train import errors  # the CLI's one line for a lost peer names the rank too

        errors.set_blame(lambda: f"pools: {self.first_stopped()}")

    def done(self, wait_for_all_s: float = 0.0) -> None:
        """Mark this rank finished; rank 0 (the store's host) first waits up to ``wait_for_all_s`` for the others."""
        self._stop.set()
        try:
            self._store.set(f"hb/{self.rank}", "done")
            deadline = time.time() + wait_for_all_s
            while self.rank == 0 and time.time() < deadline:
                marks = [self._store.get(f"hb/{r}").decode() for r in range(self.size) if r != self.rank]
                if all(m in ("done", "stopping") for m in marks):  # a stopping rank is not coming to 'done'
                    break
                time.sleep(0.2)
        except Exception:
            pass


class CollectiveAudit:
    """Test hook (``FASTDISTILL_POOLS_AUDIT=1``): counts every torch.distributed collective this process runs, by the
    size of the group it ran over. DeepSpeed calls ``torch.distributed.<op>`` through ``deepspeed.comm`` at call time,
    so its collectives are seen too. With per-pool worlds every size must be the pool's, never the launch's."""

    OPS = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_object",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "broadcast",
        "broadcast_object_list",
        "barrier",
        "reduce",
        "all_to_all_single",
        "monitored_barrier",
    )

    def __init__(self):
        import torch.distributed as dist

        self.counts: dict[str, int] = {}
        for op in self.OPS:
            fn = getattr(dist, op, None)
            if fn is not None:
                setattr(dist, op, self._wrap(op, fn))

    def _wrap(self, op, fn):
        import functools
        import inspect

        import torch.distributed as dist

        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            try:
                group = sig.bind_partial(*args, **kwargs).arguments.get("group")
            except TypeError:
                group = kwargs.get("group")
            key = f"{op}/{dist.get_world_size(group)}"
            self.counts[key] = self.counts.get(key, 0) + 1
            return fn(*args, **kwargs)

        return counted

    def write(self, path: str, **info) -> None:
        import json

        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({**info, "collectives": self.counts}, f, indent=1)


def launch_env() -> tuple[int, int, str, int]:
    """(global rank, launch size, master address, master port) from the launcher's variables."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"pools: needs a multi-process launch (deepspeed --num_gpus G / --hostfile ...); {missing} not set"
        )
    return (
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
    )


def open_store(host: str, port: int, rank: int, size: int, timeout_s: float):
    return torch.distributed.TCPStore(
        host, port, size, is_master=rank == 0, timeout=datetime.timedelta(seconds=max(timeout_s, 60))
    )


def init_pool_world(store, pool: str, pool_rank: int, pool_size: int, timeout_s: float) -> None:
    """This pool's own torch.distributed world (then ``deepspeed.init_distributed`` adopts it); the launcher's rank
    variables are rewritten to the pool's, so anything that reads them sees the pool."""
    from fastdistill.train import output

    # as the colocated trainer: no DeepSpeed shm allreduce op. Besides its build, on CPU it creates a 66 MiB
    # /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> per rank that nothing ever unlinks (RAM lost to
    # tmpfs after every launch), and its name has the pool rank, not the pool: pools would share one buffer
    output.prepare_deepspeed()
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    backend = get_accelerator().communication_backend_name()
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"pool/{pool}", store),
        rank=pool_rank,
        world_size=pool_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    os.environ.update(RANK=str(pool_rank), WORLD_SIZE=str(pool_size))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
