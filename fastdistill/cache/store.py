"""The teacher cache on disk: a folder of Parquet shards (zstd) of encoded ``TopKTargets``, keyed by content.

    DIR/manifest.json                      identity (teacher + content hash, tokenizer, seq_len, k, temperatures,
                                           coding, vocabulary) and, once a build finished, every shard with its
                                           sequence count and sha256
    DIR/shards/r{rank}-{n}-{sha}.parquet   one row per sequence: key = blake2b-128 of its token ids, then the coded
                                           record (see fastdistill.train.targets)

A shard is written to a temporary name, fsynced and renamed (then the folder fsynced), so a killed build never leaves
a partial shard visible; its file name carries the first 32 hex digits of its sha256, so every reader can check
every shard, and a corrupt or truncated one is named instead of being read. Parquet page checksums are written too.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import re

import numpy as np

MANIFEST = "manifest.json"
SHARDS = "shards"
FORMAT_VERSION = 1
COLUMNS = ("index_deltas", "logprob_steps", "lse", "log_tail")
_SHARD_RE = re.compile(r"^r(\d+)-(\d+)-([0-9a-f]{32})\.parquet$")


class CacheError(RuntimeError):
    """A teacher cache that cannot serve this run: wrong identity, missing sequences, corrupt shards."""


def sequence_key(token_ids) -> bytes:
    """The record key of one sequence: blake2b-128 of its token ids as little-endian int64."""
    arr = np.ascontiguousarray(np.asarray(token_ids, dtype="<i8"))
    return hashlib.blake2b(arr.tobytes(), digest_size=16).digest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise CacheError(f"teacher cache {folder!r}: no {MANIFEST} (not a teacher cache, or its build never started)")
    with open(path) as f:
        return json.load(f)


def write_manifest(folder: str, manifest: dict) -> None:
    atomic_write_bytes(os.path.join(folder, MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode())


IDENTITY_KEYS = ("teacher", "teacher_sha256", "tokenizer", "tokenizer_sha256", "seq_len", "k", "vocab_size")


def check_identity(folder: str, manifest: dict, wanted: dict, what: str = "this run") -> None:
    """A clear error naming both values when ``wanted`` (a run's identity) differs from the cache's manifest."""
    for key in IDENTITY_KEYS + ("coding", "logprob_step"):
        if key in wanted and manifest["identity"].get(key) != wanted[key]:
            raise CacheError(
                f"teacher cache {folder!r} was built with {key}={manifest['identity'].get(key)!r}, but {what} has "
                f"{key}={wanted[key]!r}; rebuild the cache (fastdistill teacher-cache build) or point teacher.cache "
                "at a matching one"
            )


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------
def _schema():
    import pyarrow as pa

    return pa.schema([("key", pa.binary(16))] + [(c, pa.binary()) for c in COLUMNS])


class ShardWriter:
    """Buffers coded sequences of one rank and writes them as whole shards (atomic, checksummed)."""

    def __init__(self, folder: str, rank: int, shard_sequences: int, compression_level: int = 19):
        self.dir = os.path.join(folder, SHARDS)
        os.makedirs(self.dir, exist_ok=True)
        self.rank, self.shard_sequences, self.level = rank, shard_sequences, compression_level
        taken = [int(m.group(2)) for m in map(_SHARD_RE.match, os.listdir(self.dir)) if m and int(m.group(1)) == rank]
        self.next_index = max(taken, default=-1) + 1
        self.rows: list[tuple[bytes, dict]] = []
        self.written: list[str] = []

    def add(self, key: bytes, coded_row: dict[str, np.ndarray]) -> None:
        self.rows.append((key, coded_row))
        if len(self.rows) >= self.shard_sequences:
            self.flush()

    def flush(self) -> str | None:
        if not self.rows:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {"key": pa.array([k for k, _ in self.rows], type=pa.binary(16))}
        for c in COLUMNS:
            cols[c] = pa.array([np.ascontiguousarray(r[c]).tobytes() for _, r in self.rows], type=pa.binary())
        table = pa.table(cols, schema=_schema())
        tmp = os.path.join(self.dir, f".r{self.rank:03d}-{self.next_index:06d}.tmp-{os.getpid()}")
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            compression_level=self.level,
            use_dictionary=False,
            row_group_size=16,  # random access reads (and decompresses) one row group of 16 sequences
            write_page_checksum=True,
            write_statistics=False,
        )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        sha = file_sha256(tmp)
        final = os.path.join(self.dir, f"r{self.rank:03d}-{self.next_index:06d}-{sha[:32]}.parquet")
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        self.next_index += 1
        self.rows = []
        self.written.append(final)
        return final


def remove_temporaries(folder: str, rank: int) -> None:
    """Temporary files a killed build of ``rank`` left behind (never visible as shards)."""
    for p in glob.glob(os.path.join(folder, SHARDS, f".r{rank:03d}-*.tmp-*")):
        os.remove(p)


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------
def list_shards(folder: str) -> list[str]:
    d = os.path.join(folder, SHARDS)
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, n) for n in os.listdir(d) if _SHARD_RE.match(n))


def verify_shard(path: str) -> None:
    """The file's sha256 against the digits in its name: a corrupt or truncated shard is an error naming it."""
    want = _SHARD_RE.match(os.path.basename(path)).group(3)
    got = file_sha256(path)[:32]
    if got != want:
        raise CacheError(
            f"teacher cache shard {path!r} is corrupt or truncated: sha256 {got}... does not match {want}... recorded "
            "in its name; delete it and run teacher-cache build again (it rebuilds only the missing sequences)"
        )


def shard_keys(path: str) -> list[bytes]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=["key"], memory_map=True).column("key").to_pylist()
    except Exception as e:  # noqa: BLE001 - any Arrow error on a shard that passed or skipped its checksum
        raise CacheError(f"teacher cache shard {path!r} cannot be read: {e}") from None


class CacheReader:
    """Random access to the records of a teacher cache by key. Opens every shard memory-mapped, checks its sha256
    (``verify=True``), indexes its keys, and decodes one row group (16 sequences) at a time, keeping the most recent
    ``cached_groups`` decoded groups."""

    def __init__(self, folder: str, verify: bool = True, cached_groups: int = 256):
        import pyarrow.parquet as pq

        self.folder = folder
        self.manifest = read_manifest(folder)
        ident = self.manifest["identity"]
        from fastdistill.train import targets as tg

        if ident.get("coding") != tg.CODING:
            raise CacheError(
                f"teacher cache {folder!r} uses the coding {ident.get('coding')!r}; this fastdistill reads "
                f"{tg.CODING!r}: rebuild the cache"
            )
        self.k, self.temperatures = ident["k"], tuple(ident["temperatures"])
        self.logprob_step, self.vocab_size, self.seq_len = ident["logprob_step"], ident["vocab_size"], ident["seq_len"]
        listed = self.manifest.get("shards")
        paths = list_shards(folder)
        if listed is not None:  # a finished build: every listed shard must be there
            present = {os.path.basename(p) for p in paths}
            lost = [s["file"] for s in listed if s["file"] not in present]
            if lost:
                raise CacheError(f"teacher cache {folder!r}: shard {lost[0]!r} listed in {MANIFEST} is missing")
        self.files, self.index = [], {}
        for path in paths:
            if verify:
                verify_shard(path)
            try:
                pf = pq.ParquetFile(path, memory_map=True, page_checksum_verification=True)
            except Exception as e:  # noqa: BLE001
                raise CacheError(f"teacher cache shard {path!r} cannot be read: {e}") from None
            f = len(self.files)
            self.files.append((path, pf, pf.metadata.row_group(0).num_rows if pf.metadata.num_row_groups else 1))
            for row, key in enumerate(shard_keys(path)):
                self.index.setdefault(key, (f, row))
        self._groups: collections.OrderedDict = collections.OrderedDict()
        self.cached_groups = cached_groups

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: bytes) -> bool:
        return key in self.index

    def _group(self, f: int, g: int) -> dict[str, list]:
        got = self._groups.get((f, g))
        if got is None:
            path, pf, _ = self.files[f]
            try:
                t = pf.read_row_group(g, columns=list(COLUMNS))
            except Exception as e:  # noqa: BLE001
                raise CacheError(f"teacher cache shard {path!r} row group {g} cannot be read: {e}") from None
            got = {c: t.column(c).to_pylist() for c in COLUMNS}
            self._groups[(f, g)] = got
            if len(self._groups) > self.cached_groups:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end((f, g))
        return got

    def coded_row(self, key: bytes) -> dict[str, np.ndarray]:
        f, row = self.index[key]
        per_group = self.files[f][2]
        g = self._group(f, row // per_group)
        i = row % per_group
        return {
            "index_deltas": np.frombuffer(g["index_deltas"][i], dtype=np.uint8),
            "logprob_steps": np.frombuffer(g["logprob_steps"][i], dtype=np.uint8),
            "lse": np.frombuffer(g["lse"][i], dtype="<f4"),
            "log_tail": np.frombuffer(g["log_tail"][i], dtype="<f4"),
        }

    def lookup(self, keys: list[bytes]):
        """Decoded ``TopKTargets`` [len(keys), T, k] for ``keys`` (all present: check with ``in`` first)."""
        from fastdistill.train import targets as tg

        rows = [self.coded_row(k) for k in keys]
        coded = {c: np.stack([r[c] for r in rows]) for c in COLUMNS}
        return tg.decode(coded, self.k, self.temperatures, self.logprob_step)

    def bytes_on_disk(self) -> int:
        return sum(os.path.getsize(p) for p, _, _ in self.files)
