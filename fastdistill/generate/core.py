"""Batched sampling with a KV cache from any Hugging Face causal LM, sharded (ZeRO-3) or not.

The one generation function of the recipe: the teacher uses it to write datasets (``fastdistill generate``, weak
labels, Socratic chains), and an on-policy stage can call it with the student's module in the same way.

ZeRO-3: decoding through the engine's hooks would all-gather every layer once per generated token (DeepSpeedExamples
#718 measures ~100x slower). ``unsharded`` instead all-gathers every parameter once (one collective per generation
batch, every rank takes part) and binds the gathered tensors into a parameter-less replica of the model, so the
decoding loop runs with no collective and no hook; the replica is unbound (back to the meta device) on exit, so
between batches each rank holds only its shard.

Sampling is a pure function of (seed, prompt id, sample index): each row draws from its own ``torch.Generator``, so
results do not depend on the batch a prompt lands in, on the world size, or on a resume.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
from torch import nn


# ---------------------------------------------------------------------------------------------------------------
# sharded models: gather once per batch
# ---------------------------------------------------------------------------------------------------------------
def is_sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _replica(model: nn.Module) -> nn.Module:
    """A parameter-less (meta device) copy of ``model``'s architecture, built once and cached on the model."""
    rep = getattr(model, "_fastdistill_replica", None)
    if rep is None:
        from transformers import AutoModelForCausalLM

        cfg = copy.deepcopy(model.config)
        with torch.device("meta"):
            rep = AutoModelForCausalLM.from_config(cfg, dtype=next(model.parameters()).dtype)
        rep.eval()
        rep.requires_grad_(False)
        object.__setattr__(model, "_fastdistill_replica", rep)  # not a submodule: ZeRO must not see it
    return rep


def _bind(replica: nn.Module, tensors: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> dict:
    previous = {}
    for kind, items in (("_parameters", tensors), ("_buffers", buffers)):
        for name, t in items.items():
            owner_name, _, attr = name.rpartition(".")
            owner = replica.get_submodule(owner_name) if owner_name else replica
            previous[(owner_name, kind, attr)] = getattr(owner, kind)[attr]
            getattr(owner, kind)[attr] = nn.Parameter(t, requires_grad=False) if kind == "_parameters" else t
    return previous


def _unbind(replica: nn.Module, previous: dict) -> None:
    for (owner_name, kind, attr), t in previous.items():
        owner = replica.get_submodule(owner_name) if owner_name else replica
        getattr(owner, kind)[attr] = t


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """``model`` itself when it is not ZeRO-3 partitioned; else a replica bound to the all-gathered parameters for
    the ``with`` body (a collective: every rank enters, also a rank with nothing to generate)."""
    if not is_sharded(model):
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        replica = _replica(model)
        params = {n: p.data for n, p in model.named_parameters(remove_duplicate=False)}
        buffers = {n: b for n, b in model.named_buffers(remove_duplicate=False)}
        previous = _bind(replica, params, buffers)
        try:
            yield replica
        finally:
            _unbind(replica, previous)  # drop every reference to the gathered storage before ZeRO frees it


# ---------------------------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SamplingConfig:
    """How to sample. ``temperature`` 0 is greedy; ``top_p`` 1 keeps the whole distribution; ``top_k_record`` > 0
    also records the model's k most likely tokens (and their log-probs) at every generated position."""

    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    top_k_record: int = 0

    def __post_init__(self):
        checks = [
            ("num_samples", self.num_samples >= 1, "an integer >= 1"),
            ("temperature", self.temperature >= 0, "a number >= 0 (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
            ("top_k_record", self.top_k_record >= 0, "an integer >= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"sampling.{name}: got {getattr(self, name)!r}; expected {expected}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"sampling.stop: got {self.stop!r}; expected a list of non-empty strings")


@dataclass
class Sample:
    """One generated continuation: text (cut before the first stop string), token ids, the model's log-prob of each
    token (temperature 1, i.e. the model's own distribution), why it ended, and optionally the top-k per position."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "eos" | "stop" | "length"
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


def row_seed(seed: int, prompt_id: int, sample_index: int) -> int:
    """The seed of one row's generator: a fixed mix of (seed, prompt id, sample index), independent of batching."""
    x = (seed * 0x9E3779B97F4A7C15 + prompt_id * 0xBF58476D1CE4E5B9 + sample_index * 0x94D049BB133111EB) % (1 << 63)
    x ^= x >> 31
    return x % (1 << 63)


def _pick(logits: torch.Tensor, cfg: SamplingConfig, gens: list[torch.Generator], active: torch.Tensor):
    """Next token per row [R] from float32 ``logits`` [R, V]: greedy, or temperature + nucleus sampling."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        probs = _nucleus(probs, cfg.top_p)
    out = torch.zeros(len(gens), dtype=torch.long)
    for r, g in enumerate(gens):
        if active[r]:  # finished rows draw nothing, so every row's random stream depends only on its own tokens
            out[r] = torch.multinomial(probs[r], 1, generator=g)[0]
    return out


def _nucleus(probs: torch.Tensor, top_p: float, k: int = 256) -> torch.Tensor:
    """``probs`` [R, V] with every token outside its row's nucleus zeroed: the nucleus is the smallest prefix of the
    row sorted by descending probability whose mass reaches ``top_p``. Exact, without sorting whole rows: the prefix
    sums of the top ``k`` are those of the full sort, so a row whose top ``k`` reach ``top_p`` has its nucleus there;
    only the other rows (flat distributions) are sorted in full. A full sort of [64, 49152] costs ~0.3 s on one core,
    a third of a 135M model's decode step."""
    k = min(k, probs.shape[-1])
    top, order = probs.topk(k, dim=-1)  # sorted, descending
    sums = top.cumsum(-1)
    wide = (sums[:, -1] < top_p).nonzero()[:, 0]  # rows whose top k hold less than top_p: the nucleus reaches past
    out = torch.zeros_like(probs).scatter_(-1, order, top * (sums - top < top_p))
    if len(wide):
        sorted_p, full = probs[wide].sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        out[wide] = torch.zeros_like(sorted_p).scatter_(-1, full, sorted_p * keep)
    return out


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    pos = mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    prompt_ids: list[int],
    cfg: SamplingConfig,
    eos_token_ids: list[int] | None = None,
) -> list[list[Sample]]:
    """``cfg.num_samples`` continuations of each tokenized prompt (one batch, left-padded, one prefill whose KV cache
    is repeated per sample, then one token per step for every row until all rows end).

    Args:
        model: a causal LM (``*ForCausalLM``); pass it inside ``unsharded`` when it may be ZeRO-3 partitioned.
        tokenizer: decodes the samples (and checks stop strings).
        prompts: token ids per prompt (non-empty).
        prompt_ids: one integer per prompt: with ``cfg.seed`` it seeds the prompt's rows.
        cfg: the sampling settings.
        eos_token_ids: tokens that end a sample (default: the tokenizer's / model config's eos).
    Returns:
        per prompt, ``cfg.num_samples`` ``Sample``.
    Example:
        >>> out = sample(model, tok, [tok("Hi")["input_ids"]], [0], SamplingConfig(num_samples=2, temperature=0.7))
    """
    if len(prompts) != len(prompt_ids):
        raise ValueError(f"sample: {len(prompts)} prompts but {len(prompt_ids)} prompt_ids")
    if not prompts:
        return []
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"sample: prompt {prompt_ids[i]} is empty (no tokens)")
    if eos_token_ids is None:
        eos_token_ids = _eos_ids(model, tokenizer)
    eos = set(eos_token_ids)
    pad = eos_token_ids[0] if eos_token_ids else 0
    device = next(model.parameters()).device
    n, b = cfg.num_samples, len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at the last column
        input_ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=_position_ids(mask).to(device),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = _cache_of(out)
    logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)  # [B * N, V]
    del out
    if n > 1:
        cache.batch_repeat_interleave(n)
    mask = mask.repeat_interleave(n, dim=0)
    rows = b * n
    gens = [torch.Generator().manual_seed(row_seed(cfg.seed, prompt_ids[r // n], r % n)) for r in range(rows)]
    tokens: list[list[int]] = [[] for _ in range(rows)]
    logps: list[list[float]] = [[] for _ in range(rows)]
    topk_i: list[list[list[int]]] = [[] for _ in range(rows)]
    topk_l: list[list[list[float]]] = [[] for _ in range(rows)]
    finish = [""] * rows
    cut = [None] * rows
    active = torch.ones(rows, dtype=torch.bool)
    for step in range(cfg.max_new_tokens):
        logp = torch.log_softmax(logits.cpu(), dim=-1)  # the model's distribution (temperature 1), recorded
        nxt = _pick(logits.cpu(), cfg, gens, active)
        if cfg.top_k_record:
            tk_l, tk_i = logp.topk(min(cfg.top_k_record, logp.shape[-1]), dim=-1)
        chosen = logp.gather(-1, nxt[:, None])[:, 0]
        for r in range(rows):
            if not active[r]:
                continue
            t = int(nxt[r])
            tokens[r].append(t)
            logps[r].append(float(chosen[r]))
            if cfg.top_k_record:
                topk_i[r].append(tk_i[r].tolist())
                topk_l[r].append(tk_l[r].tolist())
            if t in eos:
                finish[r] = "eos"
                active[r] = False
            elif cfg.stop:
                text = tokenizer.decode(tokens[r], skip_special_tokens=False)
                hits = [text.find(s) for s in cfg.stop if s in text]
                if hits:
                    finish[r], cut[r] = "stop", min(hits)
                    active[r] = False
        if not bool(active.any()) or step == cfg.max_new_tokens - 1:
            break
        feed = torch.where(active, nxt, torch.full_like(nxt, pad))
        mask = torch.cat([mask, active.long()[:, None]], dim=1)
        pos = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)
        out = model(
            input_ids=feed[:, None].to(device),
            attention_mask=mask.to(device),
            position_ids=pos.to(device),
            use_cache=True,
            **{_cache_kwarg(model): cache},
        )
        cache = _cache_of(out)
        logits = out.logits[:, -1].float()
        del out
    results: list[list[Sample]] = []
    for i in range(b):
        group = []
        for j in range(n):
            r = i * n + j
            ids = tokens[r]
            body = ids[:-1] if finish[r] == "eos" else ids
            text = tokenizer.decode(body, skip_special_tokens=False)
            if cut[r] is not None:
                text = text[: cut[r]]
            group.append(
                Sample(
                    text=text,
                    token_ids=ids,
                    logprobs=logps[r],
                    finish_reason=finish[r] or "length",
                    topk_ids=topk_i[r] if cfg.top_k_record else None,
                    topk_logprobs=topk_l[r] if cfg.top_k_record else None,
                )
            )
        results.append(group)
    return results


def _cache_kwarg(model: nn.Module) -> str:
    # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` before, now deprecated)
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    ids: list[int] = []
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.append(source)
        elif isinstance(source, (list, tuple)):
            ids.extend(int(x) for x in source)
    return list(dict.fromkeys(ids))


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module,
    contexts: list[list[int]],
    continuations: list[list[int]],
    batch_size: int = 16,
    share_prefix: bool = True,
) -> torch.Tensor:
    """log P(continuation | context) summed over the continuation's tokens, for every (context, continuation) pair:
    a [len(contexts), len(continuations)] float64 tensor. Single-token continuations cost one forward per context
    (the next-token distribution); longer ones one forward per pair. Pass ``model`` inside ``unsharded``.

    With ``share_prefix``, the tokens every sequence of a batch starts with (e.g. the prompt that N sampled chains
    continue) are run once and their KV cache is shared by the batch's rows, which then run only their own tokens."""
    if not continuations or any(not c for c in continuations):
        raise ValueError(f"continuation_logprobs: expected non-empty token lists, got {continuations!r}")
    device = next(model.parameters()).device
    single = all(len(c) == 1 for c in continuations)
    out = torch.empty(len(contexts), len(continuations), dtype=torch.float64)
    pairs = (
        [(i, -1, ctx) for i, ctx in enumerate(contexts)]
        if single
        else [(i, j, ctx + cont) for i, ctx in enumerate(contexts) for j, cont in enumerate(continuations)]
    )
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        # left padding puts every continuation at the end: only the last `keep` positions' logits are formed
        keep = 1 if single else max(len(continuations[j]) for _, j, _ in chunk) + 1
        seqs = [x[2] for x in chunk]
        shared = _common_prefix(seqs) if share_prefix and len(chunk) > 1 else 0
        shared = max(0, min(shared, min(len(q) for q in seqs) - keep))  # every row keeps its scored positions
        if shared < MIN_SHARED_PREFIX:  # too short to be worth a second forward: the rows run whole
            shared = 0
        width = max(len(q) for q in seqs) - shared
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, seq in enumerate(seqs):
            ids[r, width - len(seq) + shared :] = torch.tensor(seq[shared:])
            mask[r, width - len(seq) + shared :] = 1
        if shared:
            prefix = model(input_ids=torch.tensor([seqs[0][:shared]], device=device), use_cache=True, logits_to_keep=1)
            cache = _cache_of(prefix)
            del prefix
            cache.batch_repeat_interleave(len(chunk))
            logits = model(
                input_ids=ids.to(device),
                attention_mask=torch.cat([torch.ones((len(chunk), shared), dtype=torch.long), mask], 1).to(device),
                position_ids=(shared + _position_ids(mask)).to(device),
                use_cache=True,
                logits_to_keep=keep,
                **{_cache_kwarg(model): cache},
            ).logits  # [B, keep, V]
            del cache
        else:
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=_position_ids(mask).to(device),
                logits_to_keep=keep,
            ).logits  # [B, keep, V]
        logp = torch.log_softmax(logits.double().cpu(), dim=-1)
        for r, (i, j, seq) in enumerate(chunk):
            if single:
                out[i] = logp[r, -1, [c[0] for c in continuations]]
            else:
                k = len(continuations[j])
                targets = torch.tensor(seq[-k:])
                out[i, j] = logp[r, keep - k - 1 : keep - 1].gather(-1, targets[:, None]).sum()
    return out


MIN_SHARED_PREFIX = 8  # shared tokens below which one forward over whole rows is cheaper than prefix + rows


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(q) for q in seqs)
    first = seqs[0]
    for q in seqs[1:]:
        i = 0
        while i < n and q[i] == first[i]:
            i += 1
        n = i
    return n
