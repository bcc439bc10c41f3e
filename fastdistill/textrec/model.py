"""The recognizer: a compact CNN (+ optional BiLSTM) encoder and an attentional GRU decoder, greedy decoding.

Shapes (B images, L = WIDTH / 4 = 32 encoder positions, T = max_len + 1 decoding steps, V = len(charset) + 1 classes):

=============  ====================  ==========================================================================
name           shape                 what
=============  ====================  ==========================================================================
``features``   [B, L, d]             encoder features F_i (positional embedding added); the attention's values
``keys``       [B, 1, L, d_k]        W_k F_i, one attention head
``queries``    [B, 1, T, d_k]        W_q h_t, the decoder state after reading the previous character
``attn``       [B, T, L]             alpha_t = softmax(q_t k_i^T / sqrt(d_k)) over the L positions
``glimpses``   [B, T, d]             g_t = sum_i alpha_{t,i} F_i (what the classifier reads at step t)
``logits``     [B, T, V]             class 0 is the end of the word, class c >= 1 is ``charset[c - 1]``
=============  ====================  ==========================================================================

Every step t: ``h_t = GRU([emb(y_{t-1}), g_{t-1}], h_{t-1})``, ``q_t = W_q h_t``, attention, ``g_t``,
``logits_t = W_o [h_t, g_t]``. Training feeds the true previous character (teacher forcing), so a teacher and a student
run on the same word produce step-aligned glimpses and attention maps, which is what the four distillation losses
compare. ``recognize`` feeds back its own argmax (greedy decoding) and stops when every word has ended.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from fastdistill.textrec import data as D

EOS = 0
IGNORE = -100


@dataclass
class RecognizerConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 96, 128])
    d_model: int = 128  # encoder feature width d
    bilstm: bool = False  # a BiLSTM over the L positions after the CNN
    d_key: int = 64  # attention query / key width d_k
    d_hidden: int = 128  # decoder GRU state
    d_embed: int = 32  # character embedding
    position_attention: bool = True  # learned step / position terms in the queries and keys (alignment prior)
    ctc_head: bool = True  # a CTC classifier over the encoder positions (joint CTC-attention training)
    max_len: int = 10  # longest word; T = max_len + 1 steps (the end symbol)
    charset: str = D.CHARSET

    def __post_init__(self):
        if len(self.channels) != 4 or not all(isinstance(c, int) and c > 0 for c in self.channels):
            raise ValueError(f"channels={self.channels!r} is invalid; expected 4 positive integers (one per CNN stage)")
        for name in ("position_attention", "ctc_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; expected true or false")
        for name in ("d_model", "d_key", "d_hidden", "d_embed", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} is invalid; expected an integer >= 1")
        if self.max_len + 1 > self.positions:
            raise ValueError(
                f"max_len={self.max_len} needs {self.max_len + 1} decoding steps, more than the {self.positions} "
                "encoder positions; expected max_len < WIDTH / 4 (attention distillation pads the T queries to L)"
            )
        if len(set(self.charset)) != len(self.charset) or not self.charset:
            raise ValueError(f"charset={self.charset!r} is invalid; expected a non-empty string of distinct characters")

    @property
    def positions(self) -> int:
        return D.WIDTH // 4

    @property
    def steps(self) -> int:
        return self.max_len + 1

    @property
    def num_classes(self) -> int:
        return len(self.charset) + 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RecognizerOutput:
    logits: torch.Tensor  # [B, T, V]
    glimpses: torch.Tensor  # [B, T, d]
    attn: torch.Tensor  # [B, T, L]
    queries: torch.Tensor  # [B, 1, T, d_k]
    keys: torch.Tensor  # [B, 1, L, d_k]
    features: torch.Tensor  # [B, L, d]
    ctc_logits: torch.Tensor | None = None  # [B, L, V] (class 0 = the CTC blank), when the model has a CTC head


def _block(cin: int, cout: int, stride) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    return [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Recognizer(nn.Module):
    def __init__(self, config: RecognizerConfig):
        super().__init__()
        self.config = c = config
        c0, c1, c2, c3 = c.channels
        # strided convolutions (cheap on a CPU): 32 x 128 -> 16 x 64 -> 8 x 32 -> 8 x 32 -> 4 x 32 -> 2 x 32 -> 1 x 32,
        # L = 32 positions along the width
        self.cnn = nn.Sequential(
            *_block(1, c0, 2),
            *_block(c0, c1, 2),
            *_block(c1, c2, 1),
            *_block(c2, c2, (2, 1)),
            *_block(c2, c3, (2, 1)),
            nn.Conv2d(c3, c.d_model, (2, 1)),
        )
        self.pos = nn.Parameter(torch.randn(c.positions, c.d_model) * 0.02)
        self.rnn = nn.LSTM(c.d_model, c.d_model // 2, batch_first=True, bidirectional=True) if c.bilstm else None
        self.embed = nn.Embedding(c.num_classes + 1, c.d_embed)  # + the start symbol (index num_classes)
        self.gru = nn.GRUCell(c.d_embed + c.d_model, c.d_hidden)
        self.w_q = nn.Linear(c.d_hidden, c.d_key)
        self.w_k = nn.Linear(c.d_model, c.d_key)
        self.out = nn.Linear(c.d_hidden + c.d_model, c.num_classes)
        if c.position_attention:
            # q_t = W_q h_t + P_q[t], k_i = W_k F_i + P_k[i]: the decoder can learn "step t reads near position i"
            # before it can read content, which lets the attention leave its uniform start in a few hundred steps
            self.q_pos = nn.Parameter(torch.randn(c.steps, c.d_key) * 0.5)
            self.k_pos = nn.Parameter(torch.randn(c.positions, c.d_key) * 0.5)
        # joint CTC-attention (Kim et al. 2017): per-position character scores on F, a training signal that makes the
        # encoder's features character-specific early; class 0 (the end symbol) is the CTC blank
        self.ctc = nn.Linear(c.d_model, c.num_classes) if c.ctc_head else None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1:] != (1, D.HEIGHT, D.WIDTH):
            raise ValueError(f"images has shape {tuple(images.shape)}; expected [B, 1, {D.HEIGHT}, {D.WIDTH}]")
        f = self.cnn(images).squeeze(2).transpose(1, 2)  # [B, L, d]
        if self.rnn is not None:
            f = f + self.rnn(f)[0]
        return f + self.pos

    def _keys(self, feat: torch.Tensor) -> torch.Tensor:
        keys = self.w_k(feat)
        return keys + self.k_pos if self.config.position_attention else keys

    def _step(self, t: int, prev, g_prev, h, keys, feat):
        h = self.gru(torch.cat([self.embed(prev), g_prev], -1), h)
        q = self.w_q(h)  # [B, d_k]
        if self.config.position_attention:
            q = q + self.q_pos[t]
        scores = torch.einsum("bk,blk->bl", q, keys) / math.sqrt(self.config.d_key)
        alpha = scores.softmax(-1)  # [B, L]
        g = torch.einsum("bl,bld->bd", alpha, feat)
        return h, q, alpha, g, self.out(torch.cat([h, g], -1))

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> RecognizerOutput:
        """Teacher-forced pass. ``targets`` [B, T] class ids (``IGNORE`` after the end symbol)."""
        c = self.config
        if targets.dim() != 2 or targets.shape[1] != c.steps or targets.shape[0] != images.shape[0]:
            raise ValueError(f"targets has shape {tuple(targets.shape)}; expected [{images.shape[0]}, {c.steps}]")
        feat = self.encode(images)
        keys = self._keys(feat)
        B = feat.shape[0]
        prev = torch.full((B,), c.num_classes, dtype=torch.long, device=feat.device)
        g = feat.new_zeros(B, c.d_model)
        h = feat.new_zeros(B, c.d_hidden)
        outs = []
        for t in range(c.steps):
            h, q, alpha, g, logit = self._step(t, prev, g, h, keys, feat)
            outs.append((q, alpha, g, logit))
            prev = targets[:, t].clamp(min=0)  # IGNORE -> end symbol (those steps are masked out of every loss)
        q, alpha, g, logits = (torch.stack(x, 1) for x in zip(*outs))
        ctc = self.ctc(feat) if self.ctc is not None else None
        return RecognizerOutput(logits, g, alpha, q.unsqueeze(1), keys.unsqueeze(1), feat, ctc)

    @torch.no_grad()
    def greedy(self, images: torch.Tensor) -> list[str]:
        c = self.config
        feat = self.encode(images)
        keys = self._keys(feat)
        B = feat.shape[0]
        prev = torch.full((B,), c.num_classes, dtype=torch.long, device=feat.device)
        g, h = feat.new_zeros(B, c.d_model), feat.new_zeros(B, c.d_hidden)
        ids = []
        done = torch.zeros(B, dtype=torch.bool, device=feat.device)
        for t in range(c.steps):
            h, _, _, g, logit = self._step(t, prev, g, h, keys, feat)
            prev = logit.argmax(-1)
            ids.append(prev)
            done |= prev == EOS
            if bool(done.all()):
                break
        return [decode(row, c.charset) for row in torch.stack(ids, 1).tolist()]

    def recognize(self, images: list) -> list[str]:
        """PIL images (any size / mode: converted to grey 32 x 128) -> the recognized words (greedy decoding)."""
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a list of PIL images, got {type(images).__name__}")
        if not images:
            return []
        was = self.training
        self.eval()
        try:
            x = D.to_tensor(list(images)).to(next(self.parameters()).device)
            return [w for i in range(0, len(x), 256) for w in self.greedy(x[i : i + 256])]
        finally:
            self.train(was)


def decode(ids: list[int], charset: str) -> str:
    out = []
    for i in ids:
        if i == EOS:
            break
        out.append(charset[i - 1])
    return "".join(out)


def encode_targets(words: list[str], config: RecognizerConfig) -> torch.Tensor:
    """Words -> [B, T] class ids: the characters, the end symbol, then IGNORE."""
    index = {ch: i + 1 for i, ch in enumerate(config.charset)}
    out = torch.full((len(words), config.steps), IGNORE, dtype=torch.long)
    for b, w in enumerate(words):
        if len(w) > config.max_len:
            raise ValueError(f"word {w!r} has {len(w)} characters; the model reads at most max_len={config.max_len}")
        bad = [ch for ch in w if ch not in index]
        if bad:
            raise ValueError(f"word {w!r} has characters {bad} outside the model's charset")
        out[b, : len(w)] = torch.tensor([index[ch] for ch in w], dtype=torch.long)
        out[b, len(w)] = EOS
    return out
