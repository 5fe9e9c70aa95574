"""The router: which expert each token goes to, and with what gate (paper eq. 1, §2.1, §2.4).

    h(x) = W_r · x,    p_i(x) = softmax(h(x))_i,    expert = argmax_i p_i(x),    gate = p_expert(x)

Shape legend: T tokens, D = d_model, E experts, K = top_k choices per token.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .init import truncated_normal_


@dataclass
class Routing:
    """What the router decided for T tokens.

    logits_TE, probs_TE: float32 router logits and softmax.  expert_TK: chosen experts, best first.
    gates_TK: float32 gates (top-1: the un-renormalised max probability; top-k: renormalised over the k chosen).
    """

    logits_TE: Tensor
    probs_TE: Tensor
    expert_TK: Tensor
    gates_TK: Tensor


def route(logits_TE: Tensor, top_k: int = 1) -> Routing:
    """Softmax over experts, then the top-k choice per token (k = 1 is Switch; k > 1 is the MoE baseline).

    logits_TE: float32 [T, E].  Top-1 keeps the raw probability as the gate, which is what makes the router
    differentiable (paper §2.1); for k > 1 the gates are renormalised over the chosen experts (GShard)."""
    probs_TE = torch.softmax(logits_TE, dim=-1)
    if top_k == 1:
        gates_TK, expert_TK = probs_TE.max(dim=-1, keepdim=True)
    else:
        gates_TK, expert_TK = probs_TE.topk(top_k, dim=-1)
        gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
    return Routing(logits_TE, probs_TE, expert_TK, gates_TK)


class Router(nn.Module):
    """A bias-free linear map d_model -> n_experts, computed in float32 (the paper's selective precision, §2.4).

    weight: [E, D].  With ``jitter_eps > 0`` the router's *input* is multiplied by U(1 - eps, 1 + eps) noise
    in training only (paper App. C, "input jitter")."""

    def __init__(self, d_model: int, n_experts: int, *, jitter_eps: float = 0.0, init_scale: float = 0.1):
        super().__init__()
        self.jitter_eps = jitter_eps
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        self.init_scale = init_scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        truncated_normal_(self.weight, fan_in=self.weight.shape[1], init_scale=self.init_scale)

    def forward(self, x_TD: Tensor) -> Tensor:
        """x_TD [T, D] of any float dtype -> float32 logits [T, E] (float64 for float64 input)."""
        # NOTE: autocast is switched off and both operands are cast up, so the logits, the softmax and the gates
        # are float32 even when the rest of the model runs in bfloat16 (Table 2: a bf16 router diverged).
        # float64 input stays float64 (never lower the precision; gradcheck relies on it).
        device_type = x_TD.device.type
        no_autocast = torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) \
            else nullcontext()
        with no_autocast:
            x_TD = x_TD.to(torch.promote_types(x_TD.dtype, torch.float32))
            if self.training and self.jitter_eps > 0:
                noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
                x_TD = x_TD * noise
            return F.linear(x_TD, self.weight.to(x_TD.dtype))
