"""Expert capacity and token dropping (paper eq. 3, §2.2, Fig. 15), per capacity group.

    capacity = ceil(top_k × capacity_factor × G / n_experts)      (eq. 3 extended to top-k as in GShard, rounded up)

The tokens of a call are split into capacity groups of G consecutive tokens (``group_size``; None = one group of
all T tokens). In each group every expert processes at most ``capacity`` (token, choice) assignments (the paper's
pseudocode computes capacity per core; Mesh TensorFlow and GShard per group; Hugging Face per sequence). When more
tokens of a group pick an expert, the drop policy decides which are kept; the rest get zero output from the layer
and travel on through the residual connection.

- ``"position"``: earlier tokens first (Mesh TensorFlow, the paper; the only policy that keeps a decoder causal).
- ``"priority"``: higher gate first, ties by position (batch-prioritised routing, V-MoE).
- ``"random"``: a uniformly random subset.

For top_k > 1 every first choice is placed before any second choice. Everything here is tensor arithmetic with
static shapes: no host-device synchronisation.
Shape legend: T tokens, K choices per token, A = T·K assignments, E experts, G tokens per group, N groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DROP_POLICIES = ("position", "priority", "random")


def expert_capacity(n_tokens: int, n_experts: int, capacity_factor: float | None, top_k: int = 1) -> int:
    """Slots per expert for a group of ``n_tokens`` tokens: ceil(top_k × capacity_factor × n_tokens / n_experts)
    (paper eq. 3, extended to top-k, rounded up).

    ``capacity_factor=None`` means dropless: every assignment fits (an expert can receive at most n_tokens of
    them). NOTE: the product is rounded to 9 decimals before the ceiling, so a factor chosen to give an exact
    integer (e.g. capacity × E / T) is not pushed one slot up by floating-point error."""
    if capacity_factor is None:
        return n_tokens
    return math.ceil(round(top_k * capacity_factor * n_tokens / n_experts, 9))


@dataclass
class Dispatch:
    """Where every (token, choice) assignment goes. Assignments are flattened token-major: a = t·K + k.

    expert_A: expert of each assignment, ``n_experts`` for padding tokens (a bucket no expert reads).
    group_A: capacity group of each assignment (token // group_size).
    slot_A: 0-based position of the assignment in its expert's queue within its group (Fig. 15's cumsum, from 0).
    keep_A: bool, True where slot < capacity and the token is real.
    rank_A: for kept assignments, the position among all kept assignments of its expert in (group, slot) order
    (meaningless where not kept): the row of the expert's block in the grouped layout.
    order_A: every assignment sorted by (expert, group, fill order); padding last.
    counts_E: real tokens whose *first* choice is each expert, before the capacity cut (all groups).
    kept_GE: long [N, E] assignments each expert processes in each group (<= capacity); kept_E: its sum over N.
    n_real: real assignments (float32 scalar).  capacity: slots per expert per group (python int).
    top_k: K.  n_groups: N.  group_tokens: tokens in a full group, G (python ints)."""

    expert_A: Tensor
    group_A: Tensor
    slot_A: Tensor
    keep_A: Tensor
    rank_A: Tensor
    order_A: Tensor
    counts_E: Tensor
    kept_GE: Tensor
    n_real: Tensor
    capacity: int
    top_k: int
    n_groups: int
    group_tokens: int

    @property
    def kept_E(self) -> Tensor:
        """long [E]: assignments each expert processes, summed over the groups."""
        return self.kept_GE.sum(0)


def n_groups_of(n_tokens: int, group_size: int | None) -> int:
    """Capacity groups in a call of n_tokens tokens: ceil(T / G); the last group may be shorter."""
    if group_size is None:
        return 1 if n_tokens else 0
    return -(-n_tokens // group_size)


def _priority_rank(gates_TK: Tensor, policy: str, generator: torch.Generator | None) -> Tensor:
    """Rank [T, K] of each assignment in the order experts are filled: all k-th choices before any (k+1)-th.

    The rank is global over the call; restricted to one group it is that group's fill order."""
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
        ranks = torch.arange(T, device=device)[:, None].expand(T, K)
        within_TK = torch.empty_like(order_TK).scatter_(0, order_TK, ranks)
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
    group_size: int | None = None,
) -> Dispatch:
    """Assign every (token, choice) a slot in its expert's queue within its group and decide which are kept.

    expert_TK: long [T, K], the router's choices.  gates_TK: float [T, K] (used by ``"priority"``).
    mask_T: bool [T], True for real tokens; padding takes no slot and counts nowhere.
    capacity: slots per expert per group.  group_size: tokens per capacity group (None: the whole call).
    One sort orders assignments by (expert, group, fill order); a slot is the index within its (expert, group)
    run."""
    T, K = expert_TK.shape
    A, E = T * K, n_experts
    N = n_groups_of(T, group_size)
    device = expert_TK.device
    real_TK = None if mask_T is None else mask_T[:, None].expand(T, K)
    if real_TK is not None:
        expert_TK = torch.where(real_TK, expert_TK, E)  # padding -> bucket E
    expert_A = expert_TK.reshape(A)
    if N > 1:
        group_A = torch.arange(A, device=device) // (K * group_size)
        bucket_A = expert_A * N + group_A
    else:  # one group: buckets are experts (a view of zeros: nothing to compute)
        group_A = torch.zeros((), dtype=torch.long, device=device).expand(A)
        bucket_A = expert_A
    # Buckets (expert, group), padding in the last buckets; sort by (bucket, fill rank): unique keys.
    if policy == "position":  # fill rank = k·T + t: a stable sort of bucket by choice, then position
        key_A = bucket_A if K == 1 else bucket_A.view(T, K).t().reshape(A)
        sorted_bucket_A, order_A = torch.sort(key_A, stable=True)  # the sorted keys are the buckets
        if K > 1:  # back from choice-major to token-major assignment ids
            order_A = (order_A % T) * K + order_A // T
    else:
        key_A = bucket_A * A + _priority_rank(gates_TK, policy, generator).reshape(A)
        order_A = torch.argsort(key_A)
        sorted_bucket_A = bucket_A[order_A]

    # Slot = index in the sorted list minus where the bucket's run starts (exclusive cumsum of run lengths).
    # NOTE: index_add_, not bincount: bincount reads its maximum back to the host on an accelerator.
    ones_A = torch.ones(A, dtype=torch.long, device=device)
    per_bucket = torch.zeros((E + 1) * N, dtype=torch.long, device=device).index_add_(0, bucket_A, ones_A)
    start = torch.cumsum(per_bucket, 0) - per_bucket
    sorted_slot_A = torch.arange(A, device=device) - start[sorted_bucket_A]
    slot_A = torch.empty_like(sorted_slot_A).scatter_(0, order_A, sorted_slot_A)

    keep_A = slot_A < capacity if real_TK is None else (slot_A < capacity) & (expert_A < E)
    kept_EN = per_bucket[: E * N].view(E, N).clamp(max=capacity)
    # Rank among the expert's kept assignments: those kept in its earlier groups, plus the slot.
    if N > 1 and A:
        before_EN = torch.cumsum(kept_EN, 1) - kept_EN
        rank_A = before_EN.reshape(E * N)[bucket_A.clamp(max=E * N - 1)] + slot_A
    else:
        rank_A = slot_A
    if K == 1 and N == 1:  # the buckets are the first choices already (padding in bucket E)
        counts_E = per_bucket[:E]
    else:
        counts_E = torch.zeros(E + 1, dtype=torch.long, device=device).index_add_(0, expert_TK[:, 0],
                                                                                 ones_A[:T])[:E]
    n_real = torch.full((), float(A), device=device) if real_TK is None else real_TK.sum().to(torch.float32)
    return Dispatch(expert_A, group_A, slot_A, keep_A, rank_A, order_A, counts_E, kept_EN.t(), n_real,
                    capacity, K, N, T if group_size is None else min(group_size, T))
