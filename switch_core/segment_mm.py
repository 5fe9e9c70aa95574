"""A grouped matmul as one matmul per expert segment: rows offs[e-1]:offs[e] of x times w[e].

The segment sizes come to the host to split the rows (``tolist``: free on the CPU, a sync on an accelerator). That
is the grouped backend's kernel where its CPU fast path does not apply (gated activations, biases, expert dropout;
torch.compile) and wherever ``grouped_mm`` is missing, in two forms over the same two loops: `SegmentMM`, an
autograd node, in eager mode; and ``switch_core::segment_mm``, a PyTorch custom op, under torch.compile. The
compiler cannot trace ``tolist`` (a graph break) but it can trace a custom op: it sees the op's fixed output shape
(its fake implementation) and a backward made of custom ops too, so a layer on the grouped backend compiles into one
graph (``fullgraph=True``), dropless layers included. The custom op costs about 25 µs more per call than the
autograd node in eager mode (3 calls per projection, forward and backward).

Shape legend: S rows (sorted by expert), E experts, D inner size, F output size.
"""
from __future__ import annotations

import torch
from torch import Tensor


def segment_mm_rows(x_SD: Tensor, w_EDF: Tensor, bounds: list[int]) -> Tensor:
    """Rows bounds[e]:bounds[e+1] of x_SD [S, D] times w_EDF[e] ([E, D, F]) -> [S, F]; rows past bounds[-1] are 0.
    bounds: E + 1 python ints."""
    y_SF = x_SD.new_empty(x_SD.shape[0], w_EDF.shape[2])
    y_SF[bounds[-1]:].zero_()
    for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b > a:
            torch.mm(x_SD[a:b], w_EDF[e], out=y_SF[a:b])
    return y_SF


def segment_weight_grad(x_SD: Tensor, g_SF: Tensor, bounds: list[int], n_experts: int) -> Tensor:
    """The weight gradient of `segment_mm_rows`: [E, D, F], expert e's block x[rows e]ᵀ · g[rows e], 0 for an
    expert without rows. Each block is written straight into its slice (no per-expert tensors to stack)."""
    g_w = x_SD.new_empty(n_experts, x_SD.shape[1], g_SF.shape[1])
    for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b > a:
            torch.mm(x_SD[a:b].t(), g_SF[a:b], out=g_w[e])
        else:
            g_w[e].zero_()
    return g_w


class SegmentMM(torch.autograd.Function):
    """`segment_mm_rows` as an autograd node, for eager mode: x_SD [S, D], w_EDF [E, D, F], bounds (python ints)."""

    @staticmethod
    def forward(ctx, x_SD: Tensor, w_EDF: Tensor, bounds: list[int]) -> Tensor:
        ctx.save_for_backward(x_SD, w_EDF)
        ctx.bounds = bounds
        return segment_mm_rows(x_SD, w_EDF, bounds)

    @staticmethod
    def backward(ctx, g_SF: Tensor):
        x_SD, w_EDF = ctx.saved_tensors
        g_x = segment_mm_rows(g_SF, w_EDF.transpose(1, 2), ctx.bounds) if ctx.needs_input_grad[0] else None
        g_w = segment_weight_grad(x_SD, g_SF, ctx.bounds, w_EDF.shape[0]) if ctx.needs_input_grad[1] else None
        return g_x, g_w, None


@torch.library.custom_op("switch_core::segment_mm", mutates_args=())
def segment_mm(x_SD: Tensor, w_EDF: Tensor, offs_E: Tensor) -> Tensor:
    """x_SD [S, D], w_EDF [E, D, F], offs_E int [E] cumulative row ends -> [S, F]: rows offs[e-1]:offs[e] times
    w[e]; rows past offs[-1] are 0."""
    return segment_mm_rows(x_SD, w_EDF, [0] + offs_E.tolist())


@segment_mm.register_fake
def _(x_SD: Tensor, w_EDF: Tensor, offs_E: Tensor) -> Tensor:
    return x_SD.new_empty(x_SD.shape[0], w_EDF.shape[2])


@torch.library.custom_op("switch_core::segment_mm_weight_grad", mutates_args=())
def segment_mm_weight_grad(x_SD: Tensor, g_SF: Tensor, offs_E: Tensor, n_experts: int) -> Tensor:
    """`segment_weight_grad` with the offsets as a tensor."""
    return segment_weight_grad(x_SD, g_SF, [0] + offs_E.tolist(), n_experts)


@segment_mm_weight_grad.register_fake
def _(x_SD: Tensor, g_SF: Tensor, offs_E: Tensor, n_experts: int) -> Tensor:
    return x_SD.new_empty(n_experts, x_SD.shape[1], g_SF.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x_SD, w_EDF, offs_E = inputs
    ctx.save_for_backward(x_SD, w_EDF, offs_E)


def _backward(ctx, g_SF: Tensor):
    x_SD, w_EDF, offs_E = ctx.saved_tensors
    g_x = segment_mm(g_SF, w_EDF.transpose(1, 2), offs_E) if ctx.needs_input_grad[0] else None
    g_w = segment_mm_weight_grad(x_SD, g_SF, offs_E, w_EDF.shape[0]) if ctx.needs_input_grad[1] else None
    return g_x, g_w, None


segment_mm.register_autograd(_backward, setup_context=_setup_context)
