"""A decoder-only character language model whose FFNs are Switch layers (paper Fig. 2) or dense.

Bottom-up, nanoGPT style: causal self-attention -> block (pre-LayerNorm) -> model. Every `switch_every`-th block
swaps its dense FFN for a Switch layer (the paper's "expert frequency": 1/2 in Table 9 for Switch-Base), and
each expert is as wide as the dense FFN, so a top-1 Switch model costs the same FLOPs per token as the dense one
(plus the small router).

Shape legend: B batch, T sequence length, D d_model, H heads, V vocabulary, E experts.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capacity import DROP_POLICIES
from .experts import ACTIVATIONS, BACKENDS
from .init import truncated_normal_
from .layer import FeedForward, SwitchFeedForward, SwitchStats
from .router import ROUTER_DTYPES


@dataclass
class ModelConfig:
    """Sizes and Switch options of the model. Every bad value raises ValueError naming its field."""

    vocab_size: int = 65  # Tiny Shakespeare has 65 distinct characters
    seq_len: int = 128  # context length (learned position embeddings)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512  # width of the dense FFN and of every expert (equal FLOPs per token)
    n_experts: int = 8
    switch_every: int = 2  # a Switch FFN in every 2nd block (paper: 1/2); 1 = every block; 0 = dense model
    top_k: int = 1  # Switch routes each token to one expert
    capacity_factor: float | None = 1.25  # training; None = dropless
    eval_capacity_factor: float | None = 2.0
    drop_policy: str = "position"
    jitter_eps: float = 0.0
    activation: str = "relu"
    dropout: float = 0.0
    expert_dropout: float = 0.0
    bias: bool = False
    init_scale: float = 0.1  # paper §2.4: truncated normal, std sqrt(0.1 / fan_in)
    backend: str = "auto"
    group_size: int | None = None  # tokens per capacity group; None = the whole batch (B·T tokens) is one group
    router_dtype: str = "float32"  # selective precision (§2.4); "bfloat16" is Table 2's unstable variant

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "d_ff", "n_experts", "top_k"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("switch_every", self.switch_every, minimum=0)
        if self.group_size is not None:
            _check_int("group_size", self.group_size, minimum=1)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name} must be > 0 or None (dropless), got {value!r}")
        for name in ("dropout", "expert_dropout", "jitter_eps"):
            if not _is_number(getattr(self, name)) or not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {getattr(self, name)!r}")
        if not _is_number(self.init_scale) or not self.init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be True or False, got {self.bias!r}")
        for name, choices in (("drop_policy", DROP_POLICIES), ("activation", tuple(ACTIVATIONS)),
                              ("backend", BACKENDS + ("auto",)), ("router_dtype", tuple(ROUTER_DTYPES))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {getattr(self, name)!r}")

    def is_switch(self, layer: int) -> bool:
        """Whether block `layer` (0-based) gets a Switch FFN: blocks switch_every-1, 2*switch_every-1, ..."""
        return self.switch_every > 0 and (layer + 1) % self.switch_every == 0

    @property
    def n_switch_layers(self) -> int:
        return sum(self.is_switch(i) for i in range(self.n_layer))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**d)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention via F.scaled_dot_product_attention. x [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x_BTD: Tensor, token_mask_BT: Tensor | None = None) -> Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D/H]
        p = self.dropout if self.training else 0.0
        if token_mask_BT is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            # Real queries never attend to padding keys. NOTE: every query may attend to itself, so a row
            # that sees only padding (left padding) still has one allowed key and the softmax stays finite.
            causal_TT = torch.ones(T, T, dtype=torch.bool, device=x_BTD.device).tril()
            allowed_BTT = causal_TT & (token_mask_BT[:, None, :] | torch.eye(T, dtype=torch.bool, device=x_BTD.device))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_BTT[:, None], dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, D)
        return F.dropout(self.proj(y), p, self.training)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + ffn(ln(x)); ffn is dense or Switch.

    A token the Switch layer drops gets ffn output 0 and passes on through the residual (paper §2.2)."""

    def __init__(self, cfg: ModelConfig, switch: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        common = dict(activation=cfg.activation, dropout=cfg.dropout, bias=cfg.bias, init_scale=cfg.init_scale)
        self.ffn = (SwitchFeedForward(cfg.d_model, cfg.d_ff, cfg.n_experts, top_k=cfg.top_k,
                                      capacity_factor=cfg.capacity_factor,
                                      eval_capacity_factor=cfg.eval_capacity_factor, drop_policy=cfg.drop_policy,
                                      jitter_eps=cfg.jitter_eps, expert_dropout=cfg.expert_dropout,
                                      backend=cfg.backend, group_size=cfg.group_size,
                                      router_dtype=cfg.router_dtype, **common)
                    if switch else FeedForward(cfg.d_model, cfg.d_ff, **common))

    @property
    def is_switch(self) -> bool:
        return isinstance(self.ffn, SwitchFeedForward)

    def forward(self, x_BTD: Tensor, token_mask_BT: Tensor | None = None) -> tuple[Tensor, SwitchStats | None]:
        x_BTD = x_BTD + self.attn(self.ln_1(x_BTD), token_mask_BT)
        if self.is_switch:
            h_BTD, stats = self.ffn(self.ln_2(x_BTD), token_mask=token_mask_BT)
        else:
            h_BTD, stats = self.ffn(self.ln_2(x_BTD)), None
        return x_BTD + h_BTD, stats


class SwitchLM(nn.Module):
    """Decoder-only character LM: token + position embeddings, blocks, final LayerNorm, tied output head.

    ``logits, stats = model(idx, token_mask=None)``: idx [B, T] long (T <= seq_len), token_mask [B, T] bool
    (True = real token; passed to attention and to every Switch router). logits [B, T, V] float32;
    stats: one SwitchStats per Switch block, in block order (empty list for a dense model)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_switch(i)) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self._init_non_ffn_weights()

    def _init_non_ffn_weights(self) -> None:
        """Paper §2.4 init (truncated normal, std sqrt(init_scale / fan_in)) for embeddings and attention too.

        NOTE: the embedding doubles as the output head (tied), so its "fan-in" is d_model on the head side."""
        s, D = self.cfg.init_scale, self.cfg.d_model
        for emb in (self.tok_emb, self.pos_emb):
            truncated_normal_(emb.weight, fan_in=D, init_scale=s)
        for block in self.blocks:
            for lin in (block.attn.qkv, block.attn.proj):
                truncated_normal_(lin.weight, fan_in=D, init_scale=s)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    @property
    def switch_layers(self) -> list[int]:
        """Indices of the blocks whose FFN is a Switch layer."""
        return [i for i, b in enumerate(self.blocks) if b.is_switch]

    def forward(self, idx_BT: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, list[SwitchStats]]:
        B, T = idx_BT.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {self.cfg.seq_len}")
        if token_mask is not None and (token_mask.shape != idx_BT.shape or token_mask.dtype != torch.bool):
            raise ValueError(f"token_mask must be bool with shape {tuple(idx_BT.shape)}, "
                             f"got {token_mask.dtype} {tuple(token_mask.shape)}")
        pos_T = torch.arange(T, device=idx_BT.device)
        x_BTD = self.drop(self.tok_emb(idx_BT) + self.pos_emb(pos_T))
        all_stats = []
        for block in self.blocks:
            x_BTD, stats = block(x_BTD, token_mask)
            if stats is not None:
                all_stats.append(stats)
        logits_BTV = self.ln_f(x_BTD) @ self.tok_emb.weight.T  # tied head
        return logits_BTV.float(), all_stats

    @torch.no_grad()
    def generate(self, idx_BT: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Sample max_new_tokens tokens after the prompt idx [B, T0]; returns [B, T0 + max_new_tokens].

        Runs in eval mode (eval capacity factor, no dropout) and restores the previous mode afterwards. The
        context is cropped to the last seq_len tokens; no KV cache (characters are cheap)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            logits_BV = self(idx_BT[:, -self.cfg.seq_len:])[0][:, -1, :] / temperature
            if top_k is not None:
                kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.size(-1))).values[:, -1:]
                logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
            probs_BV = F.softmax(logits_BV, dim=-1)
            next_B1 = torch.multinomial(probs_BV.cpu(), 1, generator=generator).to(idx_BT.device)
            idx_BT = torch.cat([idx_BT, next_B1], dim=1)
        self.train(was_training)
        return idx_BT

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count; tied head counted once. active=True counts what one token uses: top_k of the
        n_experts experts in every Switch layer (router included), everything else in full."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        for i in self.switch_layers:
            experts = self.blocks[i].ffn.experts
            per_expert = sum(p.numel() for p in experts.parameters()) // self.cfg.n_experts
            total -= per_expert * (self.cfg.n_experts - self.cfg.top_k)
        return total

    def flops_per_token(self, training: bool = True) -> int:
        """Matmul FLOPs per token (2 per multiply-add), from the config; see `flops_per_token`."""
        return flops_per_token(self.cfg, training)


def flops_per_token(cfg: ModelConfig, training: bool = True) -> int:
    """Matmul FLOPs per token: 2·(active weight multiply-adds) + attention scores, ×3 for training.

    Per block: qkv+proj 4D², attention 2·T·D (QK^T and AV over the full context, causal saving ignored, as in
    Kaplan et al.), FFN 2·D·F per used expert (top_k of them) plus the router D·E in Switch blocks. Plus the
    tied head D·V. Embedding lookups, norms, softmaxes and capacity padding are not counted. Training counts
    the backward pass as twice the forward."""
    D, F_, T = cfg.d_model, cfg.d_ff, cfg.seq_len
    gated = 3 if ACTIVATIONS[cfg.activation][1] else 2  # gated FFNs (GEGLU) have a third matrix
    macs = 0
    for i in range(cfg.n_layer):
        macs += 4 * D * D + 2 * T * D
        ffn = gated * D * F_
        macs += cfg.top_k * ffn + D * cfg.n_experts if cfg.is_switch(i) else ffn
    macs += D * cfg.vocab_size
    return 2 * macs * (3 if training else 1)


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters from the config alone (no weights built): {"total": ..., "active": ...}.

    active = what one token uses: top_k of the n_experts experts per Switch layer, everything else in full.
    Matches SwitchLM(cfg).num_parameters(active=...); cheap enough for tables of large presets."""
    D, F_, E, b = cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.bias
    norm = 2 * D if b else D
    attn = 4 * D * D + (4 * D if b else 0)
    ffn = (3 if ACTIVATIONS[cfg.activation][1] else 2) * D * F_ + (F_ + D if b else 0)  # one expert = dense FFN
    total = active = cfg.vocab_size * D + cfg.seq_len * D + norm  # tied embedding, positions, final norm
    for i in range(cfg.n_layer):
        if cfg.is_switch(i):
            total += 2 * norm + attn + E * ffn + D * E
            active += 2 * norm + attn + cfg.top_k * ffn + D * E
        else:
            total += 2 * norm + attn + ffn
            active += 2 * norm + attn + ffn
    return {"total": total, "active": active}
