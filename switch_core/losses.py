"""The auxiliary losses that keep a router healthy.

- Load balancing (Switch paper eq. 4-6):  N · Σ_i f_i · P_i,  f_i = fraction of tokens whose first choice is
  expert i, P_i = mean router probability of expert i. Equals 1.0 when routing is uniform.
- Router z-loss (ST-MoE eq. 5):  mean over tokens of (log Σ_j exp(x_j))², which keeps logits small.

Both are returned unweighted; the coefficients (α = 0.01, c_z = 0.001) belong to the training config.
Shape legend: T tokens, E experts.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _real_tokens(mask_T: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """(float weights [T] that are 1 for real tokens, number of real tokens clamped to >= 1)."""
    if mask_T is None:
        w_T = torch.ones(like.shape[0], device=like.device, dtype=torch.float32)
    else:
        w_T = mask_T.to(torch.float32)
    return w_T, w_T.sum().clamp(min=1.0)


def _per_group(v_T: Tensor, N: int, G: int) -> Tensor:
    """Sums over runs of G consecutive rows: v [T, ...] -> [N, ...], N = ceil(T / G) (the last run may be short)."""
    pad = [0, 0] * (v_T.dim() - 1) + [0, N * G - v_T.shape[0]]
    return torch.nn.functional.pad(v_T, pad).view(N, G, *v_T.shape[1:]).sum(dim=1)


def balance_loss(probs_TE: Tensor, first_choice_T: Tensor, mask_T: Tensor | None = None,
                 group_size: int | None = None) -> Tensor:
    """Switch auxiliary loss, N · Σ_i f_i · P_i (paper eq. 4). 1.0 when routing is uniform (or P is).

    probs_TE: float32 router softmax [T, E].  first_choice_T: argmax expert [T] (long).
    mask_T: optional bool [T], True for real tokens; padding counts in neither f nor P.
    group_size: with capacity groups of G consecutive tokens, f and P are taken per group and the loss is the mean
    over the groups that hold a real token (as Mesh TensorFlow, GShard and Hugging Face do); None: one group.
    f comes from an argmax, so the gradient flows through P only. Returns a float32 scalar."""
    T, E = probs_TE.shape
    probs_TE = probs_TE.to(torch.promote_types(probs_TE.dtype, torch.float32))
    if mask_T is None and (group_size is None or group_size >= T):  # every token real, one group
        f_E = torch.zeros(E, dtype=probs_TE.dtype, device=probs_TE.device).index_add_(
            0, first_choice_T.clamp(min=0), torch.ones(T, dtype=probs_TE.dtype, device=probs_TE.device))
        return (f_E * probs_TE.sum(dim=0)).sum() * (E / max(T, 1) ** 2)
    index_T = first_choice_T.clamp(min=0)  # padding may carry -1; its weight is 0 anyway
    if group_size is None or group_size >= T:
        # One group. f_i: a count of first choices (no gradient); P_i: mean probability (carries the gradient).
        w_T, n_real = _real_tokens(mask_T, probs_TE)
        f_E = torch.zeros(E, dtype=probs_TE.dtype, device=probs_TE.device).index_add_(0, index_T,
                                                                                     w_T.to(probs_TE.dtype))
        P_E = (probs_TE if mask_T is None else torch.where(mask_T[:, None], probs_TE, 0.0)).sum(dim=0)
        return E * (f_E * P_E).sum() / (n_real * n_real)
    w_T = torch.ones(T, device=probs_TE.device) if mask_T is None else mask_T.to(torch.float32)
    N = -(-T // group_size)
    group_T = torch.arange(T, device=probs_TE.device) // group_size
    # Groups are runs of consecutive tokens: sums per group by padding T to N · G and reshaping. (Not index_add_
    # over group_T: Inductor's CPU code generation fails on that scatter on AVX2 machines, torch 2.13.)
    n_N = _per_group(w_T, N, group_size)
    f_NE = torch.zeros(N * E, dtype=probs_TE.dtype, device=probs_TE.device).index_add_(
        0, group_T * E + index_T, w_T.to(probs_TE.dtype)).view(N, E)
    P_NE = _per_group(probs_TE if mask_T is None else torch.where(mask_T[:, None], probs_TE, 0.0), N, group_size)
    loss_N = E * (f_NE * P_NE).sum(dim=1) / n_N.clamp(min=1.0).square()
    has_real_N = n_N > 0
    return (loss_N * has_real_N).sum() / has_real_N.sum().clamp(min=1)


def z_loss(logits_TE: Tensor, mask_T: Tensor | None = None, lse_T: Tensor | None = None) -> Tensor:
    """Router z-loss (ST-MoE eq. 5): mean over real tokens of logsumexp(logits)². Float32 scalar.

    logits_TE: router logits [T, E].  mask_T: optional bool [T], True for real tokens.
    lse_T: the logsumexp of the logits [T] when the caller has it already (`route` returns it)."""
    if lse_T is None:
        lse_T = torch.logsumexp(logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32)), dim=-1)
    if mask_T is None:
        return lse_T.square().sum() / max(lse_T.shape[0], 1)
    _, n_real = _real_tokens(mask_T, logits_TE)
    return torch.where(mask_T, lse_T.square(), 0.0).sum() / n_real
