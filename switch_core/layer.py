"""The Switch layer (paper §2.1-2.2, Fig. 2) and the dense feed-forward it replaces.

For every token x:  route it to one expert i = argmax p(x) (eq. 1), give that expert at most C tokens of its
capacity group (eq. 3), and return  y = p_i(x) · E_i(x)  (eq. 2); a token over capacity gets y = 0 and rides the
residual connection.

Shape legend: T tokens (the flattened leading dims of x), K = top_k, A = T·K, E experts, D = d_model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capacity import DROP_POLICIES, dispatch, expert_capacity
from .experts import ACTIVATIONS, BACKENDS, Experts, grouped_mm_aligned, grouped_mm_supported
from .fused_cpu import SwitchCPU
from .init import check_init_scale, truncated_normal_
from .losses import balance_loss, z_loss
from .router import ROUTER_DTYPES, Router, route


@dataclass
class SwitchStats:
    """What one call of the Switch layer did. Leading dims ``...`` are those of the input x.

    counts: long [E], real tokens whose first choice is each expert, counted before the capacity cut.
    kept_counts: long [E], (token, choice) assignments each expert processed (at most ``capacity``).
    balance_loss: float32 scalar, N · Σ f_i P_i (eq. 4), unweighted; 1.0 under uniform routing (with capacity
    groups: the mean over the groups of each group's loss).
    z_loss: float32 scalar, mean logsumexp(logits)² (ST-MoE), unweighted.
    dropped_fraction: float32 scalar, dropped real assignments / real assignments.
    expert_index: long [..., K], chosen experts (-1 for padding).  gates: [..., K] (0 for padding).
    router_probs, router_logits: [..., E] (at padding: those of a zero token, whatever the padding holds).  gates,
    probabilities and logits are float32 (the router's dtype when ``router_dtype`` lowers it).
    capacity: slots per expert per capacity group (python int).
    An empty input (no tokens, e.g. [0, D] or [B, 0, D]) gives empty tensors, zero counts and zero (finite)
    losses and dropped fraction; so does an input that is all padding."""

    counts: Tensor
    kept_counts: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    dropped_fraction: Tensor
    expert_index: Tensor
    gates: Tensor
    router_probs: Tensor
    router_logits: Tensor
    capacity: int


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def _check_capacity_factor(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number or None (dropless), got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be > 0 (or None for dropless), got {value}")
    return float(value)


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_input(x: Tensor, d_model: int, token_mask: Tensor | None) -> None:
    """Raise TypeError/ValueError naming ``x`` or ``token_mask`` when they cannot go through a d_model layer."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape [..., d_model={d_model}], got {tuple(x.shape)}")
    if token_mask is not None:
        if not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool:
            what = token_mask.dtype if isinstance(token_mask, Tensor) else type(token_mask).__name__
            raise TypeError(f"token_mask must be a bool tensor (True = real token), got {what}")
        if token_mask.shape != x.shape[:-1]:
            raise ValueError(f"token_mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, "
                             f"got {tuple(token_mask.shape)}")
        if token_mask.device != x.device:
            raise ValueError(f"token_mask is on {token_mask.device} but x is on {x.device}")


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts run in: the autocast dtype when autocast is on for x's device, else x's dtype."""
    device_type = x.device.type
    if (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class FeedForward(nn.Module):
    """The dense baseline FFN: y = act(x · W_in + b_in) · W_out + b_out, with dropout on the hidden activation.

    x [..., D] -> y [..., D]. Initialised like the experts (truncated normal, std = sqrt(init_scale / fan_in))."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "relu", dropout: float = 0.0,
                 bias: bool = False, init_scale: float = 0.1):
        super().__init__()
        _check_positive_int("d_model", d_model)
        _check_positive_int("d_ff", d_ff)
        self.act, self.gated = ACTIVATIONS[_check_choice("activation", activation, tuple(ACTIVATIONS))]
        self.dropout = _check_rate("dropout", dropout)
        self.init_scale = check_init_scale(init_scale)
        self.d_model, self.d_ff, self.activation = d_model, d_ff, activation
        self.w_in = nn.Linear(d_model, d_ff, bias=bias)
        self.w_gate = nn.Linear(d_model, d_ff, bias=False) if self.gated else None
        self.w_out = nn.Linear(d_ff, d_model, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin, fan_in in ((self.w_in, self.d_model), (self.w_gate, self.d_model), (self.w_out, self.d_ff)):
            if lin is not None:
                truncated_normal_(lin.weight, fan_in=fan_in, init_scale=self.init_scale)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.d_model, None)
        h = self.w_in(x)
        if self.gated:
            h = self.act(self.w_gate(x)) * h
        else:  # ReLU in place, as the experts do: the matmul's output is not needed for its backward
            h = F.relu(h, inplace=True) if self.activation == "relu" else self.act(h)
        return self.w_out(F.dropout(h, self.dropout, self.training))


class SwitchFeedForward(nn.Module):
    """A Switch layer: router -> capacity-limited dispatch -> experts -> gate-weighted combine (paper Fig. 2).

    ``y, stats = layer(x, token_mask=None)`` with x [..., d_model] float; y has x's shape and dtype; ``stats``
    is a :class:`SwitchStats`. ``token_mask`` (bool, x.shape[:-1]) marks real tokens: padding is not routed,
    takes no capacity and gets zero output. Losses in ``stats`` are unweighted.

    Args:
        d_model, d_ff, n_experts: token width, each expert's hidden width, number of experts E.
        top_k: experts per token; 1 is Switch, k > 1 the MoE baseline (gates renormalised over the k).
        capacity_factor, eval_capacity_factor: slots per expert per group in train / eval mode,
            ceil(top_k · factor · G / n_experts) (eq. 3, extended to top-k and rounded up); None = dropless.
            G counts every token of the group, padding included, so a padded batch has the capacity of its full
            shape (static shapes, as in Mesh TensorFlow).
        group_size: tokens per capacity group G: the flattened tokens are split into groups of G consecutive
            tokens (the last may be shorter), each with its own capacity, slot order, drops and balance loss.
            None (default): the whole call is one group. group_size = sequence length gives Hugging Face's
            per-sequence capacity.
        drop_policy: "position" (paper), "priority" (V-MoE) or "random": who keeps a slot when an expert
            overflows. "random" draws from torch's global generator, in eval mode too.
        jitter_eps: multiplicative U(1-eps, 1+eps) noise on the router input in training (App. C).
        activation: "relu", "gelu", "silu", or gated "geglu" / "swiglu" (adds ``experts.w_gate``).
        dropout: on the layer's output.  expert_dropout: on the experts' hidden activations (§2.4, Table 4).
        bias: add ``experts.b_in [E, d_ff]`` and ``experts.b_out [E, d_model]``.
        init_scale: truncated normal with std sqrt(init_scale / fan_in) (§2.4; the paper uses 0.1).
        router_dtype: "float32" (selective precision, §2.4) or "bfloat16"/"float16": the precision of the
            router's logits, softmax and gates (the unstable variant of Table 2, for experiments).
        backend: "loop" (reference), "padded", "grouped" or "auto" (the fastest correct one for the input)."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, *, top_k: int = 1, capacity_factor: float | None = 1.25,
                 eval_capacity_factor: float | None = 2.0, drop_policy: str = "position", jitter_eps: float = 0.0,
                 activation: str = "relu", dropout: float = 0.0, expert_dropout: float = 0.0, bias: bool = False,
                 init_scale: float = 0.1, backend: str = "auto", group_size: int | None = None,
                 router_dtype: str = "float32"):
        super().__init__()
        self.d_model = _check_positive_int("d_model", d_model)
        self.d_ff = _check_positive_int("d_ff", d_ff)
        self.n_experts = _check_positive_int("n_experts", n_experts)
        self.top_k = _check_positive_int("top_k", top_k)
        if top_k > n_experts:
            raise ValueError(f"top_k must be <= n_experts ({n_experts}), got {top_k}")
        self.capacity_factor = _check_capacity_factor("capacity_factor", capacity_factor)
        self.eval_capacity_factor = _check_capacity_factor("eval_capacity_factor", eval_capacity_factor)
        self.drop_policy = _check_choice("drop_policy", drop_policy, DROP_POLICIES)
        self.backend = _check_choice("backend", backend, BACKENDS + ("auto",))
        _check_choice("activation", activation, tuple(ACTIVATIONS))
        if isinstance(jitter_eps, bool) or not isinstance(jitter_eps, (int, float)) or not 0.0 <= jitter_eps < 1.0:
            raise ValueError(f"jitter_eps must be a number in [0, 1), got {jitter_eps!r}")
        self.dropout = _check_rate("dropout", dropout)
        self.group_size = None if group_size is None else _check_positive_int("group_size", group_size)
        _check_choice("router_dtype", router_dtype, tuple(ROUTER_DTYPES))
        init_scale = check_init_scale(init_scale)
        self.router = Router(d_model, n_experts, jitter_eps=float(jitter_eps), init_scale=init_scale,
                             router_dtype=router_dtype)
        self.experts = Experts(d_model, d_ff, n_experts, activation=activation, bias=bias,
                               expert_dropout=_check_rate("expert_dropout", expert_dropout), init_scale=init_scale)
        self.fuse_cpu = True  # see fuses_on_cpu

    def extra_repr(self) -> str:
        return (f"top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}, drop_policy={self.drop_policy!r}, "
                f"group_size={self.group_size}, backend={self.backend!r}")

    def resolve_backend(self, x: Tensor) -> str:
        """The backend "auto" picks for x: "grouped" on the CPU (sorted rows, expert by expert) and wherever this
        torch build has grouped_mm for x's device and compute dtype at these sizes (16-byte aligned); otherwise
        "padded" (static shapes, no sync), except when dropless: a padded buffer would then hold T rows per
        expert, so the grouped layout with per-expert matmuls is used instead. Under torch.compile on the CPU,
        "padded" whenever there is a capacity: both layouts trace into one graph there (the grouped one through the
        `segment_mm` custom op), and the padded one, though it multiplies capacity-factor times the rows, ran as
        fast in the compiled training step (0.80x against 0.79x of the compiled dense step, twice, on 2 cores)."""
        if self.backend != "auto":
            return self.backend
        dropless = (self.capacity_factor if self.training else self.eval_capacity_factor) is None
        if torch.compiler.is_compiling() and x.device.type == "cpu" and not dropless:
            return "padded"
        dt = compute_dtype(x)
        if x.device.type == "cpu" or (grouped_mm_supported(x.device.type, dt)
                                      and grouped_mm_aligned(dt, self.d_model, self.d_ff)):
            return "grouped"
        return "grouped" if dropless else "padded"

    def fuses_on_cpu(self, x: Tensor, token_mask: Tensor | None = None) -> bool:
        """Whether this call runs as one autograd node (`fused_cpu.SwitchCPU`) instead of step by step: on the
        CPU, eager, backend "auto" or "grouped", top-1 with the "position" policy, one capacity group, no padding
        mask, float32/float64 input without autocast and a float32 router, an ungated activation without bias, and
        neither input jitter nor expert dropout in training. Set ``fuse_cpu = False`` on the layer to always run
        the steps (the results are the same)."""
        T = x.shape[:-1].numel()
        return (self.fuse_cpu and x.device.type == "cpu" and token_mask is None and T > 0
                and self.top_k == 1 and self.drop_policy == "position" and self.backend in ("auto", "grouped")
                and x.dtype in (torch.float32, torch.float64)
                and compute_dtype(x) == x.dtype and self.router.router_dtype == "float32"
                and not (self.training and self.router.jitter_eps > 0)
                and self.experts._cpu_fast_path(x)  # eager only: false under torch.compile
                and (self.group_size is None or self.group_size >= T))

    def _forward_fused_cpu(self, x: Tensor) -> tuple[Tensor, SwitchStats]:
        lead, T, E, dt = x.shape[:-1], x.shape[:-1].numel(), self.n_experts, x.dtype
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = expert_capacity(T, E, cf, 1)
        ex = self.experts
        y_TD, probs_ET, logits_ET, gate_T, balance, z, expert_T, counts_E, kept_E, dropped = SwitchCPU.apply(
            x.reshape(T, self.d_model), self.router.weight.to(dt), ex.w_in.to(dt), ex.w_out.to(dt), capacity,
            ex.activation)
        y = F.dropout(y_TD, self.dropout, self.training).view(x.shape)
        return y, SwitchStats(counts=counts_E, kept_counts=kept_E, balance_loss=balance, z_loss=z,
                              dropped_fraction=dropped, expert_index=expert_T.view(*lead, 1),
                              gates=gate_T.view(*lead, 1), router_probs=probs_ET.t().view(*lead, E),
                              router_logits=logits_ET.t().view(*lead, E), capacity=capacity)

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, SwitchStats]:
        check_input(x, self.d_model, token_mask)
        if self.fuses_on_cpu(x, token_mask):
            return self._forward_fused_cpu(x)  # the same four steps, as one autograd node (see fused_cpu.py)
        lead, T, K, E = x.shape[:-1], x.shape[:-1].numel(), self.top_k, self.n_experts
        x_TD = x.reshape(T, self.d_model)
        mask_T = None if token_mask is None else token_mask.reshape(T)
        if mask_T is not None:
            # Padding influences nothing: a zero token in its place, whatever it holds (a NaN would reach the
            # router's logits and, as 0 x NaN in the softmax's backward, the router's gradient).
            x_TD = torch.where(mask_T[:, None], x_TD, 0)

        # 1. Route (float32): logits, probabilities, the top-k experts and their gates.
        r = route(self.router(x_TD), K)
        # 2. Capacity per group (eq. 3) and which assignments keep a slot.
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = expert_capacity(T if self.group_size is None else self.group_size, E, cf, K)
        d = dispatch(r.expert_TK, r.gates_TK, E, capacity, mask_T=mask_T, policy=self.drop_policy,
                     group_size=self.group_size)
        # 3. Experts, in the compute dtype, and 4. combine: y = Σ gate · E_i(x); exactly 0 where dropped or padded.
        y_TD = self.experts(x_TD.to(compute_dtype(x)), r.gates_TK.reshape(T * K), d, self.resolve_backend(x))
        y = F.dropout(y_TD.to(x.dtype), self.dropout, self.training).view(x.shape)

        real_TK = None if mask_T is None else mask_T[:, None].expand(T, K)
        stats = SwitchStats(
            counts=d.counts_E,
            kept_counts=d.kept_E,
            balance_loss=balance_loss(r.probs_TE, r.expert_TK[:, 0], mask_T, self.group_size),
            z_loss=z_loss(r.logits_TE, mask_T, r.lse_T),
            dropped_fraction=(d.n_real - d.keep_A.sum()) / d.n_real.clamp(min=1.0),
            expert_index=(r.expert_TK if real_TK is None else torch.where(real_TK, r.expert_TK, -1)).view(*lead, K),
            gates=(r.gates_TK if real_TK is None else torch.where(real_TK, r.gates_TK, 0.0)).view(*lead, K),
            router_probs=r.probs_TE.view(*lead, E),
            router_logits=r.logits_TE.view(*lead, E),
            capacity=d.capacity,
        )
        return y, stats
