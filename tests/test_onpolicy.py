"""On-policy distillation (``onpolicy:``): the loss on (prompt, completion) pairs against TRL's GKD loss and a float64
reference, prompt and padding positions contributing nothing; config errors; ZeRO-3 generation on 2 ranks against
the unsharded student (with the gathers counted); ``fraction=0`` reproducing the off-policy trainer; and a run killed
and resumed with ``fraction=1`` and a replay buffer following the same trajectory."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from _launch import DEEPSPEED, REPO, TIMEOUT, check, free_port, launched, run_env  # noqa: E402

import fastdistill.functional as FD
from fastdistill.train import onpolicy
from fastdistill.train.config import ConfigError, validate
from fastdistill.train.data import IGNORE_INDEX

TINY = os.path.join(REPO, "configs", "tiny_llama_zero3.yaml")


def seed_of(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


# ---------------------------------------------------------------------------------------------------------------
# the loss on generated tokens only
# ---------------------------------------------------------------------------------------------------------------
def pairs(gen: torch.Generator, vocab: int):
    """Fixed-size set of ragged (prompt, completion) pairs; one row is batch padding (no valid label)."""
    lens = [(3, 5), (1, 7), (6, 1), (4, 4), (2, 0)]
    prompts = [torch.randint(0, vocab, (p,), generator=gen).tolist() for p, _ in lens]
    completions = [torch.randint(0, vocab, (c,), generator=gen).tolist() for _, c in lens]
    real = [True, True, True, True, False]
    return prompts, completions, real


def trl_labels(input_ids: torch.Tensor, prompts, completions, real) -> torch.Tensor:
    """TRL's convention, built independently: labels = input ids, -100 on the prompt and after the completion."""
    labels = input_ids.clone()
    for i, (p, c) in enumerate(zip(prompts, completions)):
        labels[i, : len(p)] = -100
        labels[i, len(p) + len(c) :] = -100
        if not real[i]:
            labels[i] = -100
    return labels


def gjsd64(s_logits, t_logits, mask, beta, temperature):
    """Generalized JSD in float64 from its definition, mean over the masked rows (TRL's batchmean)."""
    ls = torch.log_softmax(s_logits.double() / temperature, -1)
    lt = torch.log_softmax(t_logits.double() / temperature, -1)
    ps, pt = ls.exp(), lt.exp()
    if beta == 0:
        rows = (pt * (lt - ls)).sum(-1)
    elif beta == 1:
        rows = (ps * (ls - lt)).sum(-1)
    else:
        lm = torch.log((1 - beta) * ps + beta * pt)
        rows = beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)
    return rows[mask].sum() / mask.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.9], ids=["T1", "T0.9"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0], ids=["beta0", "beta0.5", "beta1"])
def test_loss_on_completions_matches_trl_gkd_and_float64(beta, temperature, request):
    gkd = pytest.importorskip("trl.experimental.gkd")
    gen = torch.Generator().manual_seed(seed_of(request))
    V, Hs, Ht = 97, 16, 24
    prompts, completions, real = pairs(gen, V)
    input_ids, labels = onpolicy.completion_batch(prompts, completions, real)
    B, W = input_ids.shape
    hs = torch.randn(B, W, Hs, generator=gen)
    ws = torch.randn(V, Hs, generator=gen) * 0.5
    ht = torch.randn(B, W, Ht, generator=gen)
    wt = torch.randn(V, Ht, generator=gen) * 0.5
    s_logits, t_logits = hs @ ws.t(), ht @ wt.t()

    # TRL: logits shifted by one against labels that are the input ids with prompt / padding masked
    ref_labels = trl_labels(input_ids, prompts, completions, real)
    trl = gkd.GKDTrainer.generalized_jsd_loss(
        s_logits[:, :-1], t_logits[:, :-1], ref_labels[:, 1:], beta=beta, temperature=temperature
    )
    assert torch.equal(labels[:, :-1], ref_labels[:, 1:].masked_fill(ref_labels[:, 1:] == -100, IGNORE_INDEX))
    ours = FD.fused_linear_distill_loss(
        hs, ws, ht, wt, labels, divergence="jsd", beta=beta, temperature=temperature, scale_by_t2=False
    )
    mask = labels != IGNORE_INDEX
    assert int(mask.sum()) == sum(len(c) for c, r in zip(completions, real) if r)
    ref64 = gjsd64(s_logits, t_logits, mask, beta, temperature)
    torch.testing.assert_close(ours.double(), trl.double(), rtol=1e-5, atol=1e-5)
    # no further from float64 than TRL's own float32 computation (or 1e-6)
    err_ours, err_trl = abs(ours.double() - ref64).item(), abs(trl.double() - ref64).item()
    assert err_ours <= max(2 * err_trl, 1e-6), (err_ours, err_trl)


def test_prompt_and_padding_positions_contribute_nothing(request):
    gen = torch.Generator().manual_seed(seed_of(request))
    V, H = 61, 12
    prompts, completions, real = pairs(gen, V)
    input_ids, labels = onpolicy.completion_batch(prompts, completions, real)
    hs = torch.randn(*input_ids.shape, H, generator=gen)
    ws = torch.randn(V, H, generator=gen)
    ht = torch.randn(*input_ids.shape, H, generator=gen)
    wt = torch.randn(V, H, generator=gen)
    ignored = labels == IGNORE_INDEX
    assert ignored.any() and (~ignored).any()

    def loss_and_grad(hs, ht):
        x = hs.clone().requires_grad_(True)
        loss = FD.fused_linear_distill_loss(x, ws, ht, wt, labels, divergence="jsd", beta=0.5)
        loss.backward()
        return loss.detach(), x.grad

    base, grad = loss_and_grad(hs, ht)
    noisy_s = torch.where(ignored[..., None], hs + 100 * torch.randn(hs.shape, generator=gen), hs)
    noisy_t = torch.where(ignored[..., None], ht - 100 * torch.randn(ht.shape, generator=gen), ht)
    again, grad2 = loss_and_grad(noisy_s, noisy_t)
    assert torch.equal(base, again)
    assert torch.count_nonzero(grad[ignored]) == 0 and torch.count_nonzero(grad2[ignored]) == 0
    assert torch.count_nonzero(grad[~ignored]) > 0


def test_trainer_loss_module_is_trls_at_temperature_1(request):
    """The trainer's DistillLoss with the on-policy default loss (generalized JSD, beta 0.5) is TRL's GKD loss."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    from fastdistill.train.losses import DistillLoss

    gen = torch.Generator().manual_seed(seed_of(request))
    V, H = 53, 8
    prompts, completions, real = pairs(gen, V)
    input_ids, labels = onpolicy.completion_batch(prompts, completions, real)
    hs, ht = torch.randn(*input_ids.shape, H, generator=gen), torch.randn(*input_ids.shape, H, generator=gen)
    ws, wt = torch.randn(V, H, generator=gen), torch.randn(V, H, generator=gen)
    loss_fn = DistillLoss(onpolicy.DEFAULT_LOSSES, "fused", H, H)
    loss, parts = loss_fn(hs, ws, ht, wt, labels)
    ref_labels = trl_labels(input_ids, prompts, completions, real)
    trl = gkd.GKDTrainer.generalized_jsd_loss((hs @ ws.t())[:, :-1], (ht @ wt.t())[:, :-1], ref_labels[:, 1:])
    torch.testing.assert_close(loss, trl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts["kd"], trl.detach(), rtol=1e-5, atol=1e-5)


def test_prompt_lengths_packed_and_split():
    ids = torch.arange(24).view(3, 8)
    labels = torch.full((3, 8), IGNORE_INDEX)
    labels[0, 2:6] = 1  # prompt of 3 tokens: position 2 predicts the first completion token
    labels[1, 0:7] = 1  # a one-token prompt
    assert onpolicy.prompt_lengths(ids, labels, {"prompt": "split"}) == [3, 1, 1]
    assert onpolicy.prompt_lengths(ids, labels, {"prompt": "packed", "prompt_tokens": 5}) == [5, 5, 5]


def test_draws_depend_on_seed_and_step_only():
    a = [onpolicy._coin(3, k, 0) for k in range(200)]
    assert a == [onpolicy._coin(3, k, 0) for k in range(200)]
    assert a != [onpolicy._coin(4, k, 0) for k in range(200)]
    share = sum(x < 0.3 for x in a) / len(a)
    assert 0.2 < share < 0.4, share


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------
def tiny_cfg(**onp) -> dict:
    import yaml

    cfg = yaml.safe_load(open(TINY))
    cfg["onpolicy"] = onp
    return cfg


def test_defaults_and_default_loss():
    cfg = tiny_cfg()
    del cfg["losses"]
    out = validate(cfg)
    o = out["onpolicy"]
    assert o["fraction"] == 0.5 and o["temperature"] == 0.9 and o["prompt_tokens"] == 16 and not o["seq_kd"]
    assert out["losses"] == onpolicy.DEFAULT_LOSSES  # generalized JSD, beta 0.5 (TRL's default)
    assert validate(tiny_cfg())["losses"][0]["divergence"] == "forward_kl"  # the user's losses are kept
    assert validate({**tiny_cfg(), "onpolicy": None})["onpolicy"] is None


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"fraction": 1.5}, r"onpolicy\.fraction: got 1\.5; expected a number in \[0, 1\]"),
        ({"fraction": "all"}, r"onpolicy\.fraction: got 'all'"),
        ({"max_new_tokens": 0}, r"onpolicy\.max_new_tokens: got 0; expected an integer >= 1"),
        ({"temperature": -1}, r"onpolicy\.temperature: got -1; expected a number >= 0"),
        ({"top_p": 0}, r"onpolicy\.top_p: got 0; expected a number in \(0, 1\]"),
        ({"prompt": "chat"}, r"onpolicy\.prompt: got 'chat'; expected one of \['packed', 'dataset'\]"),
        ({"prompt_tokens": 32}, r"onpolicy\.prompt_tokens: got 32; expected an integer in \[1, data\.seq_len - 1"),
        ({"replay_capacity": -1}, r"onpolicy\.replay_capacity: got -1; expected an integer >= 0"),
        ({"replay_reuse": 1.0}, r"onpolicy\.replay_reuse: got 1\.0; expected a number in \[0, 1\)"),
        ({"seq_kd": "yes"}, r"onpolicy\.seq_kd: got 'yes'; expected true/false"),
        ({"lmbda": 0.5}, r"unknown key 'onpolicy\.lmbda'; expected one of \["),
    ],
    ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else "",
)
def test_config_errors_name_key_value_and_expectation(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(tiny_cfg(**overrides))


def test_rejected_with_a_teacher_cache_and_with_pools(tmp_path):
    cfg = tiny_cfg()
    cfg["teacher"] = {"cache": str(tmp_path)}
    cfg["student"] = {"config": dict(tiny_cfg()["teacher"]["config"])}
    with pytest.raises(ConfigError, match=r"onpolicy: a teacher\.cache .* needs a live teacher"):
        validate(cfg)
    # with `pools` on-policy runs (tests/test_pools_onpolicy.py checks what a pool does not support)
    with pytest.raises(ConfigError, match=r"onpolicy: expected a mapping"):
        validate({**tiny_cfg(), "onpolicy": 0.5})


# ---------------------------------------------------------------------------------------------------------------
# launched: ZeRO-3 generation on 2 ranks, and the trainer
# ---------------------------------------------------------------------------------------------------------------
@launched
def test_zero3_generation_on_two_ranks_equals_the_unsharded_student_with_one_gather_per_call(tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _onpolicy_zero3_worker as W

    from fastdistill.train.data import ByteTokenizer

    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += [os.path.join(REPO, "tests", "_onpolicy_zero3_worker.py"), str(tmp_path)]
    check(subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=TIMEOUT))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["held"] * 2 <= ranks[0]["full"] + 64  # each rank holds its half of the student (ZeRO-3)
    model = W.build_model().eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for key in W.CASES:
            for r, res in enumerate(ranks):
                got = res[key]
                assert got["calls"] == got["gathers"] == 2, got  # one all-gather per generation call
                ref = onpolicy.OnPolicy(W.onpolicy_cfg(*key), W.Packed(r), model, model, ByteTokenizer(), r, 2)
                for k in range(2):
                    ids, labels = ref.batch(k)
                    assert torch.equal(got["batches"][k][0], ids), (key, r, k)
                    assert torch.equal(got["batches"][k][1], labels), (key, r, k)
    finally:
        torch.set_num_threads(threads)
    # the collectives of one call do not grow with the number of generated tokens: no per-token gathering
    for res in ranks:
        short, long = res[W.CASES[0]]["collectives"], res[W.CASES[1]]["collectives"]
        assert min(short) > 0 and all(res[c]["collectives"] == short for c in W.CASES), (short, long)
        assert max(short) <= len(list(model.parameters())) + 2  # at most one all-gather per parameter tensor
    long_rows = ranks[0][W.CASES[1]]["batches"][0][1]
    assert (long_rows != IGNORE_INDEX).sum(-1).max() > 2  # the long setting did generate more tokens


def train(out: str, *overrides: str, nproc: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    """``fastdistill train`` on the tiny config: one process without the launcher (nproc 0), else ``deepspeed``."""
    base = [sys.executable, "-m", "fastdistill.train"]
    if nproc:
        base = [DEEPSPEED, "--num_gpus", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        base += ["--module", "fastdistill.train"]
    cmd = base + ["--config", TINY, f"run.output_dir={out}", "logging.progress_bar=false", "logging.tensorboard=false"]
    cmd += list(overrides)
    return subprocess.run(cmd, cwd=REPO, env=run_env(**(env or {})), capture_output=True, text=True, timeout=TIMEOUT)


def metrics(out: str) -> dict[int, dict]:
    with open(os.path.join(out, "metrics.csv")) as f:
        return {int(r["step"]): r for r in csv.DictReader(f) if r.get("train/loss")}


ONPOLICY = "onpolicy={fraction: 1.0, max_new_tokens: 6, temperature: 0.9, prompt_tokens: 8, replay_capacity: 2}"


@launched
def test_fraction_zero_reproduces_the_off_policy_trainer(tmp_path):
    short = ["schedule.max_steps=3", "schedule.save_every=0", "run.final_checkpoint=false", "teacher.deepspeed.stage=0"]
    off, zero = str(tmp_path / "off"), str(tmp_path / "zero")
    check(train(off, *short))
    check(train(zero, *short, "onpolicy={fraction: 0.0, max_new_tokens: 4}"))
    a, b = metrics(off), metrics(zero)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for key in ("train/loss", "train/kd", "train/ce"):
            assert float(a[step][key]) == float(b[step][key]), (step, key, a[step][key], b[step][key])
        assert float(b[step]["onpolicy/student_batches"]) == 0.0
    assert json.load(open(os.path.join(zero, "summary.json")))["onpolicy_generation_calls"] == 0


@launched
def test_zero3_student_fraction_one_with_replay_kill_and_resume_follow_the_same_trajectory(tmp_path):
    """2 ranks, teacher and student ZeRO-3, every step on-policy, a replay buffer of 2 batches; rank 0 SIGKILLs itself
    after step 5 (checkpoint at 3), the resumed run restores the buffer and draws what the killed run would have."""
    common = [ONPOLICY, "student.deepspeed.stage=3"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    check(train(ref, *common, nproc=2))
    proc = train(out, *common, nproc=2, env={"FASTDISTILL_FAULT_KILL_AT_STEP": "5"})
    assert proc.returncode != 0
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step0000003"
    assert os.path.isfile(os.path.join(out, "checkpoints", "step0000003", "onpolicy_rank1.pt"))
    check(train(out, *common, nproc=2))
    a, b = metrics(ref), metrics(out)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        for key in ("train/loss", "onpolicy/completion_len", "onpolicy/replayed_batches"):
            assert float(b[step].get(key) or 0) == pytest.approx(float(a[step].get(key) or 0), rel=1e-5, abs=1e-6), (
                step,
                key,
            )
    kinds = [(float(a[s]["onpolicy/student_batches"]), float(a[s]["onpolicy/replayed_batches"])) for s in a]
    assert all(x + y == 1 for x, y in kinds)  # fraction 1: every step is the student's, generated or replayed
    assert any(y for _, y in kinds[3:]) and any(x for x, _ in kinds[3:]), kinds  # after the resume: both kinds
    s = json.load(open(os.path.join(ref, "summary.json")))
    assert s["onpolicy_gathers"] == s["onpolicy_generation_calls"] == sum(x for x, _ in kinds)
    assert 0 < s["onpolicy_mean_completion_len"] <= 6 and s["onpolicy_kd_on_student_samples"] > 0
