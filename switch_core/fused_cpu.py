"""The whole top-1 Switch layer on the CPU as one autograd node: router, softmax, capacity, experts, combine, losses.

The same algorithm as `SwitchFeedForward`'s four steps (layer.py), for the configuration a CPU training run uses by
default: top-1, the "position" drop policy, one capacity group, no padding mask, float32/float64 without autocast,
a float32 router, an ungated activation without bias, no input jitter or expert dropout in training (the layer
decides, `SwitchFeedForward.fuses_on_cpu`). On a small model on the CPU a Switch step's extra cost over its dense
twin is the number of small ops and autograd nodes around the matmuls, not the matmuls; here the router's softmax,
the capacity cut, the gate, the combine and both auxiliary losses run as straight-line code in one forward and one
backward, the router's gradient of x is added into the experts' with one ``addmm_``, and the host-side bookkeeping
(rows per expert) that the CPU path needs anyway replaces the sort-based slot arithmetic of `capacity.dispatch`.
Tests hold it to the step-by-step layer in every output, statistic and gradient.

Shape legend: T tokens, D = d_model, E experts, S kept tokens (sorted by expert), F = d_ff.
"""
from __future__ import annotations

from itertools import accumulate

import torch
from torch import Tensor

from .experts import sorted_ffn_backward, sorted_ffn_forward
from .router import top1_softmax


def _logits_grad(probs_ET: Tensor, expert_T: Tensor, gg_T: Tensor, g_p: Tensor | None,
                 g_lse_T: Tensor | None) -> Tensor:
    """`router.top1_softmax_backward` in fewer ops, for the fused backward: gg_T [T] is g_gate · gate, g_p is
    [E, 1] (the balance loss's), [E, T] or None, g_lse_T [T] or None. Returns
    g_l = p ⊙ (g_p - c) + onehot(expert) · gg  with  c = <p, g_p> + gg - g_lse  ([E, T])."""
    if g_p is None:
        c_T = gg_T.clone()
    elif g_p.shape[1] == 1:
        c_T = torch.addmv(gg_T, probs_ET.t(), g_p[:, 0])
    else:
        c_T = (probs_ET * g_p).sum(dim=0).add_(gg_T)
    if g_lse_T is not None:
        c_T.sub_(g_lse_T)
    g_ET = probs_ET * (c_T.neg_() if g_p is None else g_p - c_T)
    return g_ET.scatter_add_(0, expert_T[None], gg_T[None])


class SwitchCPU(torch.autograd.Function):
    """One Switch layer, top-1, on the CPU. Inputs: x_TD [T, D] (T >= 1), w_r [E, D], w_in [E, D, F],
    w_out [E, F, D], all of one dtype; capacity (python int, slots per expert); activation (name).

    Outputs: y_TD [T, D]; probs_ET, logits_ET [E, T]; gate_T [T]; balance_loss, z_loss (scalars, unweighted);
    and, without gradient, expert_T long [T], counts_E long [E] (first choices), kept_E long [E] (assignments
    processed), dropped_fraction (float32 scalar). Gradients flow from y, the probabilities, the logits, the gates
    and both losses, as in the step-by-step layer. Not twice differentiable."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, w_r: Tensor, w_in: Tensor, w_out: Tensor, capacity: int, activation: str):
        T, E = x_TD.shape[0], w_r.shape[0]
        # 1. Route: logits [E, T] (reductions over experts vectorise along tokens), softmax, choice, gate.
        logits_ET = torch.mm(w_r, x_TD.t())
        probs_ET, gate_T, expert_T, lse_T = top1_softmax(logits_ET)
        # 2. Capacity: tokens sorted by expert (stable: by position within an expert); the first `capacity` of
        # each expert's run keep their slot (the "position" policy). Rows per expert come to the host (free here).
        order_T = torch.sort(expert_T, stable=True).indices
        counts_E = torch.bincount(expert_T, minlength=E)
        counts = counts_E.tolist()
        kept = [min(c, capacity) for c in counts]
        if kept == counts:
            tok_S = order_T
        else:
            starts = accumulate(counts[:-1], initial=0)
            tok_S = torch.cat([order_T[a:a + k] for a, k in zip(starts, kept)])
        S = tok_S.shape[0]
        # 3. Experts on their rows, then 4. combine: y = gate · E_i(x), 0 for dropped tokens (the zero row).
        xs_SD = x_TD.index_select(0, tok_S)
        ys_S1D, saved = sorted_ffn_forward(xs_SD, w_in, w_out, kept, activation)
        gate_S = gate_T.index_select(0, tok_S)
        ys_S1D[:S].mul_(gate_S[:, None])
        row_T = torch.full((T,), S, dtype=torch.long)
        row_T[tok_S] = torch.arange(S)
        y_TD = ys_S1D.index_select(0, row_T)
        # The losses of losses.py, from what is on hand: balance = E/T² Σ_i f_i Σ_t p_it (f: the counts), z =
        # mean lse². Their backward is below.
        f_E = counts_E.to(probs_ET.dtype)
        balance = torch.dot(f_E, probs_ET.sum(dim=1)) * (E / T ** 2)
        z = torch.dot(lse_T, lse_T) / T
        dropped = torch.tensor((T - S) / T, dtype=torch.float32)
        kept_E = torch.tensor(kept)
        ctx.mark_non_differentiable(expert_T, counts_E, kept_E, dropped)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x_TD, w_r, w_in, w_out, xs_SD, tok_S, row_T, ys_S1D, gate_S, probs_ET, gate_T,
                              expert_T, lse_T, f_E, *saved)
        ctx.kept, ctx.activation = kept, activation
        return y_TD, probs_ET, logits_ET, gate_T, balance, z, expert_T, counts_E, kept_E, dropped

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_TD, g_probs_ET, g_logits_ET, g_gate_T, g_balance, g_z, *_):
        (x_TD, w_r, w_in, w_out, xs_SD, tok_S, row_T, ys, gate_S, probs_ET, gate_T, expert_T, lse_T, f_E,
         *saved) = ctx.saved_tensors
        T, E, S = x_TD.shape[0], w_r.shape[0], xs_SD.shape[0]
        if g_TD is None:
            g_TD = torch.zeros_like(x_TD)
        # Experts: the gradient of each kept token's expert output is gate · g_y. The gate's, times the gate (the
        # form the softmax's backward takes), is <g_y, gate · E_i(x)>: a dot with the stored rows.
        g_SD = g_TD.index_select(0, tok_S)
        gg_S = torch.linalg.vecdot(g_SD, ys[:S])
        g_SD.mul_(gate_S[:, None])
        need = ctx.needs_input_grad
        g_xs_S1D, g_in, g_out = sorted_ffn_backward(xs_SD, g_SD, w_in, w_out, ctx.kept, ctx.activation, saved,
                                                    need[0])
        # Router: the gates' gradient (0 for dropped tokens), the balance loss's (through P only: f is a count)
        # and the z-loss's (through the logsumexp), back through the softmax to the logits.
        gg_T = torch.zeros_like(gate_T).index_copy_(0, tok_S, gg_S)
        if g_gate_T is not None:
            gg_T.addcmul_(g_gate_T, gate_T)
        g_p = None if g_balance is None else (g_balance * (E / T ** 2) * f_E)[:, None]
        if g_probs_ET is not None:
            g_p = g_probs_ET if g_p is None else g_p + g_probs_ET
        g_lse = None if g_z is None else lse_T * (g_z * (2 / T))
        g_ET = _logits_grad(probs_ET, expert_T, gg_T, g_p, g_lse)
        if g_logits_ET is not None:
            g_ET += g_logits_ET
        g_x = None
        if need[0]:  # the experts' share of x's gradient, and the router's added in place
            g_x = g_xs_S1D.index_select(0, row_T).addmm_(g_ET.t(), w_r)
        return (g_x, torch.mm(g_ET, x_TD) if need[1] else None,
                g_in if need[2] else None, g_out if need[3] else None, None, None)
