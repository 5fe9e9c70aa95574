"""The experts: E independent feed-forward networks stored as stacked weights, and three ways to run them.

Expert e computes  act(x · w_in[e] + b_in[e]) · w_out[e] + b_out[e]  (gated activations: act(x · w_gate[e]) ⊙ (x · w_in[e] + b_in[e])).

Backends, all computing the same thing (tests hold them to each other):

- ``"loop"``: the readable reference: for each expert, gather its tokens, run its FFN, scatter back.
- ``"padded"``: the capacity-shaped layout [E, C, D] and batched matmuls; static shapes (torch.compile, CUDA graphs).
- ``"grouped"``: tokens sorted by expert into one [A, D] block and one grouped matmul per projection
  (``torch.nn.functional.grouped_mm``); no host-device synchronisation. On the CPU, where a sync is free, the
  kept tokens are gathered in expert order and run expert by expert, with the gate and the scatter back fused
  into the same autograd function (`_SortedExpertsCPU`): one gather, two matmuls per expert, one scatter.

Every backend returns y [T, D] = Σ_k gate_k · expert_k(x), exactly 0 for dropped and padded assignments: their
rows and gates are selected away, never multiplied by a zero gate (0 · NaN would be NaN), and their inputs reach
no expert's matmul (nor its weight gradient).

Shape legend: T tokens, K choices, A = T·K assignments, E experts, C capacity, D = d_model, F = d_ff.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capacity import Dispatch
from .init import truncated_normal_
from .segment_mm import SegmentMM, segment_mm

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
        return x.index_select(0, index)  # NOTE: index_select, not x[index]: ~6x faster for rows on the CPU

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


# name -> backward of the activation: (grad of h, pre-activation, activation) -> grad of the pre-activation
_ACT_BACKWARD = {
    "relu": lambda g, pre, h: torch.ops.aten.threshold_backward(g, h, 0),
    "gelu": lambda g, pre, h: torch.ops.aten.gelu_backward(g, pre),
    "silu": lambda g, pre, h: torch.ops.aten.silu_backward(g, pre),
}


def sorted_ffn_forward(xs_SD: Tensor, w_in: Tensor, w_out: Tensor, sizes: list[int], activation: str):
    """Every expert on its block of sorted rows, expert by expert: rows of expert e are the e-th block of sizes.

    xs_SD [S, D], w_in [E, D, F], w_out [E, F, D] -> (ys [S + 1, D] with a spare zero last row, what backward needs:
    per expert with rows the activation, and for a non-ReLU activation its input first)."""
    act, relu = ACTIVATIONS[activation][0], activation == "relu"
    S, D = xs_SD.shape[0], w_out.shape[2]
    ys_S1D = xs_SD.new_empty(S + 1, D)  # one spare zero row: what dropped tokens gather
    ys_S1D[S] = 0
    saved = []
    for x_ND, w_in_DF, w_out_FD, y_ND in zip(xs_SD.split(sizes), w_in.unbind(0), w_out.unbind(0),
                                             ys_S1D[:S].split(sizes)):
        if x_ND.shape[0]:
            pre_NF = torch.mm(x_ND, w_in_DF)
            h_NF = pre_NF.relu_() if relu else act(pre_NF)
            saved += [h_NF] if relu else [pre_NF, h_NF]
            torch.mm(h_NF, w_out_FD, out=y_ND)
    return ys_S1D, saved


def sorted_ffn_backward(xs_SD: Tensor, g_SD: Tensor, w_in: Tensor, w_out: Tensor, sizes: list[int], activation: str,
                        saved: list[Tensor], need_x: bool):
    """Backward of `sorted_ffn_forward` for the gradient g_SD [S, D] of the experts' outputs.

    Returns (g_xs [S + 1, D] with a zero last row, or None without need_x; g_w_in [E, D, F]; g_w_out [E, F, D]):
    every weight gradient is written straight into its slice of one [E, ...] buffer (0 for an expert without
    rows)."""
    relu, S = activation == "relu", xs_SD.shape[0]
    g_xs_S1D = xs_SD.new_empty(S + 1, xs_SD.shape[1]) if need_x else None
    g_in, g_out = torch.empty_like(w_in), torch.empty_like(w_out)
    act_backward = _ACT_BACKWARD[activation]
    g_xs = g_xs_S1D[:S].split(sizes) if need_x else [None] * len(sizes)
    i = 0
    for x_ND, g_ND, gx_ND, w_in_DF, w_out_FD, g_in_DF, g_out_FD in zip(
            xs_SD.split(sizes), g_SD.split(sizes), g_xs, w_in.unbind(0), w_out.unbind(0), g_in.unbind(0),
            g_out.unbind(0)):
        if not x_ND.shape[0]:  # an expert that got no rows: zero gradient
            g_in_DF.zero_()
            g_out_FD.zero_()
            continue
        pre_NF, h_NF = (saved[i], saved[i]) if relu else (saved[i], saved[i + 1])
        i += 1 if relu else 2
        torch.mm(h_NF.t(), g_ND, out=g_out_FD)
        g_pre_NF = act_backward(torch.mm(g_ND, w_out_FD.t()), pre_NF, h_NF)
        torch.mm(x_ND.t(), g_pre_NF, out=g_in_DF)
        if need_x:
            torch.mm(g_pre_NF, w_in_DF.t(), out=gx_ND)
    if need_x:
        g_xs_S1D[S] = 0
    return g_xs_S1D, g_in, g_out


class _SortedExpertsCPU(torch.autograd.Function):
    """The CPU fast path of the grouped backend, gather -> experts -> gate -> scatter in one autograd node.

    Forward: xs = x[tok_S] (kept assignments in expert order); for each expert e, on its rows a:b,
    ys = act(xs · w_in[e]) · w_out[e] (`sorted_ffn_forward`); then y[t] = Σ gate · ys over t's kept assignments
    (0 if none). Top-1 scatters by gathering: y = [gate · ys; 0].index_select(0, row_T), row_T = each token's row
    or the zero row. Backward (`sorted_ffn_backward`) writes every weight gradient straight into its slice of one
    [E, ...] buffer and keeps what autograd would keep for a dense FFN (the hidden activations; for ReLU its
    output only).
    NOTE: the gate's gradient is <g_y, ys>. Top-1 recovers ys from the stored gate · ys (a top-1 gate is the
    largest of E probabilities, so >= 1/E: the division is safe); top-k keeps ys itself.
    Not twice differentiable. Python work per expert is kept to its matmuls: this runs E times per layer call.

    x_TD [T, D], gate_S [S], w_in [E, D, F], w_out [E, F, D], tok_S long [S] (token of each kept assignment, in
    expert order), sizes: E python ints (rows per expert, in order). Returns y [T, D] in x's dtype."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, gate_S: Tensor, w_in: Tensor, w_out: Tensor, tok_S: Tensor, sizes: list[int],
                activation: str, top_k: int) -> Tensor:
        T, S, D = x_TD.shape[0], tok_S.shape[0], w_out.shape[2]
        xs_SD = x_TD.index_select(0, tok_S)
        ys_S1D, saved = sorted_ffn_forward(xs_SD, w_in, w_out, sizes, activation)
        kept_ys = None if top_k == 1 else ys_S1D[:S].clone()
        ys_S1D[:S].mul_(gate_S.to(ys_S1D.dtype)[:, None])
        if top_k == 1:  # every token has at most one row: gather instead of scatter
            row_T = torch.full((T,), S, dtype=torch.long, device=x_TD.device)
            row_T[tok_S] = torch.arange(S, device=x_TD.device)
            y_TD = ys_S1D.index_select(0, row_T)
            ctx.save_for_backward(xs_SD, gate_S, w_in, w_out, tok_S, row_T, ys_S1D, *saved)
        else:
            y_TD = ys_S1D.new_zeros(T, D).index_add_(0, tok_S, ys_S1D[:S])
            ctx.save_for_backward(xs_SD, gate_S, w_in, w_out, tok_S, None, kept_ys, *saved)
        ctx.sizes, ctx.activation, ctx.n_tokens = sizes, activation, T
        return y_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_TD: Tensor):
        xs_SD, gate_S, w_in, w_out, tok_S, row_T, ys, *saved = ctx.saved_tensors
        dt, S = xs_SD.dtype, xs_SD.shape[0]
        g_SD = g_TD.to(dt).index_select(0, tok_S)  # the gradient reaching each kept assignment's output
        g_gate_S = None
        if ctx.needs_input_grad[1]:
            g_gate_S = torch.linalg.vecdot(g_SD, ys[:S]).to(gate_S.dtype)
            if row_T is not None:  # top-1: ys holds gate · ys
                g_gate_S = g_gate_S / gate_S
        g_SD.mul_(gate_S.to(dt)[:, None])  # now the gradient of each expert's output
        need_x = ctx.needs_input_grad[0]
        g_xs_S1D, g_in, g_out = sorted_ffn_backward(xs_SD, g_SD, w_in, w_out, ctx.sizes, ctx.activation, saved,
                                                    need_x)
        g_x = None
        if need_x:
            if row_T is not None:
                g_x = g_xs_S1D.index_select(0, row_T)
            else:
                g_x = g_xs_S1D.new_zeros(ctx.n_tokens, xs_SD.shape[1]).index_add_(0, tok_S, g_xs_S1D[:S])
        return g_x, g_gate_S, g_in, g_out, None, None, None, None


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
    # grouped_mm: one matmul per expert segment. The offsets come to the host: a sync on an accelerator. Compiled,
    # a custom op does it (torch.compile traces it as one op; see segment_mm.py); eager, an autograd node.
    if torch.compiler.is_compiling():
        return segment_mm(x_SD, w_EDF, offs_E)
    return SegmentMM.apply(x_SD, w_EDF, [0] + offs_E.tolist())


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

    def forward(self, x_TD: Tensor, gates_A: Tensor, d: Dispatch, backend: str) -> Tensor:
        """The experts' contribution to the layer output: y_TD [T, D] = Σ_k gate_k · expert_k(x_t).

        x_TD [T, D] in the compute dtype, gates_A [A] (A = T·K, token-major). Dropped and padded assignments
        contribute exactly 0, whatever the other tokens hold. dtype: promoted from x's and the gates'."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "grouped" and self._cpu_fast_path(x_TD):
            # NOTE: the kept assignments in expert order, and each expert's row count, come to the host here:
            # free on the CPU (this path is CPU-only).
            kept_S = d.order_A[d.keep_A[d.order_A]]
            tok_S = kept_S // d.top_k if d.top_k > 1 else kept_S
            y_TD = _SortedExpertsCPU.apply(x_TD, gates_A.index_select(0, kept_S), self.w_in.to(x_TD.dtype),
                                           self.w_out.to(x_TD.dtype), tok_S, d.kept_E.tolist(), self.activation,
                                           d.top_k)
            return y_TD.to(torch.promote_types(y_TD.dtype, gates_A.dtype))
        return combine(self.expert_rows(x_TD, d, backend), gates_A, d)

    def _cpu_fast_path(self, x_TD: Tensor) -> bool:
        # NOTE: eager only: it reads the rows per expert on the host, which torch.compile cannot trace; compiled,
        # the grouped backend runs `_grouped` (segment_mm, a custom op, reads them inside itself).
        return (x_TD.device.type == "cpu" and not self.gated and self.b_in is None
                and not (self.training and self.expert_dropout > 0) and not torch.compiler.is_compiling())

    def expert_rows(self, x_TD: Tensor, d: Dispatch, backend: str) -> Tensor:
        """expert(x) for every assignment: x_TD [T, D] -> [A, D] in x's dtype; row a = t·K + k.

        Rows of dropped or padded assignments hold values of no meaning (zeros, another token's output, or
        spare rows): `combine` selects them away."""
        if backend == "loop":
            return self._loop(x_TD, d)
        if backend == "padded":
            return self._padded(x_TD, d)
        if backend == "grouped":
            return self._grouped(x_TD, d)
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def _loop(self, x_TD: Tensor, d: Dispatch) -> Tensor:
        A, K = d.expert_A.shape[0], d.top_k
        rows, outs = [], []
        for e, weights in enumerate(self._expert_weights(x_TD.dtype)):
            idx_N = torch.nonzero(d.keep_A & (d.expert_A == e)).squeeze(1)  # host sync: reference path
            rows.append(idx_N)
            outs.append(self._ffn(x_TD[idx_N // K], *weights))
        return x_TD.new_zeros(A, self.d_model).index_copy(0, torch.cat(rows), torch.cat(outs))

    def _padded(self, x_TD: Tensor, d: Dispatch) -> Tensor:
        E, D, dt, K, N = self.n_experts, self.d_model, x_TD.dtype, d.top_k, d.n_groups
        C = min(d.capacity, d.group_tokens)  # an expert never receives more assignments than a group has tokens
        # Buffer [E, N·C, D]: expert e's slots of group g at rows g·C .. g·C + C - 1. Kept assignments write to
        # their flat slot; everything else to a spare row E·N·C nobody reads.
        flat_A = torch.where(d.keep_A, (d.expert_A * N + d.group_A) * C + d.slot_A, E * N * C)
        x_AD = x_TD.repeat_interleave(K, 0) if K > 1 else x_TD
        buf_SD = x_TD.new_zeros(E * N * C + 1, D).index_put((flat_A,), x_AD)
        x_ECD = buf_SD[: E * N * C].view(E, N * C, D)
        h_ECF = torch.bmm(x_ECD, self.w_in.to(dt))
        if self.b_in is not None:
            h_ECF = h_ECF + self.b_in.to(dt)[:, None, :]
        h_ECF = self.act(torch.bmm(x_ECD, self.w_gate.to(dt))) * h_ECF if self.gated else self.act(h_ECF)
        h_ECF = F.dropout(h_ECF, self.expert_dropout, self.training)
        y_ECD = torch.bmm(h_ECF, self.w_out.to(dt))
        if self.b_out is not None:
            y_ECD = y_ECD + self.b_out.to(dt)[:, None, :]
        # Not-kept assignments read row 0 (some other token's output); combine selects them away.
        return y_ECD.reshape(E * N * C, D).index_select(0, torch.where(d.keep_A, flat_A, 0))

    def _grouped(self, x_TD: Tensor, d: Dispatch) -> Tensor:
        E, K = self.n_experts, d.top_k
        A = d.expert_A.shape[0]
        # Row of each assignment in the expert-sorted block: kept ones at start[e] + rank, the rest after them.
        kept_end_E = torch.cumsum(d.kept_E, 0)
        kept_start_E = kept_end_E - d.kept_E
        spare_A = kept_end_E[-1] + torch.cumsum((~d.keep_A).long(), 0) - 1
        row_A = torch.where(d.keep_A, kept_start_E[d.expert_A.clamp(max=E - 1)] + d.rank_A, spare_A)
        assignment_S = torch.empty_like(row_A).scatter_(0, row_A, torch.arange(A, device=row_A.device))
        x_AD = x_TD.repeat_interleave(K, 0) if K > 1 else x_TD
        # NOTE: the rows that are not kept become zeros: grouped_mm runs the last expert over the spare rows (see
        # _gmm), so a NaN there would enter that expert's weight gradient as 0 x NaN.
        x_AD = torch.where(d.keep_A[:, None], x_AD, 0)
        x_SD = _Permute.apply(x_AD, assignment_S, row_A)
        y_SD = self.grouped_ffn(x_SD, kept_end_E.to(torch.int32))
        return _Permute.apply(y_SD, row_A, assignment_S)

    def grouped_ffn(self, x_SD: Tensor, offs_E: Tensor) -> Tensor:
        """Every expert on its contiguous block of rows: rows offs[e-1]:offs[e] go through expert e.

        x_SD [S, D] sorted by expert, offs_E int32 [E] cumulative row ends -> [S, D] in x's dtype. Rows past
        offs[-1] (dropped or padded assignments) are spare: their outputs are values of no meaning, which the
        caller selects away; the caller fills them with zeros (on an accelerator grouped_mm runs the last expert
        over them: they enter its weight gradient). Used by the grouped backend and by expert parallelism."""
        dt = x_SD.dtype
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


def combine(h_AD: Tensor, gates_A: Tensor, d: Dispatch) -> Tensor:
    """y_TD [T, D] = Σ_k gate · row over each token's assignments; not-kept rows give exactly 0.

    h_AD [A, D] expert outputs per assignment, gates_A [A]. NOTE: the rows and the gates are both selected
    (torch.where) before they multiply, so a NaN or inf in a row that is not kept can reach neither the output
    nor, through the gate's gradient, the router; and a dropped token whose own gate is NaN (its input is not
    finite) still gets exactly 0."""
    dt = torch.promote_types(h_AD.dtype, gates_A.dtype)
    keep_A = d.keep_A
    y_AD = torch.where(keep_A[:, None], h_AD, 0).to(dt) * torch.where(keep_A, gates_A, 0).to(dt)[:, None]
    K = d.top_k
    return y_AD.view(-1, K, h_AD.shape[1]).sum(dim=1) if K > 1 else y_AD
