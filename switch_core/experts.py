"""The experts: E independent feed-forward networks stored as stacked weights, and three ways to run them.

Expert e computes  act(x · w_in[e] + b_in[e]) · w_out[e] + b_out[e]  (gated activations: act(x · w_gate[e]) ⊙ (x · w_in[e] + b_in[e])).

Backends, all computing the same thing (tests hold them to each other):

- ``"loop"``: the readable reference: for each expert, gather its tokens, run its FFN, scatter back.
- ``"padded"``: the capacity-shaped layout [E, C, D] and batched matmuls; static shapes (torch.compile, CUDA graphs).
- ``"grouped"``: tokens sorted by expert into one [A, D] block and one grouped matmul per projection
  (``torch.nn.functional.grouped_mm``); no host-device synchronisation. On the CPU, where a sync is free,
  the sorted block runs expert by expert instead (one matmul per expert segment; cache-friendlier).

Shape legend: T tokens, K choices, A = T·K assignments, E experts, C capacity, D = d_model, F = d_ff.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capacity import Dispatch
from .init import truncated_normal_

# name -> (activation function, gated?)
ACTIVATIONS = {
    "relu": (F.relu, False),
    "gelu": (F.gelu, False),
    "silu": (F.silu, False),
    "geglu": (F.gelu, True),   # Table 9 ticks GEGLU for most Switch models
    "swiglu": (F.silu, True),
}
BACKENDS = ("loop", "padded", "grouped")

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch build runs ``grouped_mm`` for this device and dtype (probed once on a tiny problem)."""
    if _grouped_mm is None:
        return False
    try:
        a = torch.zeros(8, 8, device=device_type, dtype=dtype)
        b = torch.zeros(2, 8, 8, device=device_type, dtype=dtype)
        _grouped_mm(a, b, offs=torch.tensor([4, 8], device=device_type, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_mm_aligned(dtype: torch.dtype, *dims: int) -> bool:
    """grouped_mm needs 16-byte aligned row strides: every inner dimension a multiple of 16 bytes."""
    size = torch.empty((), dtype=dtype).element_size()
    return all(d * size % 16 == 0 for d in dims)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward needs it)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


class _Permute(torch.autograd.Function):
    """Rows of x reordered by a permutation: x[index]. Backward gathers with the inverse permutation instead of
    the scatter-add a plain index would use (deterministic, no atomics). x [A, D], index/inverse long [A]."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x[index]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def _segments(bounds: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) for every expert with rows; bounds: E + 1 cumulative row boundaries."""
    return [(e, a, b) for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]


class _SegmentMM(torch.autograd.Function):
    """A grouped matmul as one matmul per expert segment: rows bounds[e]:bounds[e+1] times w[e]; rows past
    bounds[-1] give zeros. Backward writes each expert's weight gradient straight into its slice of one [E, D, F]
    buffer (no per-expert gradient tensors to stack). x_SD [S, D], w_EDF [E, D, F], bounds: E + 1 python ints."""

    @staticmethod
    def forward(ctx, x_SD: Tensor, w_EDF: Tensor, bounds: list[int]) -> Tensor:
        ctx.save_for_backward(x_SD, w_EDF)
        ctx.segments = _segments(bounds)
        y_SF = x_SD.new_zeros(x_SD.shape[0], w_EDF.shape[2])
        for e, a, b in ctx.segments:
            torch.mm(x_SD[a:b], w_EDF[e], out=y_SF[a:b])
        return y_SF

    @staticmethod
    def backward(ctx, g_SF: Tensor):
        x_SD, w_EDF = ctx.saved_tensors
        g_x = torch.zeros_like(x_SD) if ctx.needs_input_grad[0] else None
        g_w = torch.zeros_like(w_EDF) if ctx.needs_input_grad[1] else None
        for e, a, b in ctx.segments:
            if g_x is not None:
                torch.mm(g_SF[a:b], w_EDF[e].T, out=g_x[a:b])
            if g_w is not None:
                torch.mm(x_SD[a:b].T, g_SF[a:b], out=g_w[e])
        return g_x, g_w, None


class _ExpertByExpertFFN(torch.autograd.Function):
    """The CPU fast path of the grouped backend: expert by expert, y = act(x · w_in[e]) · w_out[e] on its row
    segment, so each expert's hidden activations stay in cache; backward writes every weight gradient straight
    into its slice of one [E, ...] buffer. Rows past bounds[-1] give zeros. x_SD [S, D], w_in [E, D, F],
    w_out [E, F, D], bounds: E + 1 python ints. Not twice differentiable."""

    @staticmethod
    def forward(ctx, x_SD: Tensor, w_in: Tensor, w_out: Tensor, bounds: list[int], act) -> Tensor:
        segments = _segments(bounds)
        y_SD = x_SD.new_empty(x_SD.shape[0], w_out.shape[2])
        y_SD[bounds[-1]:] = 0
        pre = []  # pre-activations, one [n_e, F] per non-empty expert
        for e, a, b in segments:
            pre.append(x_SD[a:b] @ w_in[e])
            torch.mm(act(pre[-1]), w_out[e], out=y_SD[a:b])
        ctx.save_for_backward(x_SD, w_in, w_out, *pre)
        ctx.segments, ctx.act = segments, act
        return y_SD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_SD: Tensor):
        x_SD, w_in, w_out, *pre = ctx.saved_tensors
        g_x = torch.empty_like(x_SD) if ctx.needs_input_grad[0] else None
        g_in, g_out = torch.empty_like(w_in), torch.empty_like(w_out)
        # Zero only what no matmul writes: the spare rows and the experts that got no rows.
        if g_x is not None:
            g_x[ctx.segments[-1][2] if ctx.segments else 0:] = 0
        idle = sorted(set(range(w_in.shape[0])) - {e for e, _, _ in ctx.segments})
        if idle:
            g_in[idle] = 0
            g_out[idle] = 0
        for (e, a, b), pre_NF in zip(ctx.segments, pre):
            with torch.enable_grad():
                p_NF = pre_NF.detach().requires_grad_()
                h_NF = ctx.act(p_NF)
            torch.mm(h_NF.detach().T, g_SD[a:b], out=g_out[e])
            (g_pre,) = torch.autograd.grad(h_NF, p_NF, g_SD[a:b] @ w_out[e].T)
            torch.mm(x_SD[a:b].T, g_pre, out=g_in[e])
            if g_x is not None:
                torch.mm(g_pre, w_in[e].T, out=g_x[a:b])
        return g_x, g_in, g_out, None, None


def _gmm(x_SD: Tensor, w_EDF: Tensor, offs_E: Tensor) -> Tensor:
    """Rows offs[e-1]:offs[e] of x times w[e]. x_SD [S, D], w_EDF [E, D, F], offs_E int32 [E] -> [S, F].

    Rows past offs[-1] are spare: finite values of no meaning."""
    if (x_SD.device.type != "cpu" and _grouped_mm is not None and grouped_mm_supported(x_SD.device.type, x_SD.dtype)
            and grouped_mm_aligned(x_SD.dtype, *w_EDF.shape[1:])):
        # NOTE: grouped_mm leaves rows past the last offset unwritten, so the last group is stretched over the
        # spare rows: they get finite values instead of uninitialised memory (which could hold NaN or inf).
        offs_E = torch.cat([offs_E[:-1], offs_E.new_full((1,), x_SD.shape[0])])
        return _ContiguousGrad.apply(_grouped_mm(x_SD, w_EDF, offs=offs_E))
    # NOTE: on the CPU (where it beats grouped_mm and a host sync is free) and for builds, dtypes or sizes without
    # grouped_mm: one matmul per expert segment. `tolist()` is a host-device sync on an accelerator.
    return _SegmentMM.apply(x_SD, w_EDF, [0] + offs_E.tolist())


class Experts(nn.Module):
    """E feed-forward experts as stacked weights.

    w_in [E, D, F], w_out [E, F, D], (gated activations) w_gate [E, D, F], (bias=True) b_in [E, F], b_out [E, D].
    Each expert's weights are drawn independently: truncated normal, std = sqrt(init_scale / fan_in) (§2.4)."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, *, activation: str = "relu", bias: bool = False,
                 expert_dropout: float = 0.0, init_scale: float = 0.1):
        super().__init__()
        self.d_model, self.d_ff, self.n_experts = d_model, d_ff, n_experts
        self.activation = activation
        self.act, self.gated = ACTIVATIONS[activation]
        self.expert_dropout = expert_dropout
        self.init_scale = init_scale
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, d_ff)) if self.gated else None
        self.w_out = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.b_in = nn.Parameter(torch.zeros(n_experts, d_ff)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(n_experts, d_model)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # One call over the whole stack draws every expert independently (no expert is a copy of another).
        truncated_normal_(self.w_in, fan_in=self.d_model, init_scale=self.init_scale)
        truncated_normal_(self.w_out, fan_in=self.d_ff, init_scale=self.init_scale)
        if self.w_gate is not None:
            truncated_normal_(self.w_gate, fan_in=self.d_model, init_scale=self.init_scale)
        if self.b_in is not None:
            nn.init.zeros_(self.b_in)
            nn.init.zeros_(self.b_out)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}"

    # -- one FFN over rows that all belong to expert e (the readable form) ------------------------------------
    def ffn(self, x_ND: Tensor, e: int) -> Tensor:
        """Expert e on its tokens: x_ND [N, D] -> [N, D], in x's dtype. (For all experts at once, see _loop.)"""
        weights = (self.w_in, self.w_gate, self.w_out, self.b_in, self.b_out)
        return self._ffn(x_ND, *(None if w is None else w[e].to(x_ND.dtype) for w in weights))

    def _expert_weights(self, dt: torch.dtype) -> list[tuple]:
        """Per-expert (w_in, w_gate, w_out, b_in, b_out) in dtype dt (None where absent).

        NOTE: one ``unbind`` per tensor rather than ``w_in[e]`` per expert: indexing would make backward build a
        full [E, ...] gradient for every expert and add them up (quadratic in E)."""
        def split(w):
            return w.to(dt).unbind(0) if w is not None else [None] * self.n_experts
        return list(zip(*(split(w) for w in (self.w_in, self.w_gate, self.w_out, self.b_in, self.b_out))))

    def _ffn(self, x_ND: Tensor, w_in, w_gate, w_out, b_in, b_out) -> Tensor:
        """act(x · w_in + b_in) · w_out + b_out for one expert's weights; x_ND [N, D] -> [N, D]."""
        h_NF = x_ND @ w_in
        if b_in is not None:
            h_NF = h_NF + b_in
        h_NF = self.act(x_ND @ w_gate) * h_NF if self.gated else self.act(h_NF)
        h_NF = F.dropout(h_NF, self.expert_dropout, self.training)
        y_ND = h_NF @ w_out
        return y_ND + b_out if b_out is not None else y_ND

    def forward(self, x_TD: Tensor, d: Dispatch, backend: str) -> Tensor:
        """Expert output for every assignment: x_TD [T, D] -> [A, D] in x's dtype.

        Row a holds expert(x) for assignment a = t·K + k; rows of dropped or padded assignments hold
        finite values the caller multiplies by a zero gate."""
        if backend == "loop":
            return self._loop(x_TD, d)
        if backend == "padded":
            return self._padded(x_TD, d)
        if backend == "grouped":
            return self._grouped(x_TD, d)
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def _loop(self, x_TD: Tensor, d: Dispatch) -> Tensor:
        A = d.expert_A.shape[0]
        K = A // x_TD.shape[0]
        rows, outs = [], []
        for e, weights in enumerate(self._expert_weights(x_TD.dtype)):
            idx_N = torch.nonzero(d.keep_A & (d.expert_A == e)).squeeze(1)  # host sync: reference path
            rows.append(idx_N)
            outs.append(self._ffn(x_TD[idx_N // K], *weights))
        return x_TD.new_zeros(A, self.d_model).index_copy(0, torch.cat(rows), torch.cat(outs))

    def _padded(self, x_TD: Tensor, d: Dispatch) -> Tensor:
        E, D, dt = self.n_experts, self.d_model, x_TD.dtype
        A = d.expert_A.shape[0]
        K = A // x_TD.shape[0]
        C = min(d.capacity, x_TD.shape[0])  # an expert can never receive more than T assignments
        # Flat slot e·C + slot for kept assignments; everything else writes to a spare row E·C nobody reads.
        flat_A = torch.where(d.keep_A, d.expert_A * C + d.slot_A, E * C)
        buf_SD = x_TD.new_zeros(E * C + 1, D).index_put((flat_A,), x_TD.repeat_interleave(K, 0) if K > 1 else x_TD)
        x_ECD = buf_SD[: E * C].view(E, C, D)
        h_ECF = torch.bmm(x_ECD, self.w_in.to(dt))
        if self.b_in is not None:
            h_ECF = h_ECF + self.b_in.to(dt)[:, None, :]
        h_ECF = self.act(torch.bmm(x_ECD, self.w_gate.to(dt))) * h_ECF if self.gated else self.act(h_ECF)
        h_ECF = F.dropout(h_ECF, self.expert_dropout, self.training)
        y_ECD = torch.bmm(h_ECF, self.w_out.to(dt))
        if self.b_out is not None:
            y_ECD = y_ECD + self.b_out.to(dt)[:, None, :]
        # Dropped assignments read slot 0 (finite); their gate is zero.
        return y_ECD.reshape(E * C, D)[torch.where(d.keep_A, flat_A, 0)]

    def _grouped(self, x_TD: Tensor, d: Dispatch) -> Tensor:
        E = self.n_experts
        A = d.expert_A.shape[0]
        K = A // x_TD.shape[0]
        # Row of each assignment in the expert-sorted block: kept ones at start[e] + slot, the rest after them.
        kept_end_E = torch.cumsum(d.kept_E, 0)
        kept_start_E = kept_end_E - d.kept_E
        spare_A = kept_end_E[-1] + torch.cumsum((~d.keep_A).long(), 0) - 1
        row_A = torch.where(d.keep_A, kept_start_E[d.expert_A.clamp(max=E - 1)] + d.slot_A, spare_A)
        assignment_S = torch.empty_like(row_A).scatter_(0, row_A, torch.arange(A, device=row_A.device))
        x_AD = x_TD.repeat_interleave(K, 0) if K > 1 else x_TD
        x_SD = _Permute.apply(x_AD, assignment_S, row_A)
        y_SD = self.grouped_ffn(x_SD, kept_end_E.to(torch.int32))
        return _Permute.apply(y_SD, row_A, assignment_S)

    def grouped_ffn(self, x_SD: Tensor, offs_E: Tensor) -> Tensor:
        """Every expert on its contiguous block of rows: rows offs[e-1]:offs[e] go through expert e.

        x_SD [S, D] sorted by expert, offs_E int32 [E] cumulative row ends -> [S, D] in x's dtype. Rows past
        offs[-1] (dropped or padded assignments) are spare: their outputs are finite values of no meaning, which
        the caller multiplies by a zero gate. Used by the grouped backend and by expert parallelism."""
        dt = x_SD.dtype
        if (x_SD.device.type == "cpu" and not self.gated and self.b_in is None
                and not (self.training and self.expert_dropout > 0)):
            # NOTE: a host sync is free on the CPU; this path is the generic one below, fused per expert.
            bounds = [0] + offs_E.tolist()
            return _ExpertByExpertFFN.apply(x_SD, self.w_in.to(dt), self.w_out.to(dt), bounds, self.act)
        if self.b_in is not None:
            rows_S = torch.arange(x_SD.shape[0], device=x_SD.device)
            expert_S = torch.bucketize(rows_S, offs_E.long(), right=True).clamp(max=self.n_experts - 1)
        h_SF = _gmm(x_SD, self.w_in.to(dt), offs_E)
        if self.b_in is not None:
            h_SF = h_SF + self.b_in.to(dt)[expert_S]
        h_SF = self.act(_gmm(x_SD, self.w_gate.to(dt), offs_E)) * h_SF if self.gated else self.act(h_SF)
        h_SF = F.dropout(h_SF, self.expert_dropout, self.training)
        y_SD = _gmm(h_SF, self.w_out.to(dt), offs_E)
        if self.b_out is not None:
            y_SD = y_SD + self.b_out.to(dt)[expert_S]
        return y_SD
