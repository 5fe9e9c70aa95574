"""The trainer: metrics files, exact resume, the NaN guard, run-directory safety, the loss, and the CLI."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import switch_core.cli as cli
import switch_core.train as train_mod
from switch_core.checkpoint import METRIC_COLUMNS
from switch_core.model import flops_per_token
from switch_core.train import (NonFiniteLossError, TrainConfig, WarmupCosine, compute_loss, load_checkpoint, main,
                               make_config, train)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("single_thread")


def small(**overrides) -> TrainConfig:
    """The tiny preset, trimmed further: 8 steps, eval every 4, one eval batch."""
    return make_config("tiny", **{**dict(steps=8, eval_interval=4, eval_batches=1, checkpoint_interval=2,
                                         sample_chars=16), **overrides})


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_run_writes_metrics_load_config_samples(tmp_path, char_data):
    result = train(small(), tmp_path, progress=False, data=char_data)
    rows = read_csv(tmp_path / "metrics.csv")
    assert list(rows[0]) == METRIC_COLUMNS
    assert [r["step"] for r in rows] == [str(s) for s in range(9)]
    assert [r["step"] for r in rows if r["val_loss"]] == ["0", "4", "8"]  # step 0, every eval_interval, last
    assert rows[0]["train_loss"] == "" and all(float(r["train_loss"]) > 0 for r in rows[1:])
    assert all(0 <= float(r["dropped_fraction"]) < 1 for r in rows[1:])
    load = read_csv(tmp_path / "expert_load.csv")
    assert len(load) == 8 * 1 * 4  # steps x Switch layers x experts
    for step in range(1, 9):
        assert sum(float(r["fraction"]) for r in load if r["step"] == str(step)) == pytest.approx(1.0)
    assert TrainConfig(**json.loads((tmp_path / "config.json").read_text())) == result.config
    assert len((tmp_path / "samples.txt").read_text()) == 16 == len(result.samples)
    assert len(result.metrics) == 9 and result.metrics[4]["val_loss"] is not None


def test_dense_run_leaves_router_columns_empty(char_data):
    result = train(small(switch_every=0, steps=2), progress=False, data=char_data)  # in memory, no files
    assert result.out_dir is None and result.expert_load == []
    assert all(r["balance_loss"] is None for r in result.metrics)


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path, char_data):
    cfg = small(jitter_eps=0.1, dropout=0.1)  # exercise the global RNG too (dropout, router jitter)
    full = train(cfg, tmp_path / "full", progress=False, data=char_data)
    train(cfg, tmp_path / "split", stop_at=4, progress=False, data=char_data)
    assert not (tmp_path / "split" / "samples.txt").exists()
    resumed = train(cfg, tmp_path / "split", resume=True, progress=False, data=char_data)
    for name in ("metrics.csv", "expert_load.csv"):
        full_rows, split_rows = read_csv(tmp_path / "full" / name), read_csv(tmp_path / "split" / name)
        assert without_timing(split_rows) == without_timing(full_rows), name
    assert resumed.samples == full.samples
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.fixture
def nan_at_step(monkeypatch):
    """Make the training loss NaN at one step (counted over training calls only, not evaluation)."""
    def install(bad_step: int):
        real, calls = compute_loss, []

        def poisoned(model, x, y, cfg):
            loss, ce, stats = real(model, x, y, cfg)
            if model.training:
                calls.append(1)
                if len(calls) == bad_step:
                    loss = loss * float("nan")
            return loss, ce, stats

        monkeypatch.setattr(train_mod, "compute_loss", poisoned)

    return install


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, char_data, nan_at_step):
    cfg = small(checkpoint_interval=3)
    nan_at_step(5)
    with pytest.raises(NonFiniteLossError, match="nan at step 5") as err:
        train(cfg, tmp_path, progress=False, data=char_data)
    assert "checkpoint.pt (step 3) was kept" in str(err.value)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    assert [r["step"] for r in read_csv(tmp_path / "metrics.csv")] == ["0", "1", "2", "3", "4"]
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_resume_after_a_crash_drops_rows_past_the_checkpoint(tmp_path, char_data, nan_at_step, monkeypatch):
    cfg = small(checkpoint_interval=3)
    full = train(cfg, tmp_path / "full", progress=False, data=char_data)
    nan_at_step(5)
    with pytest.raises(NonFiniteLossError):
        train(cfg, tmp_path / "crash", progress=False, data=char_data)
    monkeypatch.setattr(train_mod, "compute_loss", compute_loss)  # the "bug" is fixed; resume from step 3
    train(cfg, tmp_path / "crash", resume=True, progress=False, data=char_data)
    assert without_timing(read_csv(tmp_path / "crash" / "metrics.csv")) == without_timing(
        read_csv(tmp_path / "full" / "metrics.csv"))
    assert len(full.metrics) == 9


def test_existing_run_is_not_overwritten_without_asking(tmp_path, char_data):
    train(small(steps=1), tmp_path, progress=False, data=char_data)
    before = (tmp_path / "metrics.csv").read_text()
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        train(small(steps=1), tmp_path, progress=False, data=char_data)
    assert (tmp_path / "metrics.csv").read_text() == before
    with pytest.raises(ValueError, match="contradict"):
        train(small(steps=1), tmp_path, resume=True, overwrite=True, progress=False, data=char_data)
    train(small(steps=2), tmp_path, overwrite=True, progress=False, data=char_data)
    assert len(read_csv(tmp_path / "metrics.csv")) == 3


def test_resume_refuses_a_different_config(tmp_path, char_data):
    train(small(steps=2), tmp_path, progress=False, data=char_data)
    with pytest.raises(ValueError, match=r"lr \(checkpoint 0.002, given 0.003\)"):
        train(small(steps=4, lr=3e-3), tmp_path, resume=True, progress=False, data=char_data)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(small(), tmp_path / "empty", resume=True, progress=False, data=char_data)


def test_loss_adds_weighted_aux_losses_summed_over_switch_layers(char_data):
    cfg = make_config("tiny", n_layer=4, switch_every=2, balance_coef=0.5, z_coef=0.25)
    model = train_mod.SwitchLM(cfg.model)
    x = char_data.train[:64].view(2, 32)
    y = char_data.train[1:65].view(2, 32)
    loss, ce, stats = compute_loss(model, x, y, cfg)
    assert len(stats) == 2
    expected = ce + sum(0.5 * s.balance_loss + 0.25 * s.z_loss for s in stats)
    torch.testing.assert_close(loss, expected)


def test_warmup_then_cosine_to_min_lr():
    sched = WarmupCosine(make_config("tiny", steps=10, warmup_steps=2, lr=1.0, min_lr=0.1))
    # Warmup: (s+1)/2 for updates 0, 1. Then cosine over updates 2..9: 1.0 at 2, midpoint 0.55, 0.1 at 9.
    assert [sched(s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, pytest.approx(0.1)]
    assert sched(2 + 3.5) == pytest.approx(0.55)


@pytest.mark.parametrize("overrides, field", [
    (dict(steps=0), "steps"), (dict(lr=-1.0), "lr"), (dict(min_lr=1.0), "min_lr"), (dict(beta2=1.0), "beta2"),
    (dict(device="tpu"), "device"), (dict(n_experts=0), "n_experts"), (dict(n_expert=4), "n_expert"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        make_config("tiny", **overrides)


def test_presets_are_valid_and_equal_flops_dense_vs_switch():
    for name in train_mod.PRESETS:
        cfg = make_config(name)
        dense = make_config(name, switch_every=0)
        router_flops = 2 * cfg.model.d_model * cfg.model.n_experts * cfg.model.n_switch_layers * 3
        assert flops_per_token(cfg.model) == flops_per_token(dense.model) + router_flops


def test_cli_tiny_run(tmp_path, shakespeare_root):
    env = {**os.environ, "SWITCH_CORE_DATA": str(shakespeare_root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "switch_core.train", "--preset", "tiny", "--steps", "5", "--out", "tmp"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "val_loss" in proc.stdout
    assert {"metrics.csv", "expert_load.csv", "config.json", "checkpoint.pt", "samples.txt"} <= set(
        os.listdir(tmp_path / "tmp"))
    assert len(read_csv(tmp_path / "tmp" / "metrics.csv")) == 6
    # A second run into the same directory is refused, with exit status 2 and no traceback.
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--n-experts", "abc"], "invalid"), (["--bogus"], "unrecognized arguments"),
    (["--preset", "huge"], "invalid choice"), (["--n-experts", "0"], "n_experts"),
    (["--d-model", "30", "--n-head", "4"], "d_model"), (["--capacity-factor", "-1"], "capacity_factor"),
    (["--resume", "--out", "nowhere"], "no checkpoint"), (["--resume"], "resume needs"),
])
def test_cli_bad_flags_exit_2_with_a_clear_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "--preset" not in argv:
        argv = ["--preset", "tiny", *argv]
    try:
        code = main(argv)  # config errors: main prints "error: ..." and returns 2
    except SystemExit as e:  # flag errors: argparse prints "...: error: ..." and exits 2
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err


def test_cli_flags_cover_the_config_fields():
    flags = cli.build_parser().format_help()
    for name in ("--n-experts", "--switch-every", "--capacity-factor", "--steps", "--seed", "--device", "--lr",
                 "--dense", "--resume", "--overwrite", "--out", "--preset", "--bias", "--no-bias"):
        assert name in flags
    args = cli.build_parser().parse_args(["--preset", "tiny", "--dense", "--capacity-factor", "none"])
    cfg = cli.config_from_args(args)
    assert cfg.model.switch_every == 0 and cfg.model.capacity_factor is None and cfg.steps == 20


def test_on_batch_sees_every_training_batch_and_runs_with_one_seed_see_the_same(shakespeare_root):
    from switch_core.data import load_char_data
    from switch_core.train import make_config, train

    data = load_char_data(shakespeare_root)
    seen = {}
    for name, extra in (("dense", {"switch_every": 0}), ("switch", {})):
        batches = []
        cfg = make_config("tiny", steps=4, eval_interval=4, sample_chars=8, device="cpu", **extra)
        train(cfg, data=data, progress=False, on_batch=lambda step, x, y: batches.append((step, x.clone())))
        seen[name] = batches
    assert [s for s, _ in seen["dense"]] == [1, 2, 3, 4]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen["dense"], seen["switch"]))
    with pytest.raises(TypeError, match="on_batch"):
        train(make_config("tiny", steps=1), data=data, progress=False, on_batch=3)


def test_compiled_run_trains_like_eager_and_saves_the_same_checkpoint_keys(tmp_path, char_data):
    """compile=True: the forward runs through torch.compile ("auto" layers trace the padded backend on the CPU);
    the losses agree with eager mode to float tolerance and the checkpoint holds the plain model's keys."""
    from torch._dynamo.utils import counters

    eager = train(small(steps=4), tmp_path / "eager", progress=False, data=char_data)
    torch._dynamo.reset()
    counters.clear()
    compiled = train(small(steps=4, compile=True), tmp_path / "compiled", progress=False, data=char_data)
    assert counters["stats"]["unique_graphs"] >= 1  # the forward was traced
    for a, b in zip(eager.metrics, compiled.metrics):
        for key in ("train_loss", "val_loss"):
            if a[key] is not None:
                assert b[key] == pytest.approx(a[key], abs=1e-4), (key, a["step"])
    keys = lambda run: set(load_checkpoint(tmp_path / run / "checkpoint.pt")["model"])  # noqa: E731
    assert keys("compiled") == keys("eager") and not any("_orig_mod" in k for k in keys("compiled"))
    with pytest.raises(ValueError, match="compile"):
        small(compile=True, expert_parallel=True)


def test_a_compiled_cpu_run_without_a_cxx_compiler_is_refused_before_its_directory_is_made(tmp_path,
                                                                                        shakespeare_root):
    # torch.compile builds CPU kernels with a C++ compiler (CXX, else g++); a stock Python image may have none.
    # The trainer says so in one error line, exit 2, before the run directory exists, not at its first step.
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "SWITCH_CORE_DATA": str(shakespeare_root)}
    cmd = [sys.executable, "-m", "switch_core.train", "--preset", "tiny", "--steps", "2", "--no-progress", "--out",
           str(tmp_path / "run")]
    proc = subprocess.run(cmd + ["--compile"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: compile: torch.compile on the CPU needs a "
                                                           "working C++ compiler"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "--compile" in proc.stderr and not (tmp_path / "run").exists()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # eager needs none
    assert proc.returncode == 0 and (tmp_path / "run" / "checkpoint.pt").exists(), proc.stderr
