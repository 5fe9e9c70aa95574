"""Where a run executes: `Runtime` (device, rank, world size, the collectives the trainer needs), its setup
(CUDA/MPS checks; the torchrun process group with expert parallelism) and the checks made before anything is
allocated: memory, and a C++ compiler where the run is compiled on the CPU."""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import parallel
from .config import TrainConfig
from .model import parameter_counts


@dataclass
class Runtime:
    """Where this process runs: its device, rank and world size (rank 0 of 1 unless expert-parallel under torchrun)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def mean(self, value: Tensor) -> Tensor:
        """The mean of a tensor over the ranks (itself on one process)."""
        return parallel.all_reduce_mean(value) if self.distributed else value

    def barrier(self) -> None:
        if self.distributed:
            parallel.barrier()

    def agree(self, ok: bool) -> bool:
        """Whether every rank says ok (a collective: every rank must call it)."""
        if not self.distributed:
            return ok
        return bool(parallel.all_reduce_mean(torch.tensor(float(ok), device=self.device)).item() == 1.0)

    def autocast(self):
        """bf16 autocast on CUDA (the Switch router keeps itself in float32); full float32 elsewhere."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()


def setup_runtime(cfg: TrainConfig, dist_timeout: float = 600.0) -> Runtime:
    """Pick the device; with cfg.expert_parallel, join the process group torchrun describes (one process per rank).
    dist_timeout: seconds the process group's init and collectives wait for a missing rank."""
    if isinstance(dist_timeout, bool) or not isinstance(dist_timeout, (int, float)) or \
            not 0 < dist_timeout < math.inf:
        raise ValueError(f"dist_timeout must be a finite number of seconds > 0, got {dist_timeout!r}")
    name = cfg.device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} requested but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but MPS is not available")
    if cfg.expert_parallel:  # one process per rank, started by torchrun
        return Runtime(*parallel.setup_distributed(cfg.device, timeout_s=dist_timeout))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return Runtime(torch.device(name))


def memory_estimate(cfg: TrainConfig, world_size: int = 1) -> dict[str, int]:
    """A lower bound on the bytes one rank needs to train cfg in float32: weights, gradients and AdamW's two
    moments (experts split over the ranks), and the activations autograd keeps for one batch (a rough count:
    it refuses only runs that cannot fit, and says how far off they are)."""
    m, B = cfg.model, cfg.batch_size
    total = parameter_counts(m)["total"]
    dense = parameter_counts(replace(m, switch_every=0))["total"]
    experts = max(0, total - dense)  # the extra experts (and routers) of the Switch layers
    params = total - experts + experts // world_size
    tokens = B * m.seq_len
    per_layer = tokens * (8 * m.d_model + 2 * m.d_ff + 2 * m.n_experts)  # no T² term: fused attention has none
    activations = m.n_layer * per_layer + 3 * tokens * m.vocab_size
    return {"parameters": 4 * 4 * params, "activations": 4 * activations}


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on the device (the GPU's, or the machine's RAM for the CPU); None when unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[1]
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AttributeError):
        pass
    return None


def check_memory(cfg: TrainConfig, runtime: Runtime) -> None:
    """ValueError, before anything is allocated, when the run cannot fit in the device's memory."""
    need, have = memory_estimate(cfg, runtime.world_size), device_memory(runtime.device)
    gib = lambda n: f"{n / 2**30:,.1f} GiB"  # noqa: E731
    if have is not None and sum(need.values()) > have:
        raise ValueError(f"this run needs at least {gib(sum(need.values()))} on {runtime.device} (parameters "
                         f"and optimizer state {gib(need['parameters'])}, activations {gib(need['activations'])}) "
                         f"but it has {gib(have)}; lower --batch-size, --n-experts, --d-model or --seq-len")


def check_compile(cfg: TrainConfig, runtime: Runtime) -> None:
    """ValueError, before the run starts, when cfg.compile asks torch.compile for CPU code and this machine has no
    working C++ compiler for it (inductor builds its CPU kernels with one, e.g. g++; the CXX variable picks it).
    Without this check the run would fail at its first step, its directory already made."""
    if not (cfg.compile and runtime.device.type == "cpu"):
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler  # private: where it is missing, no check
    except ImportError:
        return
    try:
        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - inductor's InvalidCxxCompiler, or whatever its search raises
        raise ValueError(f"compile: torch.compile on the CPU needs a working C++ compiler, and none was found "
                         f"({type(e).__name__}: {e}); install one (e.g. apt install g++) or run without "
                         f"--compile") from e


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_cpu_allocator(mmap_threshold: int = 1 << 30) -> bool:
    """Make glibc's malloc keep and reuse freed memory instead of returning large blocks to the kernel; returns
    whether it could (False off Linux or without glibc). Process-wide; call it once, at the start of a CPU run.

    PyTorch's CPU tensors come from malloc, and glibc serves a block above 32 MiB with a fresh ``mmap`` each time
    and unmaps it when freed, so the kernel maps and zeroes every page again on the next step. A Switch layer with
    many experts allocates such blocks every backward: its experts' weight gradients are one [E, D, F] tensor
    each (64 MiB at E 64, d_model 256, d_ff 1024, float32), where a dense FFN's are a few MiB. With blocks up to
    ``mmap_threshold`` bytes taken from the heap, and the heap never trimmed, a freed block is reused without
    faults. The price: the process keeps its peak memory."""
    if not isinstance(mmap_threshold, int) or isinstance(mmap_threshold, bool) or not 0 < mmap_threshold < 2 ** 31:
        raise ValueError(f"mmap_threshold must be an int in [1, 2**31), got {mmap_threshold!r}")
    import ctypes
    import ctypes.util
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False
