"""Generated records on disk: atomic part files, a resume set, one merged dataset.

Each generation batch becomes one part file ``parts/part-<first id>-<last id>-<n>.<fmt>``, written to a temporary name
and renamed, so a SIGKILL leaves either the whole part or nothing visible; a resumed run skips every prompt id found in
a part and never generates it again. ``merge`` writes ``generations.<fmt>`` (sorted by prompt id), also atomically.

One row per prompt:
``prompt_id`` (int), ``key`` (the record's id), ``prompt`` (the text continued), ``fields`` (the record, JSON),
``samples`` (N strings), ``token_ids`` / ``logprobs`` (per sample, per generated token: the model's log-prob at
temperature 1), ``finish_reasons`` (eos | stop | length) and, when recorded, ``topk_ids`` / ``topk_logprobs``
(per sample, per position, k values: normalised log-probs, i.e. the record's log-normaliser is already applied);
``extra`` (JSON) holds what a stage adds per prompt (e.g. the weak-label verbalizer log-probs).
"""

from __future__ import annotations

import json
import os

FORMATS = ("parquet", "jsonl")


def _schema(with_topk: bool, with_extra: bool):
    import pyarrow as pa

    fields = [
        ("prompt_id", pa.int64()),
        ("key", pa.string()),
        ("prompt", pa.string()),
        ("fields", pa.string()),
        ("samples", pa.list_(pa.string())),
        ("token_ids", pa.list_(pa.list_(pa.int32()))),
        ("logprobs", pa.list_(pa.list_(pa.float32()))),
        ("finish_reasons", pa.list_(pa.string())),
    ]
    if with_topk:
        fields += [
            ("topk_ids", pa.list_(pa.list_(pa.list_(pa.int32())))),
            ("topk_logprobs", pa.list_(pa.list_(pa.list_(pa.float32())))),
        ]
    if with_extra:
        fields.append(("extra", pa.string()))
    return pa.schema(fields)


def to_rows(prompts, results, extras: list[dict] | None = None) -> list[dict]:
    """Rows (see the module docstring) from ``Prompt`` objects, their ``sample`` results and optional extra fields."""
    rows = []
    for i, (p, group) in enumerate(zip(prompts, results)):
        row = {
            "prompt_id": p.id,
            "key": p.key,
            "prompt": p.text,
            "fields": json.dumps(p.fields, ensure_ascii=False, default=str),
            "samples": [s.text for s in group],
            "token_ids": [s.token_ids for s in group],
            "logprobs": [s.logprobs for s in group],
            "finish_reasons": [s.finish_reason for s in group],
        }
        if group and group[0].topk_ids is not None:
            row["topk_ids"] = [s.topk_ids for s in group]
            row["topk_logprobs"] = [s.topk_logprobs for s in group]
        if extras is not None:
            row["extra"] = json.dumps(extras[i])
        rows.append(row)
    return rows


def _write(rows: list[dict], path: str, fmt: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        first = rows[0] if rows else {}
        table = pa.Table.from_pylist(rows, schema=_schema("topk_ids" in first, "extra" in first))
        pq.write_table(table, tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read(path: str, fmt: str) -> list[dict]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class PartStore:
    """The part files of one output folder."""

    def __init__(self, folder: str, fmt: str = "parquet"):
        if fmt not in FORMATS:
            raise ValueError(f"output.format: got {fmt!r}; expected one of {list(FORMATS)}")
        self.folder, self.fmt = folder, fmt
        self.parts = os.path.join(folder, "parts")
        os.makedirs(self.parts, exist_ok=True)

    @property
    def merged_path(self) -> str:
        return os.path.join(self.folder, f"generations.{self.fmt}")

    def part_files(self) -> list[str]:
        return sorted(
            os.path.join(self.parts, f)
            for f in os.listdir(self.parts)
            if f.startswith("part-") and f.endswith("." + self.fmt)
        )

    def clean_temporaries(self) -> None:
        """Remove the half-written files of a killed run (never visible as parts)."""
        for f in os.listdir(self.parts):
            if ".tmp-" in f:
                os.remove(os.path.join(self.parts, f))

    def done_ids(self) -> set[int]:
        done: set[int] = set()
        for path in self.part_files():
            done.update(int(r["prompt_id"]) for r in _read(path, self.fmt))
        return done

    def write(self, rows: list[dict]) -> str | None:
        if not rows:
            return None
        ids = [r["prompt_id"] for r in rows]
        path = os.path.join(self.parts, f"part-{min(ids):09d}-{max(ids):09d}-{len(ids)}.{self.fmt}")
        _write(rows, path, self.fmt)
        return path

    def merge(self) -> str:
        rows: dict[int, dict] = {}
        for path in self.part_files():
            for r in _read(path, self.fmt):
                rows[int(r["prompt_id"])] = r
        _write([rows[k] for k in sorted(rows)], self.merged_path, self.fmt)
        return self.merged_path


def load_generations(path: str) -> list[dict]:
    """The rows of a generation output: a ``generations.parquet`` / ``.jsonl`` file or its run folder."""
    if os.path.isdir(path):
        for fmt in FORMATS:
            candidate = os.path.join(path, f"generations.{fmt}")
            if os.path.isfile(candidate):
                path = candidate
                break
        else:
            raise FileNotFoundError(f"{path!r}: no generations.parquet / generations.jsonl (has the run finished?)")
    fmt = "jsonl" if path.endswith(".jsonl") else "parquet"
    return _read(path, fmt)
