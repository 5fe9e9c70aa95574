"""Sharded checkpoints of an expert-parallel run, committed as a whole (a crash at any moment leaves one
complete, consistent step to resume from).

Every rank writes its own shard ``checkpoint.step{S}.rank{r}.pt`` (its expert shard and the replicated rest, its
RNG, the step); once all are written, rank 0 writes the commit marker ``checkpoint.shards.json``
(``{"step": S, "world_size": W}``); then each rank deletes its other shards. A resume reads the marker's step
only. The per-rank layout before commit markers, ``checkpoint.rank{r}.pt``, is still read. `parallel` re-exports
these functions; with `parallel` and `process_group`, the only modules that touch ``torch.distributed``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from .process_group import check_group, comm_device


def rank_checkpoint_path(path: str | os.PathLike, rank: int) -> Path:
    """checkpoint.pt -> checkpoint.rank{r}.pt (one file per rank: the layout before commit markers, still read)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def shard_path(path: str | os.PathLike, step: int, rank: int) -> Path:
    """checkpoint.pt -> checkpoint.step{S}.rank{r}.pt: rank r's shard of the sharded checkpoint of step S."""
    path = Path(path)
    return path.with_name(f"{path.stem}.step{step}.rank{rank}{path.suffix}")


def marker_path(path: str | os.PathLike) -> Path:
    """checkpoint.pt -> checkpoint.shards.json: the commit marker naming the complete set of shards."""
    path = Path(path)
    return path.with_name(f"{path.stem}.shards.json")


def read_marker(path: str | os.PathLike) -> dict | None:
    """The commit marker's {"step", "world_size"} (None when there is none); ValueError when it is damaged."""
    marker = marker_path(path)
    if not marker.exists():
        return None
    try:
        info = json.loads(marker.read_text())
        if not (isinstance(info, dict) and all(isinstance(info.get(k), int) and not isinstance(info.get(k), bool)
                                               for k in ("step", "world_size"))):
            raise ValueError("no int step and world_size")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{marker} is damaged ({e}); it cannot be resumed from") from None
    return info


def committed_shard_path(path: str | os.PathLike, rank: int) -> Path | None:
    """Rank r's file of the committed sharded checkpoint (the marker's step; else the old per-rank layout)."""
    info = read_marker(path)
    if info is not None:
        return shard_path(path, info["step"], rank)
    legacy = rank_checkpoint_path(path, rank)
    return legacy if legacy.exists() else None


def save_sharded_checkpoint(path: str | os.PathLike, state: dict, group=None) -> Path:
    """Every rank writes its own ``state`` (its model/optimizer state_dicts: expert shard + replicated rest, RNG,
    step...) as one shard of a set committed as a whole. Call on every rank.

    1. each rank writes ``shard_path(path, step, rank)`` atomically (temporary file, then os.replace); barrier;
    2. rank 0 writes the commit marker ``marker_path(path)`` ({"step", "world_size"}) atomically; barrier;
    3. each rank deletes its other shards (the previous set, or a newer one a crash left uncommitted).

    A crash anywhere leaves the previous marker and its complete set of shards, so a resume always finds one
    consistent step. The layout (rank, world size) is stored in each shard."""
    from .checkpoint import fault_point, save_file

    rank, world = check_group(group)
    step = int(state.get("step", 0))
    target = shard_path(path, step, rank)
    save_file({**state, "expert_parallel": {"rank": rank, "world_size": world}}, target,
              fault="before_shard_replace", step=step, rank=rank)
    fault_point("after_shard_write", step, rank)
    dist.barrier(group=group)
    if rank == 0:
        marker = marker_path(path)
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps({"step": step, "world_size": world}) + "\n")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, marker)
    fault_point("after_marker", step, rank)
    dist.barrier(group=group)
    path = Path(path)
    stale = [p for p in path.parent.glob(f"{path.stem}.step*.rank{rank}{path.suffix}") if p != target]
    for p in [*stale, rank_checkpoint_path(path, rank)]:
        p.unlink(missing_ok=True)
    return target


def load_sharded_checkpoint(path: str | os.PathLike, group=None) -> dict:
    """This rank's shard of the committed sharded checkpoint saved by :func:`save_sharded_checkpoint` (tensors on
    CPU): the step the commit marker names; shards of other steps are ignored. Refuses another world size and a
    set whose shards disagree. Call on every rank."""
    from .checkpoint import CheckpointError, check_checkpoint, read_checkpoint_file

    rank, world = check_group(group)
    error = None
    try:
        info = read_marker(path)
        if info is not None and info["world_size"] != world:
            raise ValueError(f"{marker_path(path)} names a checkpoint of {info['world_size']} ranks, not {world} "
                             f"(resume with the world size it was saved with)")
        target = committed_shard_path(path, rank) or rank_checkpoint_path(path, rank)
        state = read_checkpoint_file(target)
        layout = state.get("expert_parallel")
        if layout != {"rank": rank, "world_size": world}:
            raise ValueError(f"{target} was saved with layout {layout}, not rank {rank} of {world} (resume with the "
                             f"world size it was saved with)")
        if info is not None and state.get("step") != info["step"]:
            raise CheckpointError(f"{target} holds step {state.get('step')!r}, not the committed step {info['step']}")
    except (ValueError, OSError) as e:
        error, state = e, None
    dev = comm_device(group)
    ok = torch.tensor([error is None], dtype=torch.long, device=dev)
    step = torch.tensor([-1 if state is None else int(state.get("step", 0))], dtype=torch.long, device=dev)
    steps = [torch.zeros_like(step) for _ in range(world)]
    dist.all_gather(steps, step, group=group)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if error is not None:
        raise error
    if not ok.item():
        raise ValueError("another rank's shard of the checkpoint is unreadable or from another world size "
                         "(see that rank's error)")
    if len({int(s) for s in steps}) != 1:
        raise ValueError(f"the per-rank checkpoints are from different steps {[int(s) for s in steps]}")
    state.pop("expert_parallel")
    if "config" in state:  # a trainer checkpoint: check the rest of its contents
        check_checkpoint(state, target)
    return state
