"""Expert parallelism on 2 CPU ranks (gloo): the sharded layer against the single-process one, and the trainer.

One torchrun launch runs every layer/helper case (tests/dist_worker_parallel.py, ~20 s, most of it importing
torch three times); each test below reads one case's verdict from both ranks. A second launch trains the tiny
preset with --expert-parallel and resumes it (tests/dist_worker_train.py). Every launch is bounded by a timeout
and a failure shows the ranks' output, so nothing here can hang."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path


import pytest
import torch.distributed as dist

from switch_core import SwitchFeedForward
from switch_core.parallel import (LAUNCHER_ENV, _source_to_expert_order, rank_checkpoint_path, setup_distributed,
                                  shard_experts, shard_model_experts)

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker_parallel.py")
LAUNCH_TIMEOUT_S = 120


def _load_worker():
    spec = importlib.util.spec_from_file_location("dist_worker_parallel", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_WORKER = _load_worker()
WORLD, CASE_NAMES = _WORKER.WORLD, _WORKER.CASE_NAMES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args, timeout: float = LAUNCH_TIMEOUT_S) -> str:
    """Run script on WORLD local ranks (gloo, a free port, one thread each); returns the ranks' output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO),
                                                                                os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        out = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        return f"torchrun timed out after {timeout} s\n{out(e.stdout)}{out(e.stderr)}"


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory) -> dict[str, list[str]]:
    """{case: [rank 0 verdict, rank 1 verdict]} from one torchrun launch of the worker."""
    out = tmp_path_factory.mktemp("parallel")
    log = torchrun(WORKER, out)
    ranks = []
    for r in range(WORLD):
        f = out / f"rank{r}.json"
        ranks.append(json.loads(f.read_text()) if f.exists() else {})
    crashed = [r.get("worker-crashed") for r in ranks if "worker-crashed" in r]
    if not all(ranks) or crashed:
        pytest.fail(f"the 2-rank worker failed:\n{crashed[0] if crashed else ''}\n{log[-6000:]}")
    return {name: [r.get(name, "missing") for r in ranks] for name in CASE_NAMES}


@pytest.mark.parametrize("case", CASE_NAMES)
def test_two_ranks(verdicts, case):
    """Sharded == unsharded: outputs, stats, input/expert/router gradients (or the named error / helper check)."""
    assert verdicts[case] == ["ok"] * WORLD, "\n".join(f"rank {r}: {v}" for r, v in enumerate(verdicts[case]))


def test_without_process_group_raises():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_experts(SwitchFeedForward(8, 16, 4))
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_model_experts(SwitchFeedForward(8, 16, 4))


def test_setup_distributed_outside_torchrun_raises(monkeypatch):
    for k in LAUNCHER_ENV:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        setup_distributed("cpu")


def test_regroup_received_rows_by_expert():
    """2 sources x 2 local experts. Counts [[2, 1], [0, 3]] mean received rows arrive as
    (src0,e0) (src0,e0) (src0,e1) (src1,e1) (src1,e1) (src1,e1) = rows 0 1 | 2 | 3 4 5; by expert:
    e0 <- rows 0, 1 (src0) and none from src1; e1 <- row 2 (src0), then rows 3, 4, 5 (src1)."""
    import torch

    counts = torch.tensor([[2, 1], [0, 3]])
    assert _source_to_expert_order(counts, 6).tolist() == [0, 1, 2, 3, 4, 5]
    counts = torch.tensor([[1, 2], [2, 1]])  # rows: s0e0 | s0e1 s0e1 | s1e0 s1e0 | s1e1
    assert _source_to_expert_order(counts, 6).tolist() == [0, 3, 4, 1, 2, 5]


def test_rank_checkpoint_path():
    assert rank_checkpoint_path("runs/x/checkpoint.pt", 3) == Path("runs/x/checkpoint.rank3.pt")


def test_trainer_expert_parallel_tiny_trains_and_resumes(tmp_path, shakespeare_root):
    """2 ranks, tiny preset, --expert-parallel: 20 steps, and 10 steps + resume, give the same files and weights."""
    log = torchrun(WORKER.with_name("dist_worker_train.py"), tmp_path, shakespeare_root, timeout=180)
    results = [tmp_path / f"train_rank{r}.json" for r in range(WORLD)]
    missing = [str(p) for p in results if not p.exists()]
    assert not missing, f"no result from {missing}:\n{log[-6000:]}"
    problems = {r: json.loads(p.read_text()) for r, p in enumerate(results)}
    assert not any(problems.values()), f"{problems}\n{log[-3000:]}"
