"""The router: which expert each token goes to, and with what gate (paper eq. 1, §2.1, §2.4).

    h(x) = W_r · x,    p_i(x) = softmax(h(x))_i,    expert = argmax_i p_i(x),    gate = p_expert(x)

Shape legend: T tokens, D = d_model, E experts, K = top_k choices per token.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .init import truncated_normal_


@dataclass
class Routing:
    """What the router decided for T tokens.

    logits_TE, probs_TE: float32 router logits and softmax.  expert_TK: chosen experts, best first.
    gates_TK: float32 gates (top-1: the un-renormalised max probability; top-k: renormalised over the k chosen).
    lse_T: logsumexp of each token's logits (what the z-loss squares).
    """

    logits_TE: Tensor
    probs_TE: Tensor
    expert_TK: Tensor
    gates_TK: Tensor
    lse_T: Tensor


def top1_softmax(logits_ET: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Softmax over experts, the top-1 choice, its gate and the logsumexp, in one pass (no autograd).

    logits_ET [E, T] -> probs_ET [E, T], gate_T [T], expert_T long [T], lse_T [T]. With m = max_i l_i and
    s = Σ_i exp(l_i - m):  p = exp(l - m) / s,  gate = p_expert = 1 / s,  lse = m + log s."""
    m_T, expert_T = logits_ET.max(dim=0)
    probs_ET = (logits_ET - m_T).exp_()
    s_T = probs_ET.sum(dim=0)
    probs_ET.div_(s_T)
    return probs_ET, s_T.reciprocal(), expert_T, s_T.log_().add_(m_T)


def top1_softmax_backward(probs_ET: Tensor, gate_T: Tensor, expert_T: Tensor, g_probs_ET: Tensor | None,
                          g_gate_T: Tensor | None, g_lse_T: Tensor | None) -> Tensor:
    """The gradient of the logits [E, T] from those of `top1_softmax`'s outputs (any may be None). With
    c = <p, g_p> + g_gate · gate - g_lse:   g_l = p ⊙ (g_p - c) + onehot(expert) · g_gate · gate.
    Written in differentiable ops of its inputs (double backward through `route` is exact)."""
    c_T = torch.zeros_like(gate_T)
    if g_probs_ET is not None:
        c_T = c_T + (probs_ET * g_probs_ET).sum(dim=0)
    if g_gate_T is not None:
        c_T = c_T + g_gate_T * gate_T
    if g_lse_T is not None:
        c_T = c_T - g_lse_T
    g_ET = probs_ET * (-c_T if g_probs_ET is None else g_probs_ET - c_T)
    if g_gate_T is not None:
        g_ET = g_ET.scatter_add(0, expert_T[None], (g_gate_T * gate_T)[None])
    return g_ET


class _Top1Softmax(torch.autograd.Function):
    """`top1_softmax` as one autograd node, with `top1_softmax_backward` as its backward."""

    @staticmethod
    def forward(ctx, logits_ET: Tensor):
        probs_ET, gate_T, expert_T, lse_T = top1_softmax(logits_ET)
        ctx.mark_non_differentiable(expert_T)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(probs_ET, gate_T, expert_T)
        return probs_ET, gate_T, expert_T, lse_T

    @staticmethod
    def backward(ctx, g_probs_ET, g_gate_T, _, g_lse_T):
        probs_ET, gate_T, expert_T = ctx.saved_tensors
        return top1_softmax_backward(probs_ET, gate_T, expert_T, g_probs_ET, g_gate_T, g_lse_T)


def route(logits_TE: Tensor, top_k: int = 1) -> Routing:
    """Softmax over experts, then the top-k choice per token (k = 1 is Switch; k > 1 is the MoE baseline).

    logits_TE: [T, E] (float32 unless the router runs in another ``router_dtype``).  Top-1 keeps the raw
    probability as the gate, which is what makes the router differentiable (paper §2.1); for k > 1 the gates are
    renormalised over the chosen experts (GShard). Also returns the logsumexp of the logits (for the z-loss).

    NOTE: the reductions over experts run on the [E, T] layout (contiguous along tokens): with few experts a
    softmax over a last dimension of size 8 is about 20x slower on the CPU than one vectorised along T. The
    [T, E] results are transposed views of it. Top-1 in float32/float64 computes softmax, choice, gate and
    logsumexp in one autograd node (`_Top1Softmax`), with fewer ops forward and backward than the separate ones."""
    logits_ET = logits_TE.t().contiguous()  # a no-op when the router produced [E, T] (it does)
    if top_k == 1 and logits_ET.dtype in (torch.float32, torch.float64):
        probs_ET, gates_T, expert_T, lse_T = _Top1Softmax.apply(logits_ET)
        gates_TK, expert_TK = gates_T[:, None], expert_T[:, None]
    else:
        probs_ET = torch.softmax(logits_ET, dim=0)
        lse_T = torch.logsumexp(logits_ET, dim=0)
        if top_k == 1:
            gates_T, expert_T = probs_ET.max(dim=0)
            gates_TK, expert_TK = gates_T[:, None], expert_T[:, None]
        else:
            gates_TK, expert_TK = probs_ET.t().topk(top_k, dim=-1)
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
    return Routing(logits_ET.t(), probs_ET.t(), expert_TK, gates_TK, lse_T)


class _RouterLogits(torch.autograd.Function):
    """logits_ET = W · xᵀ: [E, D] x [T, D] -> [E, T], the layout the reductions over experts want (see `route`).

    Backward returns g_x = g_ETᵀ · W as a contiguous [T, D] (autograd's own backward of ``W @ x.t()`` would hand
    back a transposed [D, T] view, which then costs a strided add where it meets the experts' gradient of x)."""

    @staticmethod
    def forward(ctx, w_ED: Tensor, x_TD: Tensor) -> Tensor:
        ctx.save_for_backward(w_ED, x_TD)
        return torch.mm(w_ED, x_TD.t())

    @staticmethod
    def backward(ctx, g_ET: Tensor):
        w_ED, x_TD = ctx.saved_tensors
        g_w = torch.mm(g_ET, x_TD) if ctx.needs_input_grad[0] else None
        g_x = torch.mm(g_ET.t(), w_ED) if ctx.needs_input_grad[1] else None
        return g_w, g_x


ROUTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Router(nn.Module):
    """A bias-free linear map d_model -> n_experts, computed in float32 (the paper's selective precision, §2.4).

    weight: [E, D].  With ``jitter_eps > 0`` the router's *input* is multiplied by U(1 - eps, 1 + eps) noise
    in training only (paper App. C, "input jitter"). ``router_dtype`` "bfloat16" or "float16" computes the logits
    (and so the softmax, gates and choices downstream) in that precision instead: the unsafe variant of Table 2,
    kept for the stability experiment."""

    def __init__(self, d_model: int, n_experts: int, *, jitter_eps: float = 0.0, init_scale: float = 0.1,
                 router_dtype: str = "float32"):
        super().__init__()
        if router_dtype not in ROUTER_DTYPES:
            raise ValueError(f"router_dtype must be one of {', '.join(map(repr, ROUTER_DTYPES))}; got {router_dtype!r}")
        self.jitter_eps = jitter_eps
        self.router_dtype = router_dtype
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        self.init_scale = init_scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        truncated_normal_(self.weight, fan_in=self.weight.shape[1], init_scale=self.init_scale)

    def extra_repr(self) -> str:
        return f"d_model={self.weight.shape[1]}, n_experts={self.weight.shape[0]}, router_dtype={self.router_dtype!r}"

    def forward(self, x_TD: Tensor) -> Tensor:
        """x_TD [T, D] of any float dtype -> logits [T, E] in float32 (float64 for float64 input; router_dtype if
        set lower). The result is a transposed view of an [E, T] tensor (see `route`)."""
        # NOTE: autocast is switched off and both operands are cast up, so the logits, the softmax and the gates
        # are float32 even when the rest of the model runs in bfloat16 (Table 2: the all-bf16 model diverged).
        # float64 input stays float64 (never lower the precision; gradcheck relies on it).
        device_type = x_TD.device.type
        no_autocast = torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) \
            else nullcontext()
        dt = torch.promote_types(x_TD.dtype, torch.float32) if self.router_dtype == "float32" \
            else ROUTER_DTYPES[self.router_dtype]
        with no_autocast:
            x_TD = x_TD.to(dt)
            if self.training and self.jitter_eps > 0:
                noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
                x_TD = x_TD * noise
            return _RouterLogits.apply(self.weight.to(dt), x_TD).t()  # [E, T] underneath: see `route`
