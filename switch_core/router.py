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

    logits_TE: [T, E] (float32 unless the router runs in another ``router_dtype``).  Top-1 keeps the raw
    probability as the gate, which is what makes the router differentiable (paper §2.1); for k > 1 the gates are
    renormalised over the chosen experts (GShard).

    NOTE: the reductions over experts run on the [E, T] layout (contiguous along tokens): with few experts a
    softmax over a last dimension of size 8 is about 20x slower on the CPU than one vectorised along T. The
    [T, E] results are transposed views of it."""
    logits_ET = logits_TE.t().contiguous()  # a no-op when the router produced [E, T] (it does)
    probs_ET = torch.softmax(logits_ET, dim=0)
    if top_k == 1:
        gates_T, expert_T = probs_ET.max(dim=0)
        gates_TK, expert_TK = gates_T[:, None], expert_T[:, None]
    else:
        gates_TK, expert_TK = probs_ET.t().topk(top_k, dim=-1)
        gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
    return Routing(logits_ET.t(), probs_ET.t(), expert_TK, gates_TK)


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
            return F.linear(x_TD, self.weight.to(dt))
