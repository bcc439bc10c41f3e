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

Every wait has a timeout. A heartbeat thread per rank refreshes a key in the store, so a wait that times out (or a
connection closed by a crashed peer) is reported with the pool and rank that stopped, never as a hang.
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

    def __init__(self, store, rank: int, size: int, timeout_s: float, describe, heartbeat: Heartbeat | None):
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


class Heartbeat:
    """Each rank refreshes ``hb/<rank>`` in the store every second from a daemon thread (its own store client);
    ``stale()`` lists ranks whose key has not moved for ``3 x`` the period (dead or frozen)."""

    def __init__(self, host: str, port: int, rank: int, size: int):
        self.rank, self.size = rank, size
        self._store = torch.distributed.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=10))
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="fastdistill-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self._store.set(f"hb/{self.rank}", str(time.time()))

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except Exception:  # the store (rank 0) is gone: nothing left to report to
                return

    def stale(self) -> list[int]:
        now, out = time.time(), []
        try:
            for r in range(self.size):
                if r != self.rank and now - float(self._store.get(f"hb/{r}")) > 3 * HEARTBEAT_S:
                    out.append(r)
        except Exception:  # the store itself died with rank 0
            return [0]
        return out

    def stop(self) -> None:
        self._stop.set()


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
