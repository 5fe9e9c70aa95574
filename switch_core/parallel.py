"""Expert parallelism: every rank holds E/W of the experts and tokens travel to them by all-to-all (paper §5;
GShard; Mesh TensorFlow). Book chapter "Scaling out".

One Switch layer on W ranks, each with its own T tokens (its own capacity group, as in Mesh TensorFlow):

    route locally -> dispatch (capacity per rank) -> all-to-all: kept rows to their expert's rank
    -> local experts (grouped matmul) -> all-to-all back -> gate-weighted combine locally

Rank r holds experts [r·E/W, (r+1)·E/W). The router and every non-expert parameter are replicated and trained
data-parallel (gradients averaged); expert gradients already hold every rank's tokens, so they are only scaled
by 1/W to match the averaged loss. The single-device layer is not edited: `shard_experts` swaps its `Experts`
for :class:`ExpertParallelExperts`, whose forward returns the same [A, D] rows the local backends return.
Joining and leaving the process group is `process_group`'s, the sharded checkpoint of such a run
`sharded_checkpoint`'s (the functions of both are importable from here too); these three are the only modules that
touch ``torch.distributed``.

Shape legend: T tokens on this rank, K = top_k, A = T·K, E experts in all, L = E/W local experts, W ranks,
S rows this rank sends (kept assignments), R rows it receives, D = d_model.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .capacity import Dispatch
from .experts import Experts
from .layer import SwitchFeedForward
from .process_group import (LAUNCHER_ENV, barrier, check_device, check_group, group_source, setup_distributed,
                            teardown_distributed)
from .sharded_checkpoint import (committed_shard_path, load_sharded_checkpoint, marker_path, rank_checkpoint_path,
                                 read_marker, save_sharded_checkpoint, shard_path)

__all__ = [
    "EXPERT_PARAMS", "LAUNCHER_ENV", "setup_distributed", "barrier", "teardown_distributed", "all_to_all",
    "ExpertParallelExperts", "ExpertParallelSwitch", "shard_experts", "shard_model_experts", "is_expert_parameter",
    "expert_parameters", "dense_parameters", "allreduce_dense_gradients", "scale_expert_gradients",
    "sync_gradients", "clip_grad_norm_", "all_reduce_mean", "gather_full_state_dict",
    # joining the group (process_group.py) and the sharded checkpoint (sharded_checkpoint.py), importable from here
    "rank_checkpoint_path", "shard_path", "marker_path", "read_marker", "committed_shard_path",
    "save_sharded_checkpoint", "load_sharded_checkpoint",
]
EXPERT_PARAMS = ("w_in", "w_gate", "w_out", "b_in", "b_out")


# ------------------------------------------------------------------------------------- all-to-all in autograd
class _AllToAll(torch.autograd.Function):
    """Rows of x split by destination rank (in_splits) -> rows from each source rank (out_splits).
    Backward is the reverse all-to-all of the gradient. x [S, D] -> [R, D]; splits are python ints."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty(sum(ctx.in_splits), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    """Differentiable uneven all-to-all: x [sum(in_splits), ...] -> [sum(out_splits), ...]."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _exchange_counts(kept_E: Tensor, world: int, group) -> Tensor:
    """kept_E [E] (rows this rank sends to every expert) -> long [W, L] rows every source rank sends to each of
    this rank's local experts."""
    recv = torch.empty_like(kept_E)
    dist.all_to_all_single(recv, kept_E.contiguous(), group=group)
    return recv.view(world, -1)


def _source_to_expert_order(counts_WL: Tensor, R: int) -> Tensor:
    """Permutation regrouping received rows from (source rank, local expert) order to (local expert, source rank)
    order: rows_by_expert = received[index].  counts_WL long [W, L], R = its sum -> index long [R].
    No loop over tokens: each target row finds its (expert, source) block and its offset inside it."""
    W, L = counts_WL.shape
    block_start_WL = (torch.cumsum(counts_WL.reshape(-1), 0) - counts_WL.reshape(-1)).view(W, L)
    counts_B = counts_WL.t().reshape(-1)
    block_B = torch.repeat_interleave(torch.arange(W * L, device=counts_WL.device), counts_B, output_size=R)
    within_R = torch.arange(R, device=counts_WL.device) - (torch.cumsum(counts_B, 0) - counts_B)[block_B]
    l_R, w_R = block_B // W, block_B % W
    return block_start_WL[w_R, l_R] + within_R


# ------------------------------------------------------------------------------------------------ the layer
class ExpertParallelExperts(Experts):
    """This rank's slice of an :class:`Experts` stack, run on every rank's tokens.

    w_in [L, D, F], w_out [L, F, D] (and w_gate, b_in, b_out if present) are experts [rank·L, (rank+1)·L) of the
    original stack. ``expert_rows(x_TD, d, backend)`` returns what ``Experts.expert_rows`` returns, [A, D] rows
    of expert(x) for kept assignments (zeros elsewhere), but the experts run on the rank that holds them;
    ``forward`` (inherited) combines them with the gates."""

    def __init__(self, experts: Experts, group=None):
        rank, world = check_group(group)
        E = experts.n_experts
        if E % world:
            raise ValueError(f"n_experts ({E}) must be divisible by the process group's world size ({world})")
        nn.Module.__init__(self)
        L = E // world
        for k, v in vars(experts).items():  # config attributes (d_model, act, gated, expert_dropout, ...)
            if not k.startswith("_") and k != "training":
                setattr(self, k, v)
        self.train(experts.training)
        self.n_experts, self.n_global_experts, self.rank, self.world_size = L, E, rank, world
        self.group = group
        for name in EXPERT_PARAMS:
            p = getattr(experts, name)
            shard = None if p is None else nn.Parameter(p.detach()[rank * L:(rank + 1) * L].clone(),
                                                        requires_grad=p.requires_grad)
            setattr(self, name, shard)

    def extra_repr(self) -> str:
        return (f"local experts {self.rank * self.n_experts}..{(self.rank + 1) * self.n_experts - 1} "
                f"of {self.n_global_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"activation={self.activation!r}, world_size={self.world_size}")

    def _cpu_fast_path(self, x_TD: Tensor) -> bool:
        return False  # the experts are remote: always go through expert_rows

    def expert_rows(self, x_TD: Tensor, d: Dispatch, backend: str = "grouped") -> Tensor:
        """x_TD [T, D] (compute dtype) -> [A, D]. ``backend`` is ignored: the local experts run grouped."""
        E, W, L, D = self.n_global_experts, self.world_size, self.n_experts, self.d_model
        A, K = d.expert_A.shape[0], d.top_k
        # 1. Kept assignments sorted by expert (hence by destination rank): row start[e] + rank, as Experts._grouped.
        kept_start_E = torch.cumsum(d.kept_E, 0) - d.kept_E
        row_A = torch.where(d.keep_A, kept_start_E[d.expert_A.clamp(max=E - 1)] + d.rank_A, A)
        assignment_S1 = torch.full((A + 1,), A, dtype=torch.long, device=x_TD.device)
        assignment_S1.scatter_(0, row_A, torch.arange(A, device=x_TD.device))
        # 2. Every rank learns how many rows it receives for each local expert from each source rank.
        # NOTE: host sync. all_to_all_single needs the split sizes as python ints, so the counts come to the CPU
        # once per layer call (the counts all-to-all and the .tolist() below); the local layer has no such sync.
        counts_WL = _exchange_counts(d.kept_E, W, self.group)
        send = d.kept_E.view(W, L).sum(1).tolist()
        recv = counts_WL.sum(1).tolist()
        assignment_S = assignment_S1[: sum(send)]
        # 3. Out: rows to the rank of their expert; they arrive grouped by (source rank, local expert).
        x_RD = all_to_all(x_TD[assignment_S // K], recv, send, self.group)
        # 4. Regroup by local expert, run the local experts, restore (source, expert) order.
        by_expert_R = _source_to_expert_order(counts_WL, sum(recv))
        back_R = torch.empty_like(by_expert_R).scatter_(0, by_expert_R, torch.arange(sum(recv), device=x_TD.device))
        y_RD = self._local_ffn(x_RD[by_expert_R], counts_WL.sum(0))[back_R]
        # 5. Back: every row returns to the rank (and the position) it came from.
        h_SD = all_to_all(y_RD, send, recv, self.group)
        return h_SD.new_zeros(A, D).index_copy(0, assignment_S, h_SD)

    def _local_ffn(self, x_RD: Tensor, rows_L: Tensor) -> Tensor:
        """The local experts on rows sorted by local expert; rows_L long [L] rows per expert."""
        # grouped_ffn picks the kernel: grouped_mm, or one matmul per expert (CPU, other dtypes, unaligned sizes).
        return self.grouped_ffn(x_RD, torch.cumsum(rows_L, 0).to(torch.int32))


class ExpertParallelSwitch(SwitchFeedForward):
    """A :class:`SwitchFeedForward` whose experts are spread over the ranks of a process group.

    Same call, ``y, stats = layer(x, token_mask=None)``, same results as the unsharded layer on this rank's
    tokens; the router is replicated, ``.experts`` is an :class:`ExpertParallelExperts`. Every rank of the
    group must call it the same number of times (it communicates), in training and in evaluation."""

    def __init__(self, layer: SwitchFeedForward, group=None):
        nn.Module.__init__(self)
        for k, v in vars(layer).items():  # config attributes (n_experts stays the global E)
            if not k.startswith("_") and k != "training":
                setattr(self, k, v)
        self.router = copy.deepcopy(layer.router)
        for p in self.router.parameters():  # replicated: every rank routes with rank 0's router
            dist.broadcast(p.data, src=group_source(group), group=group)
        self.experts = ExpertParallelExperts(layer.experts, group)
        self.train(layer.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", expert_parallel={self.experts.world_size}"


def shard_experts(layer: SwitchFeedForward, group=None) -> ExpertParallelSwitch:
    """The expert-parallel version of ``layer`` on this rank: experts [r·E/W, (r+1)·E/W), router broadcast from
    the group's first rank. ``layer`` itself is left unchanged. Call on every rank of ``group``."""
    if not isinstance(layer, SwitchFeedForward):
        raise TypeError(f"shard_experts needs a SwitchFeedForward, got {type(layer).__name__}")
    if isinstance(layer, ExpertParallelSwitch):
        raise TypeError("this layer is already expert-parallel")
    _, world = check_group(group)
    if layer.n_experts % world:
        raise ValueError(f"n_experts ({layer.n_experts}) must be divisible by the process group's world size "
                         f"({world})")
    check_device(layer.router.weight.device, group)
    return ExpertParallelSwitch(layer, group)


# ------------------------------------------------------------------------------------- what the trainer needs
def shard_model_experts(model: nn.Module, group=None) -> nn.Module:
    """Replace every SwitchFeedForward in ``model`` by its expert-parallel version, in place, and broadcast every
    other parameter and buffer from the group's first rank (they are replicated). Returns ``model``."""
    check_group(group)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, SwitchFeedForward) and not isinstance(m, ExpertParallelSwitch)]
    if not targets:
        raise ValueError("the model has no SwitchFeedForward layer to shard")
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, shard_experts(layer, group))
    with torch.no_grad():
        for _, t in [*dense_parameters(model), *model.named_buffers()]:
            dist.broadcast(t.data, src=group_source(group), group=group)
    return model


def is_expert_parameter(name: str, model: nn.Module) -> bool:
    """True for a parameter (by its name in ``model``) that lives in an expert shard."""
    owner, _, leaf = name.rpartition(".")
    return isinstance(model.get_submodule(owner), ExpertParallelExperts) and leaf in EXPERT_PARAMS


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every sharded expert weight: different on every rank."""
    return [(n, p) for n, p in model.named_parameters() if is_expert_parameter(n, model)]


def dense_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything else (routers included): replicated, trained data-parallel."""
    return [(n, p) for n, p in model.named_parameters() if not is_expert_parameter(n, model)]


def allreduce_dense_gradients(model: nn.Module, group=None) -> None:
    """Average the gradients of the replicated parameters across ranks (data parallelism). One flat all-reduce."""
    _, world = check_group(group)
    grads = [p.grad for _, p in dense_parameters(model) if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= world
    for g, new in zip(grads, torch.split(flat, [g.numel() for g in grads])):
        g.copy_(new.view_as(g))


def scale_expert_gradients(model: nn.Module, group=None) -> None:
    """Divide expert gradients by W: they already sum every rank's tokens (the all-to-all brought them), so this
    makes them the gradient of the loss averaged over ranks, like the dense ones."""
    _, world = check_group(group)
    for _, p in expert_parameters(model):
        if p.grad is not None:
            p.grad.div_(world)


def sync_gradients(model: nn.Module, group=None) -> None:
    """After ``loss.backward()`` on every rank: average dense gradients, scale expert gradients (both above)."""
    allreduce_dense_gradients(model, group)
    scale_expert_gradients(model, group)


def clip_grad_norm_(model: nn.Module, max_norm: float, group=None) -> Tensor:
    """Clip by the global gradient norm of the whole (sharded) model; returns that norm (float32 scalar).

    Dense gradients are equal on every rank after ``sync_gradients``; expert norms are summed over ranks, so every
    rank clips by the same factor (a local ``clip_grad_norm_`` would let the replicas drift apart)."""
    check_group(group)

    def sq(params):
        gs = [p.grad.detach().float().square().sum() for _, p in params if p.grad is not None]
        return torch.stack(gs).sum() if gs else torch.zeros(())

    dense, experts = dense_parameters(model), expert_parameters(model)
    device = next(model.parameters()).device
    expert_sq = sq(experts).to(device)
    dist.all_reduce(expert_sq, group=group)
    norm = (sq(dense).to(device) + expert_sq).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for _, p in [*dense, *experts]:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))
    return norm


def all_reduce_mean(value: Tensor, group=None) -> Tensor:
    """The mean of a tensor over the ranks (a copy). For logged losses and for NaN guards that every rank must
    decide alike (a rank that stops alone leaves the others waiting in the next all-to-all)."""
    _, world = check_group(group)
    out = value.detach().clone()
    dist.all_reduce(out, group=group)
    return out / world


def gather_full_state_dict(model: nn.Module, group=None) -> dict[str, Tensor]:
    """The unsharded model's state_dict, on every rank (CPU copies): expert shards all-gathered along the expert
    dimension, everything else as is. Loads into the single-device model (for sampling, export, evaluation)."""
    _, world = check_group(group)
    experts = {n for n, _ in expert_parameters(model)}
    full = {}
    for name, t in model.state_dict().items():
        if name in experts:
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts)
        full[name] = t.detach().cpu().clone()
    return full
