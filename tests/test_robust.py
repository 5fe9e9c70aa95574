"""What a careless or hostile user found (issue 11): --overwrite and validation, corrupt or swapped checkpoints,
damaged CSVs, the download's timeouts, and the smaller faults. Each test failed before its fix."""
from __future__ import annotations

import csv
import os
import pickle
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import switch_core.cli as cli
import switch_core.train as train_mod
from switch_core import data
REPLACED_DIR = ".replaced-run"
from switch_core.train import NonFiniteLossError, compute_loss, main, make_config, train

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--preset", "tiny", "--device", "cpu", "--no-progress", "--steps", "4", "--eval-interval", "2",
        "--eval-batches", "1", "--checkpoint-interval", "2", "--sample-chars", "8"]


@pytest.fixture
def env_data(monkeypatch, shakespeare_root):
    monkeypatch.setenv("SWITCH_CORE_DATA", str(shakespeare_root))
    return shakespeare_root


def run(argv, capsys) -> tuple[int, str]:
    """main(argv) -> (exit status, stderr); argparse errors count as their exit status."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture
def old_run(tmp_path, env_data, capsys) -> Path:
    out = tmp_path / "run"
    assert run([*TINY, "--out", str(out)], capsys)[0] == 0
    return out


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "weights_only=False" not in err
    return lines[0]


# ----------------------------------------------------------------------------------- item 2: --overwrite
@pytest.mark.parametrize("bad", [["--vocab-size", "64"], ["--device", "mps"], ["--data-root", "EMPTY"],
                                 ["--seq-len", "200000"], ["--n-experts", "100000000", "--batch-size", "100000000"]])
def test_overwrite_that_fails_validation_keeps_the_old_run(old_run, bad, capsys, monkeypatch, tmp_path):
    if "EMPTY" in bad:  # a data root without the file, and no network: the download fails at once
        bad = ["--data-root", str(tmp_path / "nodata")]
        monkeypatch.setattr(data, "_fetch", lambda url, dst: (_ for _ in ()).throw(OSError("no network")))
        monkeypatch.setattr(data, "BACKOFF_S", 0.0)
    before = snapshot(old_run)
    code, err = run([*TINY, "--out", str(old_run), "--overwrite", *bad], capsys)
    assert code in (1, 2) and err.startswith("error: ")
    assert snapshot(old_run) == before and not (old_run / REPLACED_DIR).exists()


def test_fresh_run_that_fails_validation_leaves_no_stub(tmp_path, env_data, capsys):
    out = tmp_path / "fresh"
    code, err = run([*TINY, "--out", str(out), "--seq-len", "200000"], capsys)
    assert code == 2 and "seq_len 200000" in one_error_line(err)
    assert not out.exists()
    assert run([*TINY, "--out", str(out)], capsys)[0] == 0  # the corrected rerun is not blocked


def test_overwrite_replaces_the_old_run_once_the_new_one_checkpoints(old_run, capsys):
    code, _ = run([*TINY, "--out", str(old_run), "--overwrite", "--steps", "2"], capsys)
    assert code == 0 and not (old_run / REPLACED_DIR).exists()
    assert len(list(csv.DictReader(open(old_run / "metrics.csv")))) == 3


def test_overwrite_that_fails_before_its_first_checkpoint_restores_the_old_run(old_run, monkeypatch, capsys):
    before = snapshot(old_run)

    def poisoned(model, x, y, cfg):
        loss, ce, stats = compute_loss(model, x, y, cfg)
        return (loss * float("nan") if model.training else loss), ce, stats

    monkeypatch.setattr(train_mod, "compute_loss", poisoned)
    code, err = run([*TINY, "--out", str(old_run), "--overwrite"], capsys)
    assert code == 1 and "loss is nan" in err
    assert snapshot(old_run) == before and not (old_run / REPLACED_DIR).exists()


def test_an_interrupted_overwrite_is_finished_or_undone_on_the_next_call(old_run, capsys):
    before = snapshot(old_run)
    aside = old_run / REPLACED_DIR  # as a kill right after the move aside leaves it
    aside.mkdir()
    for p in list(old_run.iterdir()):
        if p.is_file():
            os.replace(p, aside / p.name)
    (aside / ".moved").touch()
    (old_run / "metrics.csv").write_text("step\n")  # the new run's stub
    code, _ = run([*TINY, "--out", str(old_run), "--resume", "--steps", "6"], capsys)
    assert code == 0 and not aside.exists()
    after = list(csv.DictReader(open(old_run / "metrics.csv")))
    assert [r["step"] for r in after] == [str(s) for s in range(7)]
    assert after[:5] == list(csv.DictReader(before["metrics.csv"].decode().splitlines()))


def test_a_move_aside_cut_short_is_undone_even_with_a_checkpoint_left_in_place(old_run):
    from switch_core.checkpoint import recover_replaced_run

    before = snapshot(old_run)
    aside = old_run / REPLACED_DIR  # killed after moving two files, checkpoint.pt still in place, no .moved
    aside.mkdir()
    for name in ("metrics.csv", "config.json"):
        os.replace(old_run / name, aside / name)
    recover_replaced_run(old_run)
    assert snapshot(old_run) == before and not aside.exists()


def test_a_deletion_of_the_replaced_run_cut_short_is_finished(old_run):
    from switch_core.checkpoint import recover_replaced_run

    before = snapshot(old_run)
    trash = old_run / (REPLACED_DIR + ".delete")  # killed while deleting the old run after the new one committed
    trash.mkdir()
    (trash / "metrics.csv").write_text("the old run's")
    recover_replaced_run(old_run)
    assert snapshot(old_run) == before and not trash.exists()


# ------------------------------------------------------------------------- item 5: corrupt checkpoints
class Hostile:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _corrupt(kind: str, path: Path, tmp_path: Path) -> None:
    good = torch.load(path, weights_only=True)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(os.urandom(5000))
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"model": Hostile()}))
    elif kind == "torch-pickle":
        torch.save({**good, "model": Hostile()}, path)
    elif kind == "missing-key":
        torch.save({k: v for k, v in good.items() if k != "optimizer"}, path)
    elif kind == "not-a-dict":
        torch.save([1, 2, 3], path)
    elif kind == "bad-weights":
        torch.save({**good, "model": {k: v[:1] for k, v in good["model"].items()}}, path)
    elif kind == "bad-optimizer":
        torch.save({**good, "optimizer": {"state": {}, "param_groups": []}}, path)
    elif kind == "bad-rng":
        torch.save({**good, "batch_rng": torch.zeros(3)}, path)
    elif kind == "bad-config":
        torch.save({**good, "config": {"nonsense": 1}}, path)


@pytest.mark.parametrize("kind", ["truncated", "empty", "random", "pickle", "torch-pickle", "missing-key",
                                  "not-a-dict", "bad-weights", "bad-optimizer", "bad-rng", "bad-config"])
def test_corrupt_or_hostile_checkpoint_is_one_clear_error(old_run, kind, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _corrupt(kind, old_run / "checkpoint.pt", tmp_path)
    code, err = run([*TINY, "--out", str(old_run), "--resume", "--steps", "6"], capsys)
    line = one_error_line(err)
    assert code == 2 and str(old_run / "checkpoint.pt") in line and "checkpoint" in line
    assert not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------------- item 6: a swapped-in checkpoint
def test_checkpoint_from_another_config_is_refused(old_run, tmp_path, capsys):
    other = tmp_path / "other"
    assert run([*TINY, "--out", str(other), "--d-model", "16", "--lr", "0.003"], capsys)[0] == 0
    shutil.copy(other / "checkpoint.pt", old_run / "checkpoint.pt")
    before = {k: v for k, v in snapshot(old_run).items()}
    code, err = run([*TINY, "--out", str(old_run), "--resume"], capsys)
    line = one_error_line(err)
    assert code == 2 and "config.json" in line and "d_model (config.json 32, checkpoint 16)" in line
    assert snapshot(old_run) == before


# -------------------------------------------------------------------------------- item 7: damaged CSVs
@pytest.mark.parametrize("damage", ["emptied", "header", "unparsable", "missing-row", "short-row", "load-missing"])
def test_damaged_csv_is_refused_and_left_alone(old_run, damage, capsys):
    name = "expert_load.csv" if damage == "load-missing" else "metrics.csv"
    path = old_run / name
    lines = path.read_text().splitlines(keepends=True)
    if damage == "emptied":
        lines = []
    elif damage == "header":
        lines[0] = "step,loss\n"
    elif damage == "unparsable":
        lines[2] = lines[2].replace(lines[2].split(",")[1], "abc", 1)
    elif damage in ("missing-row", "load-missing"):
        del lines[2]
    elif damage == "short-row":
        lines[2] = lines[2].split(",")[0] + "\n"
    path.write_text("".join(lines))
    before = snapshot(old_run)
    code, err = run([*TINY, "--out", str(old_run), "--resume", "--steps", "6"], capsys)
    line = one_error_line(err)
    assert code == 2 and str(path) in line and "damaged" in line
    assert snapshot(old_run) == before


def test_csv_rewrite_on_resume_is_atomic(old_run, monkeypatch, capsys):
    before = (old_run / "metrics.csv").read_text()

    def broken(self, rows):
        raise OSError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerows", broken)
    code, err = run([*TINY, "--out", str(old_run), "--resume", "--steps", "6"], capsys)
    assert code == 2 and "disk full" in err
    assert (old_run / "metrics.csv").read_text() == before
    assert not list(old_run.glob("*.tmp"))


# --------------------------------------------------------------------------------- item 4: the download
@pytest.fixture
def silent_proxy(monkeypatch):
    """A loopback listener that accepts connections and never answers, set as the https proxy."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    yield held
    stop.set()
    thread.join()
    for s in held:
        s.close()
    server.close()


@pytest.fixture
def alarm():
    """Fail (not hang) when a call runs past `seconds`."""
    def handler(signum, frame):
        raise TimeoutError("the call hung")

    old = signal.signal(signal.SIGALRM, handler)
    yield lambda seconds: signal.alarm(seconds)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_download_through_a_silent_proxy_times_out_retries_and_cleans_up(tmp_path, silent_proxy, monkeypatch,
                                                                          alarm):
    monkeypatch.setattr(data, "TIMEOUT_S", 0.5)
    monkeypatch.setattr(data, "BACKOFF_S", 0.05)
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / ".input.txt.abc.part").write_text("left by a killed download")
    alarm(30)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="after 3 attempts") as err:
        data.load_tiny_shakespeare(tmp_path)
    assert time.monotonic() - t0 < 10 and len(silent_proxy) == 3  # three connections, each given up
    path = tmp_path / "tinyshakespeare" / "input.txt"
    assert f"save it as {path}" in str(err.value)
    assert list((tmp_path / "tinyshakespeare").iterdir()) == []


# --------------------------------------------------------------------------------------- item 9: smaller
@pytest.mark.parametrize("argv, name", [
    (["--seed", str(2**64)], "seed"), (["--seed", str(2**64 - 1)], "seed"),
    (["--sample-chars", str(10**11)], "sample_chars"), (["--eval-batches", str(10**12)], "eval_batches"),
    (["--dist-timeout", "0"], "dist_timeout"), (["--dist-timeout", "nan"], "dist_timeout"),
])
def test_out_of_range_flags_are_named(argv, name, tmp_path, env_data, capsys):
    code, err = run([*TINY, "--out", str(tmp_path / "x"), *argv], capsys)
    assert code == 2 and name in one_error_line(err)
    assert not (tmp_path / "x").exists()


def test_huge_model_or_batch_says_what_memory_it_needs(tmp_path, env_data, capsys):
    for argv in (["--n-experts", "100000000"], ["--batch-size", "100000000"]):
        code, err = run([*TINY, "--out", str(tmp_path / "x"), *argv], capsys)
        line = one_error_line(err)
        assert code == 2 and "needs at least" in line and "GiB" in line, line
    assert not (tmp_path / "x").exists()


def test_memory_estimate_allows_the_presets():
    for name in train_mod.PRESETS:
        need = train_mod.memory_estimate(make_config(name))
        assert sum(need.values()) < 8 * 2**30, name  # the gpu preset: about 6 GiB


def test_disk_full_checkpoint_is_one_error_and_leaves_no_tmp(old_run, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    before = (old_run / "checkpoint.pt").read_bytes()
    os.symlink("/dev/full", old_run / "checkpoint.pt.tmp")  # every write to it fails with ENOSPC
    code, err = run([*TINY, "--out", str(old_run), "--resume", "--steps", "6"], capsys)
    line = one_error_line(err)
    assert code == 2 and str(old_run / "checkpoint.pt") in line and "previous checkpoint" in line
    assert "disk full" in line and "PytorchStreamWriter" not in line
    assert not os.path.lexists(old_run / "checkpoint.pt.tmp")
    assert (old_run / "checkpoint.pt").read_bytes() == before


def test_other_ranks_prefix_their_error_lines(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    cli._error("bad\nthing")
    assert capsys.readouterr().err == "error: [rank 1] bad thing\n"
    monkeypatch.setenv("RANK", "0")
    cli._error("bad")
    assert capsys.readouterr().err == "error: bad\n"


def test_data_file_linked_to_dev_zero_does_not_hang(tmp_path, alarm):
    (tmp_path / "tinyshakespeare").mkdir()
    os.symlink("/dev/zero", tmp_path / "tinyshakespeare" / "input.txt")
    alarm(20)
    with pytest.raises(RuntimeError, match="checksum"):
        data.load_tiny_shakespeare(tmp_path, download=False)


def test_nan_guard_still_exits_1(tmp_path, env_data, monkeypatch, capsys):
    monkeypatch.setattr(cli, "train", lambda *a, **k: (_ for _ in ()).throw(NonFiniteLossError("nan")))
    assert run([*TINY, "--out", str(tmp_path / "x")], capsys)[0] == 1


def test_out_of_memory_at_run_time_is_one_error_line(tmp_path, env_data, monkeypatch, capsys):
    message = "[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory: you tried to " \
              "allocate 123456789 bytes. Error code 12 (Cannot allocate memory)"
    monkeypatch.setattr(cli, "train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(message)))
    code, err = run([*TINY, "--out", str(tmp_path / "x")], capsys)
    line = one_error_line(err)
    assert code == 2 and "out of memory" in line and "123456789 bytes" in line and "enforce" not in line
