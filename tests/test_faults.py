"""Fault injection: kill training runs for real (SIGKILL) at chosen points, including inside the checkpoint write,
then resume; the resumed run's files must equal an uninterrupted run's and nothing the user had may be lost.

The kill points are hooks in the trainer (switch_core.checkpoint.fault_point): with SWITCH_CORE_FAULT="point:step"
(or "point:step:rank") in its environment a process SIGKILLs itself when it gets there, so a kill lands inside the
checkpoint write by construction, not by luck. Steps are drawn at random from a seeded generator (the seed is
printed). Single process: a chain of kills in one run directory (between logging and checkpointing, after the
temporary checkpoint file is written but before it is renamed, right after the rename, in the CSV rewrite of a
resume) and an --overwrite killed while moving the old run aside, before and after its first checkpoint. Two gloo ranks under torchrun: one rank
killed after writing its shard (the other not yet committed), rank 0 killed after the commit marker, and before a
shard's rename. `pytest -s` prints how many kills were injected and survived. Every launch has a timeout."""
from __future__ import annotations

import csv
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from switch_core.checkpoint import FAULT_ENV, REPLACED_DIR, recover_replaced_run
from switch_core.parallel import marker_path, read_marker, shard_path

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("SWITCH_CORE_FAULT_SEED", "11"))
STEPS = 12
ARGS = ["--preset", "tiny", "--device", "cpu", "--no-progress", "--steps", str(STEPS), "--eval-interval", "4",
        "--eval-batches", "1", "--checkpoint-interval", "2", "--sample-chars", "16"]
TIMEOUT_S = 180
KILLS = {"injected": 0, "survived": 0}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print(f"\nfault injection (seed {SEED}): {KILLS['injected']} kills injected, {KILLS['survived']} survived "
          f"(resumed to the uninterrupted run's exact files, nothing lost)")


def _env(shakespeare_root, fault: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update(SWITCH_CORE_DATA=str(shakespeare_root), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if fault:
        env[FAULT_ENV] = fault
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, root: Path, *extra, fault: str | None = None, ranks: int = 1) -> subprocess.CompletedProcess:
    """One training process (or a torchrun launch of `ranks` gloo ranks) on the tiny run; bounded in time."""
    if ranks == 1:
        cmd = [sys.executable, "-m", "switch_core.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--nnodes=1",
               "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "switch_core.train",
               "--expert-parallel", "--dist-timeout", "60"]
    proc = subprocess.run([*cmd, *ARGS, "--out", str(out), *map(str, extra)], cwd=REPO, env=_env(root, fault),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    if fault:
        killed = proc.returncode == -9 or (ranks > 1 and proc.returncode != 0 and "SIGKILL" in proc.stderr)
        assert killed, f"{fault}: not killed (exit {proc.returncode})\n{proc.stderr[-3000:]}"
        KILLS["injected"] += 1
    else:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in csv.DictReader(f)]


def assert_same_run(run: Path, ref: Path) -> None:
    for name in ("metrics.csv", "expert_load.csv", "samples.txt"):
        a, b = (rows(run / name), rows(ref / name)) if name.endswith(".csv") else \
            ((run / name).read_text(), (ref / name).read_text())
        assert a == b, f"{name} differs from the uninterrupted run's"


def assert_resumable_prefix(run: Path, ref: Path, step: int) -> None:
    """What a kill left: the logs hold at least every row up to the committed checkpoint's step, equal to the
    uninterrupted run's (rows after it are dropped on resume)."""
    want = [r for r in rows(ref / "metrics.csv") if int(r["step"]) <= step]
    assert rows(run / "metrics.csv")[:len(want)] == want


def committed_step(run: Path) -> int:
    import torch

    if (run / "checkpoint.pt").exists():
        return torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    return read_marker(run / "checkpoint.pt")["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shakespeare_root) -> Path:
    out = tmp_path_factory.mktemp("faults") / "reference"
    launch(out, shakespeare_root)
    return out


def test_single_process_kills_then_resume_equal_the_uninterrupted_run(reference, tmp_path, shakespeare_root):
    rng = random.Random(SEED)
    run, kills = tmp_path / "run", 0
    s1 = rng.choice([3, 5])  # between logging a step and its checkpoint
    launch(run, shakespeare_root, fault=f"after_log:{s1}")
    assert committed_step(run) == s1 - 1
    assert_resumable_prefix(run, reference, s1 - 1)
    s2 = rng.choice([6, 8])  # inside the checkpoint write: temporary file written, not yet renamed
    launch(run, shakespeare_root, "--resume", fault=f"before_checkpoint_replace:{s2}")
    assert committed_step(run) == s2 - 2 and (run / "checkpoint.pt.tmp").exists()
    assert_resumable_prefix(run, reference, s2 - 2)
    s3 = s2 + 2  # right after the rename
    launch(run, shakespeare_root, "--resume", fault=f"after_checkpoint:{s3}")
    assert committed_step(run) == s3
    before = (run / "metrics.csv").read_text()
    launch(run, shakespeare_root, "--resume", fault="before_csv_replace")  # the CSV rewrite on resume
    assert (run / "metrics.csv").read_text() == before
    kills = 4
    launch(run, shakespeare_root, "--resume")
    assert_same_run(run, reference)
    assert not list(run.glob("*.tmp"))
    KILLS["survived"] += kills


def test_overwrite_killed_before_or_after_its_first_checkpoint(reference, tmp_path, shakespeare_root):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    # Killed after the old run was moved aside and the new one logged a step, before its first checkpoint:
    # the old run comes back, byte for byte.
    launch(run, shakespeare_root, "--overwrite", "--lr", "0.003", "--checkpoint-interval", "4", fault="after_log:2")
    assert (run / REPLACED_DIR).is_dir() and not (run / "checkpoint.pt").exists()
    recover_replaced_run(run)  # what the next call does first
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # Killed in the middle of moving the old run aside (one file moved): put back as well.
    launch(run, shakespeare_root, "--overwrite", fault="inside_move_aside")
    recover_replaced_run(run)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # Killed right after the new run's first checkpoint, before the old run is deleted: the new run is kept and
    # resumes to its own end.
    launch(run, shakespeare_root, "--overwrite", "--steps", "6", fault="before_delete_replaced")
    assert (run / "checkpoint.pt").exists()
    launch(run, shakespeare_root, "--resume", "--steps", "6")
    assert not (run / REPLACED_DIR).exists()
    assert [r["step"] for r in rows(run / "metrics.csv")] == [str(s) for s in range(7)]
    KILLS["survived"] += 3


@pytest.fixture(scope="module")
def reference_2ranks(tmp_path_factory, shakespeare_root) -> Path:
    out = tmp_path_factory.mktemp("faults2") / "reference"
    launch(out, shakespeare_root, ranks=2)
    return out


def test_two_ranks_killed_inside_the_sharded_checkpoint_write(reference_2ranks, tmp_path, shakespeare_root):
    rng = random.Random(SEED + 1)
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint.pt"
    s1 = rng.choice([4, 6])  # rank 1 wrote its shard of s1; the set is not committed
    launch(run, shakespeare_root, fault=f"after_shard_write:{s1}:1", ranks=2)
    assert read_marker(ckpt) == {"step": s1 - 2, "world_size": 2}
    assert shard_path(ckpt, s1, 1).exists()  # the stray newer shard, ignored on resume
    assert_resumable_prefix(run, reference_2ranks, s1 - 2)
    s2 = s1 + 2  # rank 0 committed the marker; the old shards are not deleted yet
    launch(run, shakespeare_root, "--resume", fault=f"after_marker:{s2}:0", ranks=2)
    assert read_marker(ckpt)["step"] == s2 and shard_path(ckpt, s2 - 2, 0).exists()
    s3 = s2 + 2  # rank 0's temporary shard written, not renamed
    launch(run, shakespeare_root, "--resume", fault=f"before_shard_replace:{s3}:0", ranks=2)
    assert read_marker(ckpt)["step"] == s2
    launch(run, shakespeare_root, "--resume", ranks=2)
    assert_same_run(run, reference_2ranks)
    names = sorted(p.name for p in run.glob("checkpoint*"))
    assert names == [marker_path(ckpt).name, shard_path(ckpt, STEPS, 0).name, shard_path(ckpt, STEPS, 1).name]
    KILLS["survived"] += 3


def spawn_ranks(out: Path, root: Path, *extra, fault: str | None = None, wait_s: float = 60) -> list:
    """Two ranks started by hand (the environment torchrun would set), so the test can end a stopped rank at once
    (torchrun waits 30 s before it SIGKILLs a rank that ignores SIGTERM). Returns [(exit status, stderr)]."""
    port, procs = _free_port(), []
    for rank in range(2):
        env = {**_env(root, fault), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "switch_core.train", "--expert-parallel", *ARGS,
                                       "--out", str(out), *map(str, extra)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        procs[0].wait(timeout=wait_s)
        for p in procs[1:]:  # the others get a few seconds to exit on their own (a stopped rank never does)
            p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.wait(), p.communicate()[1]) for p in procs]


def test_a_stopped_rank_ends_the_run_after_dist_timeout(tmp_path, shakespeare_root):
    """Rank 1 SIGSTOPs itself after step 3; rank 0 gives up after --dist-timeout 5 s with one error line."""
    import time

    t0 = time.monotonic()
    (code0, err0), _ = spawn_ranks(tmp_path / "run", shakespeare_root, "--dist-timeout", "5",
                                   fault="after_log:3:1:stop", wait_s=90)
    assert code0 == 1 and time.monotonic() - t0 < 60, err0[-2000:]
    lines = [line for line in err0.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--dist-timeout 5 s" in lines[0], err0[-2000:]
    assert read_marker(tmp_path / "run" / "checkpoint.pt")["step"] == 2  # the last committed set is kept


def test_a_refusal_on_one_rank_does_not_leave_the_other_waiting(reference_2ranks, tmp_path, shakespeare_root):
    """A damaged metrics.csv is read by rank 0 only: rank 1 must stop too, at once, not after the timeout."""
    run = tmp_path / "run"
    shutil.copytree(reference_2ranks, run)
    (run / "metrics.csv").write_text("")
    (code0, err0), (code1, err1) = spawn_ranks(run, shakespeare_root, "--resume", "--dist-timeout", "120",
                                               wait_s=60)
    assert code0 == code1 == 2, err0[-2000:] + err1[-2000:]
    assert err0.startswith("error: ") and "damaged" in err0
    assert err1.startswith("error: [rank 1] another rank refused the run")
