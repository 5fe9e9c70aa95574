"""Expert capacity and token dropping (paper eq. 3, §2.2, Fig. 15).

    capacity = ceil(top_k × capacity_factor × T / n_experts)

(the paper's eq. 3, T / n_experts × capacity_factor, extended to top-k assignments per token as in GShard
and rounded up to whole slots). Each expert processes at most ``capacity`` (token, choice) assignments. When
more tokens pick it, the drop policy decides which are kept; the rest get zero output from the layer and travel
on through the residual connection.

- ``"position"``: earlier tokens first (Mesh TensorFlow, the paper; the only policy that keeps a decoder causal).
- ``"priority"``: higher gate first, ties by position (batch-prioritised routing, V-MoE).
- ``"random"``: a uniformly random subset.

For top_k > 1 every first choice is placed before any second choice. Everything here is tensor arithmetic with
static shapes: no host-device synchronisation.
Shape legend: T tokens, K choices per token, A = T·K assignments, E experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DROP_POLICIES = ("position", "priority", "random")


def expert_capacity(n_tokens: int, n_experts: int, capacity_factor: float | None, top_k: int = 1) -> int:
    """Slots per expert: ceil(top_k × capacity_factor × T / n_experts) (paper eq. 3, extended to top-k, rounded up).

    ``capacity_factor=None`` means dropless: every assignment fits (an expert can receive at most T of them)."""
    if capacity_factor is None:
        return n_tokens
    return math.ceil(top_k * capacity_factor * n_tokens / n_experts)


@dataclass
class Dispatch:
    """Where every (token, choice) assignment goes. Assignments are flattened token-major: a = t·K + k.

    expert_A: expert of each assignment, ``n_experts`` for padding tokens (a bucket no expert reads).
    slot_A: 0-based position of the assignment in its expert's queue (the cumsum of Fig. 15, from 0).
    keep_A: bool, True where slot < capacity and the token is real.
    counts_E: real tokens whose *first* choice is each expert, before the capacity cut.
    kept_E: assignments each expert actually processes (<= capacity).
    n_real: real assignments (float32 scalar).  capacity: slots per expert (python int)."""

    expert_A: Tensor
    slot_A: Tensor
    keep_A: Tensor
    counts_E: Tensor
    kept_E: Tensor
    n_real: Tensor
    capacity: int


def _priority_rank(gates_TK: Tensor, policy: str, generator: torch.Generator | None) -> Tensor:
    """Rank [T, K] of each assignment in the order experts are filled: all k-th choices before any (k+1)-th."""
    T, K = gates_TK.shape
    device = gates_TK.device
    if policy == "position":
        within_TK = torch.arange(T, device=device)[:, None].expand(T, K)
    else:
        if policy == "priority":
            # Stable sort of -gate: higher gate first, ties broken by token position.
            order_TK = torch.argsort(-gates_TK, dim=0, stable=True)
        else:  # "random": a uniformly random permutation of the tokens, per choice.
            noise = torch.rand(T, K, device=device, generator=generator)
            order_TK = torch.argsort(noise, dim=0)
        # order_TK[i, k] is the token at rank i; invert it to get each token's rank.
        within_TK = torch.empty_like(order_TK).scatter_(0, order_TK, torch.arange(T, device=device)[:, None].expand(T, K))
    return torch.arange(K, device=device)[None, :] * T + within_TK


def dispatch(
    expert_TK: Tensor,
    gates_TK: Tensor,
    n_experts: int,
    capacity: int,
    *,
    mask_T: Tensor | None = None,
    policy: str = "position",
    generator: torch.Generator | None = None,
) -> Dispatch:
    """Assign every (token, choice) a slot in its expert's queue and decide which are kept.

    expert_TK: long [T, K], the router's choices.  gates_TK: float [T, K] (used by ``"priority"``).
    mask_T: bool [T], True for real tokens; padding takes no slot and counts nowhere.
    One sort orders assignments by (expert, priority); a slot is the index within the expert's run."""
    T, K = expert_TK.shape
    A = T * K
    device = expert_TK.device
    real_TK = torch.ones(T, K, dtype=torch.bool, device=device) if mask_T is None else mask_T[:, None].expand(T, K)
    expert_TK = torch.where(real_TK, expert_TK, n_experts)  # padding -> bucket E

    # Sort by (expert, fill order): unique keys, so the order is fully determined.
    rank_TK = _priority_rank(gates_TK, policy, generator)
    key_A = (expert_TK * A + rank_TK).reshape(A)
    order_A = torch.argsort(key_A)
    sorted_expert_A = expert_TK.reshape(A)[order_A]

    # Slot = index in the sorted list minus where the expert's run starts (exclusive cumsum of run lengths).
    per_bucket = torch.zeros(n_experts + 1, dtype=torch.long, device=device)
    per_bucket.index_add_(0, sorted_expert_A, torch.ones(A, dtype=torch.long, device=device))
    start = torch.cumsum(per_bucket, 0) - per_bucket
    sorted_slot_A = torch.arange(A, device=device) - start[sorted_expert_A]
    slot_A = torch.empty_like(sorted_slot_A).scatter_(0, order_A, sorted_slot_A)

    expert_A = expert_TK.reshape(A)
    keep_A = (slot_A < capacity) & (expert_A < n_experts)
    counts_E = torch.zeros(n_experts + 1, dtype=torch.long, device=device)
    counts_E.index_add_(0, expert_TK[:, 0], torch.ones(T, dtype=torch.long, device=device))
    kept_E = per_bucket[:n_experts].clamp(max=capacity)
    n_real = real_TK.sum().to(torch.float32)
    return Dispatch(expert_A, slot_A, keep_A, counts_E[:n_experts], kept_E, n_real, capacity)
