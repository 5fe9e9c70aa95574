"""The process group an expert-parallel run lives in: joining it under torchrun, waiting for every rank, leaving
it, and the checks every collective of `parallel` and `sharded_checkpoint` makes first (a group exists; its
backend moves tensors of the layer's device)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

# Device types each backend can move tensors of (all_to_all on gloo is CPU-only).
_BACKEND_DEVICES = {"gloo": ("cpu",), "nccl": ("cuda",)}


# --------------------------------------------------------------------------------------------- checks
def check_group(group) -> tuple[int, int]:
    """(rank, world size) in the group; RuntimeError when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert parallelism needs an initialised process group: call "
                           "torch.distributed.init_process_group (e.g. under torchrun) first")
    return dist.get_rank(group), dist.get_world_size(group)


def check_device(device: torch.device, group) -> None:
    """ValueError when the group's backend cannot run all_to_all on tensors of this device."""
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:  # e.g. "cpu:gloo,cuda:nccl": one backend per device type
        ok = [pair.split(":")[0] for pair in backend.split(",")]
    else:
        ok = _BACKEND_DEVICES.get(backend)
    if ok is not None and device.type not in ok:
        raise ValueError(f"the layer is on {device} but the process group's backend {backend!r} runs all_to_all "
                         f"on {'/'.join(ok)} tensors only: move the model (e.g. CUDA with nccl, CPU with gloo)")


def comm_device(group) -> torch.device:
    """Where small bookkeeping tensors must live for this group's backend (NCCL only moves CUDA tensors)."""
    backend = str(dist.get_backend(group)).lower()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def group_source(group) -> int:
    """Global rank of the group's first rank (the source of broadcasts)."""
    return 0 if group is None else dist.get_global_rank(group, 0)


# ------------------------------------------------------------------------------------------ the process group
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def setup_distributed(device: str | torch.device = "auto", timeout_s: float = 600.0) -> tuple[torch.device, int, int]:
    """Join the process group that torchrun describes in the environment; returns (device, rank, world_size).

    CUDA: the NCCL backend on this process's GPU, cuda:LOCAL_RANK. CPU: gloo. RuntimeError when the process was
    not started by a launcher (e.g. ``torchrun --nproc_per_node=2 ...``)."""
    missing = [k for k in LAUNCHER_ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"expert parallelism needs one process per rank, started by torchrun "
                           f"(e.g. torchrun --nproc_per_node=2 ...); {', '.join(missing)} not set")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" \
        else torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return device, dist.get_rank(), dist.get_world_size()


def barrier(group=None) -> None:
    """Wait until every rank of the group gets here."""
    check_group(group)
    dist.barrier(group=group)


def teardown_distributed() -> None:
    """Leave the process group (at the end of a run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
