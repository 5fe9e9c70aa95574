"""The sweep runner: every run is a train() run directory; one tidy results.csv and a provenance.json; --resume
skips finished runs and continues interrupted ones; bad arguments are refused by name."""
import csv
import json

import pytest

from switch_core import experiments, sweep


@pytest.fixture
def tiny(monkeypatch, shakespeare_root):
    base = dict(n_layer=1, n_head=2, d_model=16, d_ff=32, seq_len=16, batch_size=4, steps=6, warmup_steps=1,
                eval_interval=3, eval_batches=1, checkpoint_interval=3, n_experts=4, switch_every=1,
                data_root=str(shakespeare_root))
    exp = experiments.Experiment("tiny", "a test", cpu=base, cuda=base, seeds=(1, 2), keep_load=True, load_every=3,
                                 variants={"dense": dict(switch_every=0), "wide": lambda b: dict(d_ff=2 * b["d_ff"])})
    monkeypatch.setitem(experiments.EXPERIMENTS, "tiny", exp)
    return exp


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_sweep_writes_run_directories_results_and_provenance(tiny, tmp_path, single_thread, monkeypatch):
    monkeypatch.setattr(sweep, "TRAIN_ROWS_EVERY", 2)
    out = sweep.run_sweep("tiny", runs_root=tmp_path / "runs", results_root=tmp_path / "data", progress=False)
    assert out == tmp_path / "data" / "tiny" / "cpu"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["dense-s1", "dense-s2", "wide-s1", "wide-s2"]
    rows = _rows(out / "results.csv")
    assert {r["run"] for r in rows} == {"dense-s1", "dense-s2", "wide-s1", "wide-s2"}
    assert len(rows) == 4 * 5  # eval steps 0, 3, 6 and every 2nd training step, of steps 0..6
    assert {"d_ff", "switch_every"} <= set(rows[0]) and "n_layer" not in rows[0]  # only the varied fields
    wide = [r for r in rows if r["run"] == "wide-s1"]
    assert {r["d_ff"] for r in wide} == {"64"} and [int(r["step"]) for r in wide] == [0, 2, 3, 4, 6]
    times = [float(r["train_time_s"]) for r in wide]
    assert times == sorted(times) and times[-1] > 0
    tokens = 4 * 16  # the time counts every step, also the ones left out of results.csv
    every = [tokens / float(m["tokens_per_s"]) for m in _rows(tmp_path / "runs" / "wide-s1" / "metrics.csv")
             if m["tokens_per_s"]]
    assert times[-1] == pytest.approx(sum(every), abs=1e-3)
    assert all(r["max_load"] == "" for r in rows if r["label"] == "dense")
    assert all(float(r["max_load"]) >= 1.0 for r in wide if r["step"] != "0")  # busiest expert >= uniform
    loads = _rows(out / "load.csv")
    assert {int(r["step"]) for r in loads} == {3, 6} and {r["run"] for r in loads} == {"wide-s1", "wide-s2"}
    prov = json.loads((out / "provenance.json").read_text())
    for key in ("git_commit", "torch", "machine", "threads_per_run", "date", "command", "wall_time_s"):
        assert prov[key] not in (None, "")
    assert prov["variants"]["wide"] == {"d_ff": 64} and prov["seeds"] == [1, 2]
    pytest.importorskip("pandas")
    df, prov_read = sweep.read_results("tiny", root=tmp_path / "data")
    assert len(df) == len(rows) and prov_read == prov
    with pytest.raises(FileNotFoundError, match="switch_core.sweep tiny --device cuda"):
        sweep.read_results("tiny", "cuda", root=tmp_path / "data")
    # Same seed, same batches: the two seed-1 runs start from the same validation windows and data.
    assert rows[0]["val_loss"] != "" and _rows(tmp_path / "runs" / "dense-s1" / "metrics.csv")[-1]["step"] == "6"


def test_resume_skips_finished_runs_and_continues_an_interrupted_one(tiny, tmp_path, single_thread):
    kw = dict(runs_root=tmp_path / "runs", results_root=tmp_path / "data", progress=False, seeds=1)
    sweep.run_sweep("tiny", **kw)
    before = _rows(tmp_path / "data" / "tiny" / "cpu" / "results.csv")
    with pytest.raises(FileExistsError, match="--resume"):
        sweep.run_sweep("tiny", **kw)
    (tmp_path / "runs" / "wide-s1" / sweep.DONE).unlink()  # as if killed after its last checkpoint
    out = sweep.run_sweep("tiny", resume=True, **kw)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["runs_timed_this_call"] == 1 and list(prov["run_wall_s"]) == ["wide-s1"]
    after = _rows(out / "results.csv")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "train_time_s")} for r in rows]  # noqa
    assert strip(after) == strip(before)


def test_two_jobs_give_the_results_of_one(tiny, tmp_path, single_thread):
    one = sweep.run_sweep("tiny", runs_root=tmp_path / "r1", results_root=tmp_path / "d1", progress=False, seeds=1)
    two = sweep.run_sweep("tiny", runs_root=tmp_path / "r2", results_root=tmp_path / "d2", progress=False, seeds=1,
                          jobs=2)
    key = lambda r: (r["run"], r["step"], r["train_loss"], r["val_loss"])  # noqa: E731
    assert sorted(map(key, _rows(one / "results.csv"))) == sorted(map(key, _rows(two / "results.csv")))


@pytest.mark.parametrize("kwargs, match", [(dict(name="nope"), "experiment"), (dict(jobs=0), "jobs"),
                                           (dict(threads=1.5), "threads"), (dict(device="tpu"), "device"),
                                           (dict(resume=True, overwrite=True), "contradict")])
def test_bad_arguments_are_refused_by_name(kwargs, match, tmp_path):
    name = kwargs.pop("name", "experts")
    with pytest.raises(ValueError, match=match):
        sweep.run_sweep(name, runs_root=tmp_path, results_root=tmp_path, progress=False, **kwargs)


def test_cli_lists_the_experiments_and_reports_errors_in_one_line(capsys):
    assert sweep.main(["--list"]) == 0
    assert "experts:" in capsys.readouterr().out
    assert sweep.main(["nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: experiment must be one of")


def test_every_experiment_builds_valid_configs_on_both_sizes(tmp_path):
    for exp in experiments.EXPERIMENTS.values():
        for device in ("cpu", "cuda"):
            runs = sweep.plan(exp, device, tmp_path)
            assert len(runs) == len(exp.variants) * len(exp.seeds)
            assert len({r.out_dir for r in runs}) == len(runs)


def test_a_diverging_run_is_recorded_and_the_sweep_goes_on(tiny, tmp_path, single_thread, monkeypatch):
    blowup = experiments.Experiment("blowup", "a test", cpu=tiny.cpu, cuda=tiny.cuda, seeds=(1,),
                                    variants={"ok": {}, "huge-lr": dict(lr=1e30, grad_clip=0.0)})
    monkeypatch.setitem(experiments.EXPERIMENTS, "blowup", blowup)
    out = sweep.run_sweep("blowup", runs_root=tmp_path / "runs", results_root=tmp_path / "data", progress=False)
    rows = _rows(out / "results.csv")
    diverged = {r["run"]: r["diverged"] for r in rows}
    assert diverged == {"ok-s1": "False", "huge-lr-s1": "True"}
    assert max(int(r["step"]) for r in rows if r["run"] == "ok-s1") == 6  # the other run finished
    assert max(int(r["step"]) for r in rows if r["run"] == "huge-lr-s1") < 6
    marker = json.loads((tmp_path / "runs" / "huge-lr-s1" / sweep.DONE).read_text())
    assert "step" in marker["diverged"]


def test_git_commit_is_dirty_for_changed_code_not_for_stray_files(tmp_path):
    """Provenance: '+dirty' when a tracked file changed or the package folder holds an untracked file; run folders
    and notes beside the code leave the commit clean; outside git it is 'unknown'."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text("*.pyc\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert sweep.git_commit(pkg) == sha
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "metrics.csv").write_text("step\n")
    (pkg / "mod.pyc").write_bytes(b"")  # ignored
    assert sweep.git_commit(pkg) == sha
    (pkg / "new.py").write_text("y = 2\n")
    assert sweep.git_commit(pkg) == sha + "+dirty"
    (pkg / "new.py").unlink()
    (tmp_path / ".gitignore").write_text("*.pyc\nruns/\n")  # a tracked file changed
    assert sweep.git_commit(pkg) == sha + "+dirty"
    outside = tmp_path.parent / f"{tmp_path.name}-not-git"
    outside.mkdir()
    in_git = subprocess.run(["git", "rev-parse"], cwd=outside, capture_output=True).returncode == 0
    assert in_git or sweep.git_commit(outside) == "unknown"
