"""AttentionCapture on tiny randomly initialized Llama, GPT-2 and BERT models built from configs: the captured q / k
reproduce the models' own (eager) attention maps, feed the attention-distillation loss, and hooks go away on exit."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastdistill.functional as FD  # noqa: E402
from fastdistill.capture import AttentionCapture, find_attention_modules  # noqa: E402

pytestmark = pytest.mark.cpu_only


def _llama(attn="eager", layers=2, hidden=64, heads=4, kv=2):
    cfg = transformers.LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=128,
        vocab_size=128,
        attn_implementation=attn,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2(attn="eager"):
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, attn_implementation=attn
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert(attn="eager"):
    cfg = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return transformers.BertModel(cfg).eval()


BUILDERS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}
CAUSAL = {"llama": True, "gpt2": True, "bert": False}


def _maps(q, k, scale, mask, causal):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    L = s.shape[-1]
    keep = mask.bool()[:, None, None, :].expand(-1, 1, L, L)
    if causal:
        keep = keep & torch.ones(L, L, dtype=torch.bool).tril()
    return s.masked_fill(~keep, float("-inf")).softmax(-1)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_captured_maps_equal_model_attention(family):
    torch.manual_seed(0)
    model = BUILDERS[family]()
    B, L = 2, 13
    ids = torch.randint(0, 128, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 9:] = 0  # right padding on the second example
    with torch.no_grad(), AttentionCapture(model, what=("q", "k", "v")) as cap:
        out = model(ids, attention_mask=mask, output_attentions=True)
    assert len(cap.q) == len(out.attentions) == 2
    for layer, ref in enumerate(out.attentions):
        q, k, v = cap.q[layer], cap.k[layer], cap.v[layer]
        assert q.shape == k.shape == v.shape == (B, 4, L, 16)
        got = _maps(q, k, cap.scaling(layer), mask, CAUSAL[family])
        rows = mask.bool()[:, None, :, None].expand_as(got)  # padded query rows are unspecified in HF
        torch.testing.assert_close(got[rows], ref.double()[rows], atol=2e-5, rtol=1e-4)


def test_llama_kv_heads_and_pre_rope():
    torch.manual_seed(0)
    model = _llama()
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad(), AttentionCapture(model, layers=[-1], what=("k", "v"), repeat_kv=False) as cap:
        model(ids)
    assert set(cap.k) == {-1} and cap.k[-1].shape == (1, 2, 9, 16) and cap.v[-1].shape == (1, 2, 9, 16)
    assert cap.q == {}
    with torch.no_grad(), AttentionCapture(model, layers=[0], apply_rotary=False) as raw:
        model(ids)
    attn = find_attention_modules(model)[0][1]
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        expect = attn.q_proj(hidden).view(1, 9, 4, 16).transpose(1, 2)
    torch.testing.assert_close(raw.q[0], expect)


def test_hooks_removed_and_sdpa_model_untouched():
    torch.manual_seed(0)
    model = _llama(attn="sdpa")
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
    with torch.no_grad(), AttentionCapture(model) as cap:
        got = model(ids).logits
    torch.testing.assert_close(got, ref)  # the capture does not change the model's computation
    assert len(cap.q) == 2
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert n_hooks == 0
    with torch.no_grad():
        model(ids)
    assert cap.q[0].shape == (2, 4, 11, 16)  # kept after exit, not overwritten by a later forward
    cap.clear()
    assert cap.q == {}


def test_distill_through_captured_qk_trains_student():
    """Teacher (4 heads of 16) -> student (2 heads of 16, GQA) with relation heads; gradient reaches q_proj/k_proj,
    and the loss matches the materialized reference."""
    from fastdistill.ops.attention_distill_ref import attention_distill_loss_ref

    torch.manual_seed(0)
    teacher = _llama(attn="sdpa", hidden=64, heads=4, kv=2)
    student = _llama(attn="sdpa", hidden=32, heads=2, kv=1)
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 7:] = 0
    with torch.no_grad(), AttentionCapture(teacher, layers=[-1]) as tcap:
        teacher(ids, attention_mask=mask)
    with AttentionCapture(student, layers=[-1]) as scap:
        student(ids, attention_mask=mask)
    args = (scap.q[-1], scap.k[-1], tcap.q[-1], tcap.k[-1])
    loss = FD.attention_distill_loss(*args, attention_mask=mask, causal=True, relation_heads=4)
    ref = attention_distill_loss_ref(*(a.double() for a in args), attention_mask=mask, causal=True, relation_heads=4)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    attn = student.model.layers[-1].self_attn
    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0


def test_bad_capture_arguments():
    model = _gpt2()
    with pytest.raises(ValueError, match="what="):
        AttentionCapture(model, what=("q", "x"))
    with pytest.raises(ValueError, match="layers contains 5"):
        AttentionCapture(model, layers=[5])
    with pytest.raises(ValueError, match="found no self-attention block"):
        AttentionCapture(torch.nn.Linear(3, 3))
