"""The teacher cache: the record's coding, the shard store, ``teacher-cache build`` under the real ``deepspeed``
launcher (CPU, gloo, loopback) with a tiny Llama teacher sharded by ZeRO-3, and training from ``teacher.cache``.

Against one 2-rank ZeRO-3 build: the cached targets equal the top-k of an unsharded copy of the teacher (indices
exactly, log-probs within the coding's documented error); a build SIGKILLed mid-way and finished on one rank gives the
same cache; a 2-rank seed-1 run and a 1-rank seed-7 run read identical targets for the same sequence; a mismatched
manifest, missing sequences, corrupt and truncated shards give errors that name what is wrong.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from _launch import REPO, check, launch, launched, losses, save_tiny_teacher

from fastdistill import _backend
from fastdistill.train import targets as tg

TINY = os.path.join(REPO, "configs", "tiny_llama_zero3.yaml")
STEP = tg.DEFAULT_LOGPROB_STEP


def _seed(request) -> int:
    return int.from_bytes(request.node.nodeid.encode()[-8:].ljust(8, b"\0"), "little") % 2**31


# ---------------------------------------------------------------------------------------------------------------
# the record and its coding (in process)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("vocab,k,temps", [(256, 16, (1.0,)), (70001, 32, (2.0, 1.0))], ids=["v256", "v70001-2temps"])
def test_topk_record_and_coding_against_float64(request, vocab, k, temps, backend):
    if backend == "cpp" and not _backend.has_cpp_op("topk_targets_rows"):
        pytest.skip("fastdistill._C is not built")
    g = torch.Generator().manual_seed(_seed(request))
    hidden = torch.randn(3, 7, 24, generator=g)
    weight = torch.randn(vocab, 24, generator=g) * 0.3
    rec = tg.topk_from_hidden(hidden, weight, k, temps, chunk_rows=8, backend=backend)
    z = (hidden.double() @ weight.double().t()).reshape(-1, vocab)
    ref_idx = z.topk(k, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(rec.indices.reshape(-1, k), ref_idx)
    for i, t in enumerate(temps):
        lsm = torch.log_softmax(z / t, dim=-1)
        tail = torch.logsumexp(lsm.scatter(1, ref_idx, -float("inf")), dim=-1)
        torch.testing.assert_close(rec.log_tail[..., i].reshape(-1).double(), tail, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            rec.lse[..., i].reshape(-1).double(), torch.logsumexp(z / t, -1), rtol=1e-5, atol=1e-5
        )
    # coding round trip: indices exact, log-probs within one logprob_step (rounding <= step/2, plus one shared shift
    # per position <= step/2 that makes the mass exactly 1 - tail)
    coded = tg.encode(rec, vocab)
    assert coded["index_deltas"].shape[-1] == 7 * k * (2 if vocab <= 65536 else 4)
    assert coded["logprob_steps"].dtype == np.uint8
    dec = tg.decode(coded, k, temps)
    assert torch.equal(dec.indices, rec.indices)
    for i, t in enumerate(temps):
        values, indices = dec.at_temperature(t)
        ref = torch.log_softmax(z / t, dim=-1).gather(1, ref_idx)
        assert torch.equal(indices.reshape(-1, k), ref_idx)
        err = (values.reshape(-1, k).double() - ref).abs().max().item()
        assert err <= STEP * (temps[0] / t) + 1e-4, (t, err)
        mass = values.double().exp().sum(-1) + dec.log_tail[..., i].double().exp()
        torch.testing.assert_close(mass, torch.ones_like(mass), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"temperature 3.0 is not among the record's temperatures"):
        dec.at_temperature(3.0)


def _write_cache(folder, n=6, t=5, k=4, vocab=50):
    from fastdistill.cache import store

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    rec = tg.topk_from_hidden(torch.randn(n, t, 8, generator=g), torch.randn(vocab, 8, generator=g), k, (1.0,))
    ident = {
        "teacher": "t",
        "teacher_sha256": "a" * 64,
        "tokenizer": "bytes",
        "tokenizer_sha256": "bytes",
        "seq_len": t,
        "k": k,
        "vocab_size": vocab,
        "temperatures": [1.0],
        "coding": tg.CODING,
        "logprob_step": STEP,
    }
    os.makedirs(folder, exist_ok=True)
    store.write_manifest(folder, {"format_version": 1, "identity": ident, "complete": False})
    w = store.ShardWriter(folder, 0, shard_sequences=3)
    coded = tg.encode(rec, vocab)
    for j in range(n):
        w.add(store.sequence_key(ids[j].numpy()), {c: v[j] for c, v in coded.items()})
    w.flush()
    return ids, rec, w.written


def test_store_round_trip_and_corrupt_or_truncated_shards(tmp_path):
    from fastdistill.cache import store

    folder = str(tmp_path / "c")
    ids, rec, written = _write_cache(folder)
    assert len(written) == 2 and not [p for p in os.listdir(os.path.join(folder, "shards")) if "tmp" in p]
    reader = store.CacheReader(folder)
    got = reader.lookup([store.sequence_key(ids[j].numpy()) for j in (4, 1)])
    assert torch.equal(got.indices, rec.indices[[4, 1]])
    assert (got.logprobs - rec.logprobs[[4, 1]]).abs().max() <= STEP + 1e-5
    # one flipped byte in the middle of a shard: detected by its checksum, the file named
    data = bytearray(open(written[1], "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(written[1], "wb").write(bytes(data))
    with pytest.raises(store.CacheError, match=rf"shard '{written[1]}' is corrupt or truncated"):
        store.CacheReader(folder)
    # truncated
    open(written[1], "wb").write(bytes(data[: len(data) // 3]))
    with pytest.raises(store.CacheError, match=rf"shard '{written[1]}' is corrupt or truncated"):
        store.CacheReader(folder)
    # a shard the finished manifest lists but that is gone
    m = store.read_manifest(folder)
    m.update(complete=True, shards=[{"file": os.path.basename(p), "sequences": 3} for p in written])
    store.write_manifest(folder, m)
    os.remove(written[1])
    with pytest.raises(
        store.CacheError, match=rf"shard '{os.path.basename(written[1])}' listed in manifest.json is missing"
    ):
        store.CacheReader(folder)


def test_missing_sequence_error_or_skip(tmp_path):
    """The trainer's reader: a sequence not in the cache is an error naming its key, or (missing=skip) its rows are
    left out (labels ignored) and counted."""
    from fastdistill.cache import source, store
    from fastdistill.train.config import validate
    from fastdistill.train.data import Sampler

    folder = str(tmp_path / "c")
    ids, rec, _ = _write_cache(folder)
    other = torch.randint(0, 50, (2, ids.shape[1]), generator=torch.Generator().manual_seed(1))
    seqs = torch.cat([ids[:2], other])
    for missing in ("error", "skip"):
        cfg = validate(
            {
                "run": {"output_dir": str(tmp_path)},
                "teacher": {"cache": folder},
                "student": {"model": "x"},
                "data": {"tokenizer": "bytes", "seq_len": ids.shape[1]},
                "cache": {"missing": missing, "k": 4},
            }
        )
        src = source.CachedTeacher(cfg, Sampler(seqs, 4, 0, 1, 0, shuffle=False), 0, 1, 0)
        try:
            if missing == "error":
                key = store.sequence_key(other[0].numpy()).hex()
                with pytest.raises(store.CacheError, match=f"has no targets for the sequence with key {key}"):
                    src.batch(0)
            else:
                input_ids, labels, record, _ = src.batch(0)
                assert isinstance(record, tg.TopKTargets) and src.missing == 2
                assert (labels[2:] == -100).all() and (labels[:2] != -100).any(-1).all()
                assert torch.equal(record.indices[:2], rec.indices[:2])
        finally:
            src.close()


# ---------------------------------------------------------------------------------------------------------------
# build and train under the deepspeed launcher
# ---------------------------------------------------------------------------------------------------------------
def build_args(folder: str, teacher: str, *overrides: str) -> list[str]:
    common = ["teacher.model=" + teacher, "teacher.config=null", "cache.shard_sequences=4", "cache.k=16"]
    return ["build", "--config", TINY, "--output", folder, *common, *overrides]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    return save_tiny_teacher(str(tmp_path_factory.mktemp("teacher")), TINY)


@pytest.fixture(scope="module")
def zero3_cache(teacher_dir, tmp_path_factory) -> str:
    """The reference cache: a 2-rank ZeRO-3 build of the tiny config's 64 training sequences (k = 16)."""
    folder = str(tmp_path_factory.mktemp("cache") / "zero3")
    check(launch("fastdistill.cache", build_args(folder, teacher_dir), nproc=2))
    return folder


def _all_targets(folder):
    from fastdistill.cache import store

    reader = store.CacheReader(folder)
    keys = sorted(reader.index)
    return keys, reader.lookup(keys)


@launched
def test_zero3_build_equals_unsharded_teacher_topk(zero3_cache, teacher_dir):
    import transformers
    import yaml

    from fastdistill.cache import store
    from fastdistill.train import data as data_lib
    from fastdistill.train.config import validate

    m = store.read_manifest(zero3_cache)
    assert m["complete"] and m["build"]["world_size"] == 2 and m["sequences"] == 64
    assert {s["file"][:4] for s in m["shards"]} == {"r000", "r001"}  # every rank wrote its own shards
    cfg = validate(dict(yaml.safe_load(open(TINY)), run={"output_dir": "x"}))
    train, _ = data_lib.train_heldout(cfg, data_lib.ByteTokenizer())
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        logits = model(train).logits.double()
    ref = torch.log_softmax(logits, dim=-1)
    ref_idx = ref.topk(16, dim=-1).indices.sort(dim=-1).values
    reader = store.CacheReader(zero3_cache)
    got = reader.lookup([store.sequence_key(s.numpy()) for s in train])
    assert torch.equal(got.indices, ref_idx)
    err = (got.logprobs.double() - ref.gather(-1, ref_idx)).abs().max().item()
    assert err <= STEP + 1e-4, err
    tail = torch.logsumexp(ref.scatter(-1, ref_idx, -float("inf")), dim=-1)
    torch.testing.assert_close(got.log_tail[..., 0].double(), tail, rtol=1e-4, atol=1e-4)


@launched
def test_sigkill_mid_build_then_restart_gives_the_same_cache(zero3_cache, teacher_dir, tmp_path):
    from fastdistill.cache import store

    folder = str(tmp_path / "killed")
    # rank 0 SIGKILLs itself after its 3rd step (4 sequences per shard: 2 shards per rank written, 1 maybe)
    proc = launch(
        "fastdistill.cache", build_args(folder, teacher_dir), nproc=2, env={"FASTDISTILL_FAULT_KILL_AT_STEP": "3"}
    )
    assert proc.returncode != 0
    partial = store.list_shards(folder)
    assert partial and not store.read_manifest(folder)["complete"]
    done = sum(len(store.shard_keys(p)) for p in partial)
    assert 0 < done < 64
    for p in partial:
        store.verify_shard(p)  # never a partial shard visible
    # finish on one process (another world size): only the missing sequences are scored
    proc = launch("fastdistill.cache", build_args(folder, teacher_dir), nproc=None)
    check(proc)
    assert f"{done} already cached, {64 - done} to score" in proc.stdout
    m = store.read_manifest(folder)
    assert m["complete"] and m["sequences"] == 64  # no sequence written twice
    keys, got = _all_targets(folder)
    ref_keys, ref = _all_targets(zero3_cache)
    assert keys == ref_keys
    assert torch.equal(got.indices, ref.indices)
    # the same values up to the float rounding of two teacher layouts (2 ZeRO-3 ranks / 1 rank, other batch rows),
    # which can move a log-prob that sits on a rounding boundary of the coding by one step
    diff = (got.logprobs - ref.logprobs).abs()
    off = diff > 1e-4
    assert off.float().mean() < 1e-3 and diff.max() <= STEP + 1e-4, (off.sum(), diff.max())
    torch.testing.assert_close(got.log_tail, ref.log_tail, rtol=1e-5, atol=1e-6)
    info = launch("fastdistill.cache", ["info", folder, "teacher.config=null", "--json", "--config", TINY], nproc=None)
    check(info)
    out = json.loads(info.stdout)
    assert out["sequences"] == 64 and out["tokens"] == 64 * 32 and out["k"] == 16
    assert out["run_covered"] == out["run_sequences"] == 64
    assert 0 < out["topk_mass_p5"] <= out["topk_mass_mean"] < 1 and 0 < out["bytes_per_token"] < 100


def train_from_cache(cache: str, out: str, nproc: int | None, *overrides: str, dump: bool = False) -> str:
    """``fastdistill.train`` on the tiny config with ``teacher.cache`` (3 steps, no checkpoints); returns ``out``."""
    args = ["--config", TINY, f"teacher.cache={cache}", "teacher.config=null", "cache.k=16", "run.resume=never"]
    args += ["logging.progress_bar=false", "schedule.save_every=0", "schedule.max_steps=3", f"run.output_dir={out}"]
    env = {"FASTDISTILL_DEBUG_CACHE_DUMP": os.path.join(out, "served")} if dump else {}
    os.makedirs(out, exist_ok=True)
    check(launch("fastdistill.train", [*args, *overrides], nproc, env))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 3 and summary["cache_missing_sequences"] == 0
    assert summary["student_ppl_after"] < summary["student_ppl_before"]
    return out


@pytest.fixture(scope="module")
def zero0_student_from_cache(zero3_cache, tmp_path_factory) -> str:
    """2 ranks, seed 1, a ZeRO-0 student trained from the cache (what every rank served is dumped)."""
    out = str(tmp_path_factory.mktemp("zero0_from_cache"))
    return train_from_cache(zero3_cache, out, 2, "run.seed=1", "student.deepspeed.stage=0", dump=True)


def served_targets(out: str) -> dict:
    served = {}
    for f in os.listdir(out):
        if f.startswith("served.rank"):
            served.update(torch.load(os.path.join(out, f)))
    return served


@launched
def test_two_ranks_seed1_and_one_rank_seed7_read_identical_targets(zero3_cache, zero0_student_from_cache, tmp_path):
    one = train_from_cache(zero3_cache, str(tmp_path / "one"), None, "run.seed=7", dump=True)
    two, one = served_targets(zero0_student_from_cache), served_targets(one)
    common_keys = sorted(set(two) & set(one))
    assert len(common_keys) >= 2, (len(two), len(one))
    for key in common_keys:
        (v2, i2), (v1, i1) = two[key], one[key]
        assert torch.equal(i2, i1) and torch.equal(v2, v1), key


@launched
def test_zero3_student_from_cache_follows_the_zero0_trajectory(zero3_cache, zero0_student_from_cache, tmp_path):
    """The same 2-rank run with the student sharded by ZeRO-3 (parameters, gradients and optimizer state split over
    the ranks, the partitioned lm_head gathered for the fused top-k loss): the same losses, step for step.

    Tolerance: both runs compute every step in float32 on the same data and targets; they differ only in how the
    gradients are reduced (ZeRO-0: one all-reduce of the flat gradient buffer; ZeRO-3: a reduce-scatter of
    partitions, in another bucket order) and so round differently in the last bits (float32 eps = 1.2e-7 per
    operation), which over 3 Adam steps can move the losses by ~1e-7 relative (measured on the CPU build here: 0, the
    two trajectories are bitwise equal; the difference is printed). 1e-5 relative leaves room for another BLAS or
    reduction order and is far below any real defect: a wrong shard, a missing gather or a doubled gradient changes
    the loss by more than the whole KD term (~5e-4 of the loss with this tiny random teacher)."""
    out = train_from_cache(zero3_cache, str(tmp_path / "zero3"), 2, "run.seed=1", "student.deepspeed.stage=3")
    ref, got = losses(zero0_student_from_cache), losses(out)
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    rel = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)
    print(f"ZeRO-3 vs ZeRO-0 student from the cache: max relative loss difference {rel:.2e}")
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=0), (step, got[step], ref[step])
    assert got[1] == ref[1]  # step 1 runs before any update: the forward of the same weights on the same batch
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["world_size"] == 2
    import transformers

    exported = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "student"))  # gathered from ZeRO-3
    assert exported.config.num_hidden_layers == 2


@launched
def test_mismatched_manifest_is_an_error_naming_both_values(zero3_cache, teacher_dir, tmp_path):
    from fastdistill.cache import source, store
    from fastdistill.train.config import load_config

    cfg = load_config(TINY, [f"teacher.cache={zero3_cache}", "teacher.config=null", "data.seq_len=16"])
    with pytest.raises(store.CacheError, match=r"built with seq_len=32, but the run has seq_len=16"):
        source.check_run(cfg, 256)
    other = str(tmp_path / "other_teacher")
    shutil.copytree(teacher_dir, other)
    with open(os.path.join(other, "config.json")) as f:
        c = json.load(f)
    c["rms_norm_eps"] = 1e-5
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(c, f)
    cfg = load_config(TINY, [f"teacher.cache={zero3_cache}", f"teacher.model={other}", "teacher.config=null"])
    with pytest.raises(
        store.CacheError, match=r"built with teacher_sha256='[0-9a-f]{64}', but the run has teacher_sha"
    ):
        source.check_run(cfg, 256)
    kd2 = "losses=[{type: logit_kd, temperature: 2.0}]"
    cfg = load_config(TINY, [f"teacher.cache={zero3_cache}", "teacher.config=null", kd2])
    with pytest.raises(ValueError, match=r"temperature 2.0 is not among the record's temperatures \[1.0\]"):
        source.check_run(cfg, 256)
    # a build into that folder with another k is refused (teacher-cache build runs this check before scoring)
    manifest = store.read_manifest(zero3_cache)
    with pytest.raises(store.CacheError, match=r"built with k=16, but this build has k=8"):
        store.check_identity(zero3_cache, manifest, dict(manifest["identity"], k=8), "this build")
