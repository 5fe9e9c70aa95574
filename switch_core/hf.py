"""Hugging Face interop: a `SwitchTransformersSparseMLP` to a `SwitchFeedForward` and back (``transformers``
is an optional dependency, imported only here).

Hugging Face's Switch router computes capacity **per sequence**: inputs are [B, S, D], and in each sequence each
expert keeps its first ``expert_capacity`` tokens (an inclusive cumsum ``<=``, the same as switch_core's 0-based
slot ``< capacity``). switch_core expresses that as capacity groups of S tokens (``group_size = S``) with the
capacity factor that gives the same slots: ``ceil(cf · S / E) = expert_capacity``. So a converted layer computes
exactly what HF computes on inputs of the sequence length given at conversion.

What maps:  router ``classifier.weight [E, D]`` = ``router.weight``; expert e's ``wi.weight [F, D]`` =
``experts.w_in[e].T``, ``wo.weight [D, F]`` = ``experts.w_out[e].T``; ``router_jitter_noise`` = ``jitter_eps``
(both multiply the router input by U(1 - eps, 1 + eps) in training); ``router_dtype`` ("float32", "bfloat16",
"float16"); ``dense_act_fn`` ("relu", "gelu", "silu"); ``dropout_rate`` (inside the experts) = ``expert_dropout``.
The top-1 gate (the max probability) multiplies the expert's output; a dropped token's output is 0 (HF since
2025; before, it passed the token through).

What cannot be represented (refused with `NotRepresentable`, a ValueError, naming it):

- HF -> switch_core: a router bias (``router_bias=True`` with a non-zero bias), an activation other than
  relu/gelu/silu (e.g. "gelu_new"), capacity for a *different* sequence length than the one converted for.
- switch_core -> HF: top_k > 1, gated activations (GEGLU/SwiGLU), expert biases, drop policies other than
  "position", different train and eval capacity factors, dropless capacity, output ``dropout``, a layer without
  ``group_size`` (HF has no per-call capacity; pass ``seq_len``).
- HF's jitter multiplies its input *in place* (the experts then see the jittered tokens too); switch_core jitters
  only the router's copy. With jitter on, training-mode outputs differ; evaluation is unaffected.
"""
from __future__ import annotations

import torch
from torch import nn

from .capacity import expert_capacity
from .layer import SwitchFeedForward

_ACTS = ("relu", "gelu", "silu")


class NotRepresentable(ValueError):
    """The layer uses a feature the other library does not have."""


def _hf():
    try:
        from transformers import SwitchTransformersConfig
        from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("switch_core.hf needs transformers: pip install transformers") from e
    return SwitchTransformersConfig, SwitchTransformersSparseMLP


def _check_seq_len(seq_len) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        raise TypeError(f"seq_len must be an int, got {type(seq_len).__name__}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return seq_len


def _activation_name(act: nn.Module) -> str | None:
    """Which of relu/gelu/silu the module computes (probed on a grid; "gelu_new" and other tanh forms are none)."""
    probe = torch.linspace(-4, 4, 161)
    with torch.no_grad():
        out = act(probe)
    for name in _ACTS:
        if torch.allclose(out, getattr(torch.nn.functional, name)(probe), atol=1e-6, rtol=0):
            return name
    return None


def from_hf(mlp: nn.Module, seq_len: int, backend: str = "auto") -> SwitchFeedForward:
    """A `SwitchFeedForward` computing what ``mlp`` (a SwitchTransformersSparseMLP) computes on [B, seq_len, D].

    Weights are copied (the new layer shares nothing with ``mlp``); it is in ``mlp``'s train/eval mode."""
    _, SparseMLP = _hf()
    if not isinstance(mlp, SparseMLP):
        raise TypeError(f"mlp must be a SwitchTransformersSparseMLP, got {type(mlp).__name__}")
    seq_len = _check_seq_len(seq_len)
    router, experts = mlp.router, mlp.experts
    E = router.num_experts
    first = experts["expert_0"]
    D, F = first.wi.in_features, first.wi.out_features
    act = _activation_name(first.act)
    if act is None:
        raise NotRepresentable(f"activation {type(first.act).__name__} has no switch_core equivalent "
                               f"(relu, gelu, silu)")
    bias = router.classifier.bias
    if bias is not None and bool((bias != 0).any()):
        raise NotRepresentable("the router has a non-zero bias (router_bias=True); switch_core's router has none")
    dtype = str(router.dtype).removeprefix("torch.")
    C = router.expert_capacity
    cf = C * E / seq_len
    layer = SwitchFeedForward(D, F, E, capacity_factor=cf, eval_capacity_factor=cf, group_size=seq_len,
                              jitter_eps=float(router.jitter_noise), activation=act,
                              expert_dropout=float(first.dropout.p), router_dtype=dtype, backend=backend)
    if expert_capacity(seq_len, E, cf) != C:  # not expected: expert_capacity rounds away float noise
        raise NotRepresentable(f"expert_capacity {C} is not reachable at seq_len {seq_len} with {E} experts")
    w_dtype = first.wi.weight.dtype
    layer = layer.to(device=first.wi.weight.device, dtype=w_dtype)
    with torch.no_grad():
        layer.router.weight.copy_(router.classifier.weight)
        for e in range(E):
            ex = experts[f"expert_{e}"]
            layer.experts.w_in[e].copy_(ex.wi.weight.T)
            layer.experts.w_out[e].copy_(ex.wo.weight.T)
    return layer.train(mlp.training)


def to_hf(layer: SwitchFeedForward, seq_len: int | None = None) -> nn.Module:
    """A SwitchTransformersSparseMLP computing what ``layer`` computes on [B, S, D] inputs, S = the layer's
    ``group_size`` (or ``seq_len`` when the layer has none). Weights are copied."""
    Config, SparseMLP = _hf()
    if not isinstance(layer, SwitchFeedForward):
        raise TypeError(f"layer must be a SwitchFeedForward, got {type(layer).__name__}")
    problems = []
    if layer.top_k != 1:
        problems.append(f"top_k={layer.top_k} (HF's Switch router is top-1)")
    if layer.experts.gated:
        problems.append(f"gated activation {layer.experts.activation!r}")
    if layer.experts.activation not in _ACTS:
        problems.append(f"activation {layer.experts.activation!r}")
    if layer.experts.b_in is not None:
        problems.append("expert biases")
    if layer.drop_policy != "position":
        problems.append(f"drop_policy={layer.drop_policy!r} (HF keeps the earliest tokens)")
    if layer.capacity_factor != layer.eval_capacity_factor:
        problems.append("different train and eval capacity factors (HF has one expert_capacity)")
    if layer.capacity_factor is None:
        problems.append("dropless capacity")
    if layer.dropout:
        problems.append(f"dropout={layer.dropout} on the layer output (HF's SparseMLP has none)")
    if layer.group_size is not None and seq_len is not None and seq_len != layer.group_size:
        problems.append(f"seq_len={seq_len} differs from the layer's group_size={layer.group_size}")
    if layer.group_size is None and seq_len is None:
        problems.append("no group_size (HF computes capacity per sequence: pass seq_len)")
    if problems:
        raise NotRepresentable("cannot convert to SwitchTransformersSparseMLP: " + "; ".join(problems))
    S = layer.group_size if layer.group_size is not None else _check_seq_len(seq_len)
    E, D, F = layer.n_experts, layer.d_model, layer.d_ff
    cfg = Config(d_model=D, d_ff=F, num_experts=E, expert_capacity=expert_capacity(S, E, layer.capacity_factor),
                 router_jitter_noise=layer.router.jitter_eps, router_dtype=layer.router.router_dtype,
                 dense_act_fn=layer.experts.activation, dropout_rate=layer.experts.expert_dropout, router_bias=False)
    w = layer.experts.w_in
    mlp = SparseMLP(cfg).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        mlp.router.classifier.weight.copy_(layer.router.weight)
        for e in range(E):
            ex = mlp.experts[f"expert_{e}"]
            ex.wi.weight.copy_(layer.experts.w_in[e].T)
            ex.wo.weight.copy_(layer.experts.w_out[e].T)
    return mlp.train(layer.training)


def sparse_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every SwitchTransformersSparseMLP in a Hugging Face model, in module order."""
    _, SparseMLP = _hf()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseMLP)]
