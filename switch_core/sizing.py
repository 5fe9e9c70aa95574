"""The paper's models at full size, computed: parameters, FLOPs per token, memory per device (Table 9, §5).

A Table 9 row is a T5-style encoder-decoder. The paper does not spell out the architecture, so these counts rest
on assumptions; each one is needed to reproduce the stated totals (book chapter "Scaling out"):

- "Layers" counts each stack: ``n_layers`` encoder blocks *and* ``n_layers`` decoder blocks (T5-Base: 12 + 12).
- Every ``expert_every``-th FFN of both stacks is a Switch layer (expert frequency 1/2: blocks 2, 4, ...).
- T5.1.1 blocks without biases. Attention: q, k, v [d_model, heads·d_kv] and o [heads·d_kv, d_model]; the decoder
  adds cross-attention. FFN: wi [d_model, d_ff] (two of them with GEGLU) and wo [d_ff, d_model]; an expert is
  one such FFN. RMS norms (a d_model scale): two per encoder block, three per decoder block, one final per stack.
  Relative position bias: 32 buckets × heads, once per stack. A router [d_model, E] per Switch layer.
- One embedding [vocab, d_model] shared by encoder input, decoder input and output logits (``tied_embeddings``);
  vocab = 32128 (T5's vocabulary; the paper does not state it).

FLOPs are forward matmul FLOPs, 2 per multiply-add. A token through the encoder pays its blocks and, in every
decoder block, the cross-attention k and v projections of its row; a token through the decoder pays its blocks
and the output logits. Attention scores (QK^T, AV) depend on sequence lengths, which the paper does not state;
:func:`flops_per_sequence` adds them for lengths you choose.

Memory follows §5: N cores = n data-parallel × m model-parallel (:class:`Layout`). Model parallelism splits every
weight m ways; expert parallelism puts E/n experts on each data-parallel group (the paper: n = E).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

OPTIMIZERS = ("adam", "adafactor", "sgd")
RELATIVE_BUCKETS = 32  # T5's relative position buckets


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


@dataclass(frozen=True)
class PaperConfig:
    """One row of Table 9. ``n_experts = 0`` (and ``expert_every = 0``) is a dense T5 model."""

    name: str
    d_model: int
    d_ff: int
    d_kv: int
    n_heads: int
    n_layers: int  # per stack: the encoder and the decoder each have n_layers blocks
    n_experts: int = 0
    expert_every: int = 0  # a Switch FFN every k-th block: Table 9's expert frequency 1/k
    geglu: bool = True
    vocab_size: int = 32128
    tied_embeddings: bool = True
    top_k: int = 1

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        for f in fields(self):
            if f.name in ("d_model", "d_ff", "d_kv", "n_heads", "n_layers", "vocab_size", "top_k"):
                _check_int(f.name, getattr(self, f.name), 1)
        _check_int("n_experts", self.n_experts, 0)
        _check_int("expert_every", self.expert_every, 0)
        if (self.n_experts == 0) != (self.expert_every == 0):
            raise ValueError(f"n_experts and expert_every must both be 0 (dense) or both >= 1, "
                             f"got {self.n_experts} and {self.expert_every}")
        if self.n_experts and self.top_k > self.n_experts:
            raise ValueError(f"top_k must be <= n_experts ({self.n_experts}), got {self.top_k}")
        for name in ("geglu", "tied_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def switch_layers_per_stack(self) -> int:
        return self.n_layers // self.expert_every if self.expert_every else 0

    @property
    def switch_layers(self) -> int:
        """Switch layers in the whole model (encoder + decoder)."""
        return 2 * self.switch_layers_per_stack


# Table 9 as printed (PAPER.md §10). Switch-C is the only row without GEGLU.
TABLE9: dict[str, PaperConfig] = {c.name: c for c in (
    PaperConfig("T5-Base", 768, 2048, 64, 12, 12),
    PaperConfig("T5-Large", 1024, 2816, 64, 16, 24),
    PaperConfig("T5-XXL", 4096, 10240, 64, 64, 24),
    PaperConfig("Switch-Base", 768, 2048, 64, 12, 12, n_experts=128, expert_every=2),
    PaperConfig("Switch-Large", 1024, 2816, 64, 16, 24, n_experts=128, expert_every=2),
    PaperConfig("Switch-XXL", 4096, 10240, 64, 64, 24, n_experts=64, expert_every=2),
    PaperConfig("Switch-C", 2080, 6144, 64, 32, 15, n_experts=2048, expert_every=1, geglu=False),
)}
# The parameter totals the paper states: Table 9's column, and the more precise figures of §4.1 and Table 8.
STATED_PARAMS: dict[str, float] = {
    "T5-Base": 223e6, "T5-Large": 739e6, "T5-XXL": 11e9, "Switch-Base": 7410e6, "Switch-Large": 26e9,
    "Switch-XXL": 395e9, "Switch-C": 1571e9,
}


@dataclass(frozen=True)
class Weight:
    """``copies`` tensors of one ``shape`` (e.g. a q projection in each of 12 blocks). ``expert``: in a Switch
    layer's experts (split by expert parallelism); everything else is replicated across data-parallel groups."""

    name: str
    shape: tuple[int, ...]
    copies: int
    expert: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.copies


def weights(cfg: PaperConfig) -> list[Weight]:
    """Every weight of the model under the module's assumptions, grouped by kind (see the module docstring)."""
    D, F, V, HK, L, E = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_heads * cfg.d_kv, cfg.n_layers, cfg.n_experts
    S = cfg.switch_layers_per_stack
    ffn = [("wi_0", (D, F)), ("wi_1", (D, F)), ("wo", (F, D))] if cfg.geglu else [("wi", (D, F)), ("wo", (F, D))]
    w = [Weight("embedding", (V, D), 1)] + ([] if cfg.tied_embeddings else [Weight("logits", (D, V), 1)])
    for stack, attentions, norms in (("encoder", ("self",), 2), ("decoder", ("self", "cross"), 3)):
        for a in attentions:
            w += [Weight(f"{stack}.{a}_attention.{p}", (D, HK), L) for p in "qkv"]
            w.append(Weight(f"{stack}.{a}_attention.o", (HK, D), L))
        w += [Weight(f"{stack}.norm", (D,), norms * L + 1), Weight(f"{stack}.relative_bias",
                                                                   (RELATIVE_BUCKETS, cfg.n_heads), 1)]
        if L - S:
            w += [Weight(f"{stack}.ffn.{p}", shape, L - S) for p, shape in ffn]
        if S:
            w.append(Weight(f"{stack}.router", (D, E), S))
            w += [Weight(f"{stack}.expert.{p}", shape, S * E, expert=True) for p, shape in ffn]
    return w


def parameters(cfg: PaperConfig) -> dict[str, int]:
    """{"total", "experts", "dense" (everything else), "per_token"}: per_token counts top_k of the E experts in
    every Switch layer and everything else once (the weights one token's forward pass touches, or could)."""
    w = weights(cfg)
    experts = sum(x.numel for x in w if x.expert)
    dense = sum(x.numel for x in w if not x.expert)
    per_token = dense + (experts * cfg.top_k // cfg.n_experts if cfg.n_experts else 0)
    return {"total": dense + experts, "experts": experts, "dense": dense, "per_token": per_token}


def flops_per_token(cfg: PaperConfig) -> dict[str, int]:
    """Forward matmul FLOPs (2 per multiply-add) of one encoder token and one decoder token, attention scores
    excluded. {"encoder": ..., "decoder": ...}."""
    D, F, V, HK, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_heads * cfg.d_kv, cfg.n_layers
    S = cfg.switch_layers_per_stack
    ffn = (3 if cfg.geglu else 2) * D * F
    ffns = (L - S) * ffn + S * cfg.top_k * ffn  # dense FFNs, then top_k experts per Switch layer
    router = S * D * cfg.n_experts
    encoder = L * 4 * D * HK + ffns + router + L * 2 * D * HK  # + cross-attention k, v of this row, per block
    decoder = L * (4 + 2) * D * HK + ffns + router + D * V  # self q k v o, cross q o; output logits
    return {"encoder": 2 * encoder, "decoder": 2 * decoder}


def flops_per_sequence(cfg: PaperConfig, inputs_length: int, targets_length: int) -> int:
    """Forward FLOPs of one example: tokens × flops_per_token, plus attention scores and the weighted sum
    (QK^T and AV: 2·2·heads·d_kv per query-key pair; no causal saving in the decoder)."""
    _check_int("inputs_length", inputs_length, 1)
    _check_int("targets_length", targets_length, 1)
    per, HK, L, Li, Lt = flops_per_token(cfg), cfg.n_heads * cfg.d_kv, cfg.n_layers, inputs_length, targets_length
    scores = 4 * HK * L * (Li * Li + Lt * Lt + Lt * Li)
    return Li * per["encoder"] + Lt * per["decoder"] + scores


@dataclass(frozen=True)
class Layout:
    """How N = n_data × n_model cores share the model (§5). ``expert``: expert parallelism over the n_data
    groups (each holds n_experts / n_data experts of every Switch layer). Each core sees B / n_data tokens."""

    n_data: int = 1
    n_model: int = 1
    expert: bool = False

    def __post_init__(self):
        _check_int("n_data", self.n_data, 1)
        _check_int("n_model", self.n_model, 1)
        if not isinstance(self.expert, bool):
            raise TypeError(f"expert must be True or False, got {self.expert!r}")

    @property
    def n_devices(self) -> int:
        return self.n_data * self.n_model

    @property
    def name(self) -> str:
        parts = [p for p, on in (("expert", self.expert), ("model", self.n_model > 1),
                                 ("data", self.n_data > 1)) if on]
        return " + ".join(parts) if parts else "one device"


def _check_layout(cfg: PaperConfig, layout: Layout, tokens_per_batch: int) -> None:
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a Layout, got {type(layout).__name__}")
    _check_int("tokens_per_batch", tokens_per_batch, 1)
    if tokens_per_batch % layout.n_data:
        raise ValueError(f"tokens_per_batch ({tokens_per_batch}) must be divisible by n_data ({layout.n_data})")
    if layout.expert and (cfg.n_experts == 0 or cfg.n_experts % layout.n_data):
        raise ValueError(f"expert parallelism needs n_experts ({cfg.n_experts}) divisible by n_data "
                         f"({layout.n_data}), and a model with experts")


def memory_per_device(cfg: PaperConfig, layout: Layout, *, param_bytes: int = 4, optimizer: str = "adam",
                      tokens_per_batch: int = 2**20, capacity_factor: float = 1.0,
                      activation_bytes: int = 2) -> dict[str, float]:
    """Bytes one core holds: {"parameters", "gradients", "optimizer", "dispatch_buffer", "total"}.

    parameters and gradients in ``param_bytes`` (float32 by default: an assumption). optimizer state in float32:
    "adam" two moments per parameter; "adafactor" factored second moments (rows + columns per matrix; the full
    vector for a vector); "sgd" none. dispatch_buffer: one Switch layer's dispatched tokens
    [E, C, d_model] in ``activation_bytes`` (bfloat16, §2.4; :func:`dispatch_rows`); other
    activations depend on sequence length and rematerialisation, which the paper does not state, so they are
    left out of "total"."""
    _check_layout(cfg, layout, tokens_per_batch)
    _check_int("param_bytes", param_bytes, 1)
    _check_int("activation_bytes", activation_bytes, 1)
    _check_positive("capacity_factor", capacity_factor)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}; got {optimizer!r}")
    share = lambda w: w.copies / (layout.n_data if w.expert and layout.expert else 1) / layout.n_model  # noqa
    local = sum(math.prod(w.shape) * share(w) for w in weights(cfg))
    if optimizer == "adam":
        opt = 2 * 4 * local
    elif optimizer == "adafactor":
        opt = 4 * sum((sum(w.shape) if len(w.shape) == 2 else w.shape[0]) * share(w) for w in weights(cfg))
    else:
        opt = 0.0
    buffer = dispatch_rows(cfg, layout, tokens_per_batch, capacity_factor) * cfg.d_model * activation_bytes
    out = {"parameters": param_bytes * local, "gradients": param_bytes * local, "optimizer": opt,
           "dispatch_buffer": float(buffer)}
    out["total"] = out["parameters"] + out["gradients"] + out["optimizer"]
    return out


def dispatch_rows(cfg: PaperConfig, layout: Layout, tokens_per_batch: int = 2**20,
                  capacity_factor: float = 1.0, padded: bool = True) -> float:
    """Rows of one core's dispatch buffer in one Switch layer: [E, C] slots with C = ceil(top_k·CF·(B / n_data)
    / E) (eq. 3 on the core's tokens, as the pseudocode computes it), or, with ``padded=False``, top_k·B / n_data
    (every token once, sent exactly). With model parallelism the group's m cores share the rows (each holds and
    sends 1/m: an assumption). Under expert parallelism these are the rows an all-to-all sends."""
    _check_layout(cfg, layout, tokens_per_batch)
    _check_positive("capacity_factor", capacity_factor)
    if not isinstance(padded, bool):
        raise TypeError(f"padded must be True or False, got {padded!r}")
    if cfg.n_experts == 0:
        return 0.0
    tokens = tokens_per_batch // layout.n_data
    capacity = math.ceil(cfg.top_k * capacity_factor * tokens / cfg.n_experts)
    rows = cfg.n_experts * capacity if padded else cfg.top_k * tokens
    return rows / layout.n_model


def all_to_all_bytes_per_step(cfg: PaperConfig, layout: Layout, tokens_per_batch: int = 2**20,
                              capacity_factor: float = 1.0, activation_bytes: int = 2,
                              padded: bool = True) -> float:
    """Bytes one core sends to *other* cores by all-to-all in one training step: 4 all-to-alls per Switch layer
    (dispatch and combine, forward and backward), each sending the (n_data - 1) / n_data of its dispatch rows
    whose experts live elsewhere (balanced routing). 0 without expert parallelism: the experts are local."""
    _check_int("activation_bytes", activation_bytes, 1)
    rows = dispatch_rows(cfg, layout, tokens_per_batch, capacity_factor, padded)
    if not layout.expert:
        return 0.0
    off_core = (layout.n_data - 1) / layout.n_data
    return 4 * cfg.switch_layers * rows * cfg.d_model * activation_bytes * off_core
