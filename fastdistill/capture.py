"""Capture attention queries, keys and values from Hugging Face models during their normal forward pass.

Forward hooks on the attention projections (Llama family: ``q_proj`` / ``k_proj`` / ``v_proj``; GPT-2: ``c_attn``,
split into q, k, v; BERT family: ``query`` / ``key`` / ``value``) hand the projections out as [B, H, L, D] tensors,
so :func:`fastdistill.functional.attention_distill_loss` can be fed without editing model code, while the model keeps
its own attention implementation (SDPA, flash attention or eager): nothing of size [L, L] is formed by the capture.

For the Llama family (and its relatives with the same attention layout: Mistral, Qwen2, ...) the model's rotary
embedding is applied to the captured q and k (the (cos, sin) the attention module receives), and grouped key/value
heads are repeated to the query head count (``repeat_kv=True``), so softmax(q k^T * scaling + mask) of the captured
tensors is the attention map the model really computes. ``scaling(layer)`` gives the model's own softmax scale.

Tensors are captured with their autograd history: a student's captured q/k backpropagate into its projections; run
the teacher under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

PARTS = ("q", "k", "v")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _family(module: torch.nn.Module) -> str | None:
    """Which attention layout ``module`` has, or None when it is not an attention block we know."""
    if all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in ("q_proj", "k_proj", "v_proj")) and hasattr(
        module, "head_dim"
    ):
        return "llama"
    if hasattr(module, "c_attn") and hasattr(module, "head_dim") and not getattr(module, "is_cross_attention", False):
        return "gpt2"
    if all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in ("query", "key", "value")) and hasattr(
        module, "attention_head_size"
    ):
        if type(module).__name__.endswith("CrossAttention"):
            return None
        return "bert"
    return None


def find_attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """(qualified name, module, family) of every self-attention block of ``model``, in model order."""
    return [(name, m, fam) for name, m in model.named_modules() if (fam := _family(m)) is not None]


class AttentionCapture:
    """Context manager that captures q / k / v of chosen attention layers as [B, H, L, D] tensors.

    Args:
        model: a Hugging Face (or compatible) model of the Llama, GPT-2 or BERT families.
        layers: indices into the model's self-attention blocks (in model order; negative indices count from the
            end); None = all.
        what: which of ``"q"``, ``"k"``, ``"v"`` to capture.
        repeat_kv: Llama family with grouped-query attention: repeat the key/value heads to the query head count
            (True), or keep the ``num_key_value_heads`` heads (False).
        apply_rotary: Llama family: apply the model's rotary embedding to q and k (the maps then equal the model's
            real attention maps); False captures the pre-RoPE projections.

    After a forward pass inside the context, ``capture.q[layer]`` / ``capture["k"][layer]`` hold the tensors of
    that layer; each forward overwrites them. Hooks are removed on exit; the captured tensors stay until
    :meth:`clear`.

    Example::

        >>> from fastdistill.capture import AttentionCapture
        >>> import fastdistill.functional as FD
        >>> with torch.no_grad(), AttentionCapture(teacher, layers=[-1]) as tcap:
        ...     teacher(input_ids, attention_mask=mask)
        >>> with AttentionCapture(student, layers=[-1]) as scap:
        ...     out = student(input_ids, attention_mask=mask)
        >>> loss = FD.attention_distill_loss(scap.q[-1], scap.k[-1], tcap.q[-1], tcap.k[-1], attention_mask=mask,
        ...                                  causal=True, relation_heads=8)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Sequence[int] | None = None,
        what: Iterable[str] = ("q", "k"),
        *,
        repeat_kv: bool = True,
        apply_rotary: bool = True,
    ) -> None:
        self.what = tuple(what)
        bad = [w for w in self.what if w not in PARTS]
        if bad or not self.what:
            raise ValueError(f"what={tuple(what)!r} is invalid; expected a non-empty subset of {PARTS}")
        self.modules = find_attention_modules(model)
        if not self.modules:
            raise ValueError(
                f"found no self-attention block of a supported family in {type(model).__name__}; expected Llama-style "
                "(q_proj/k_proj/v_proj), GPT-2-style (c_attn) or BERT-style (query/key/value) attention modules"
            )
        n = len(self.modules)
        self.layers = list(range(n)) if layers is None else list(layers)
        for i in self.layers:
            if not isinstance(i, int) or not -n <= i < n:
                raise ValueError(
                    f"layers contains {i!r}; the model has {n} attention layers (expected -{n} .. {n - 1})"
                )
        self.repeat_kv = repeat_kv
        self.apply_rotary = apply_rotary
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getitem__(self, part: str) -> dict[int, torch.Tensor]:
        if part not in PARTS:
            raise KeyError(f"{part!r}; expected one of {PARTS}")
        return getattr(self, part)

    def scaling(self, layer: int) -> float:
        """The softmax scale the model uses in ``layer`` (e.g. 1/sqrt(head_dim), GPT-2's per-layer variants)."""
        module = self.modules[layer][1]
        scale = getattr(module, "scaling", None)
        if scale is None:
            size = getattr(module, "head_dim", None) or module.attention_head_size
            scale = size**-0.5
        return float(scale)

    def clear(self) -> None:
        self.q.clear()
        self.k.clear()
        self.v.clear()
        self._rope.clear()

    # hooks -------------------------------------------------------------------------------------------------------
    def _store(self, layer: int, part: str, x: torch.Tensor) -> None:
        if part in self.what:
            getattr(self, part)[layer] = x

    def _heads(self, x: torch.Tensor, head_dim: int) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, -1, head_dim).transpose(1, 2)  # [B, H, L, D]

    def _hook_llama(self, layer: int, attn: torch.nn.Module) -> None:
        head_dim = attn.head_dim
        n_heads = attn.q_proj.out_features // head_dim
        n_kv = attn.k_proj.out_features // head_dim

        def pre(module, args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is None and len(args) > 1:
                pe = args[1]
            if pe is not None:
                self._rope[layer] = pe

        def make(part):
            def hook(module, args, out):
                x = self._heads(out, head_dim)
                if part in ("q", "k") and self.apply_rotary:
                    if layer not in self._rope:
                        raise RuntimeError(
                            f"attention layer {layer} got no position_embeddings (cos, sin); capture with "
                            "apply_rotary=False for pre-RoPE q/k"
                        )
                    cos, sin = self._rope[layer]
                    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
                    x = x * cos + _rotate_half(x) * sin
                if part in ("k", "v") and self.repeat_kv and n_kv != n_heads:
                    x = x.repeat_interleave(n_heads // n_kv, dim=1)  # as HF repeat_kv: each KV head serves a group
                self._store(layer, part, x)

            return hook

        self._handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        for part, proj in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj)):
            if part in self.what:
                self._handles.append(proj.register_forward_hook(make(part)))

    def _hook_gpt2(self, layer: int, attn: torch.nn.Module) -> None:
        head_dim = attn.head_dim

        def hook(module, args, out):
            for part, x in zip(PARTS, out.split(out.shape[-1] // 3, dim=-1)):
                self._store(layer, part, self._heads(x, head_dim))

        self._handles.append(attn.c_attn.register_forward_hook(hook))

    def _hook_bert(self, layer: int, attn: torch.nn.Module) -> None:
        head_dim = attn.attention_head_size

        def make(part):
            def hook(module, args, out):
                self._store(layer, part, self._heads(out, head_dim))

            return hook

        for part, proj in (("q", attn.query), ("k", attn.key), ("v", attn.value)):
            if part in self.what:
                self._handles.append(proj.register_forward_hook(make(part)))

    def __enter__(self) -> AttentionCapture:
        if self._handles:
            raise RuntimeError("this AttentionCapture is already active")
        for layer in self.layers:
            _, module, family = self.modules[layer]
            getattr(self, f"_hook_{family}")(layer, module)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._rope.clear()
