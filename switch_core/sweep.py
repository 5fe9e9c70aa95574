"""Sweeps: an experiment is a named list of configs × seeds; every run is an ordinary `train()` run directory.

    python -m switch_core.sweep experts                 # the CPU size, 2 runs at a time, 1 thread each
    python -m switch_core.sweep experts --resume        # skip finished runs, continue interrupted ones exactly
    python -m switch_core.sweep experts --device cuda   # the GPU size of the same experiment
    python -m switch_core.sweep --list                  # the experiments and their runs

Run directories go to ``--runs`` (default ``runs/sweeps/<experiment>-<device>/<label>-s<seed>``, checkpoints and
all); the small results go to ``--results`` (default ``book/data/<experiment>/<device>/``)::

  results.csv      tidy, one row per (run, eval step or every TRAIN_ROWS_EVERY-th training step): experiment,
                   run, label, seed, the fields the runs vary (one named like a metric, e.g. lr, is written
                   config_<name>), step, train_loss, val_loss, balance_loss, z_loss, dropped_fraction, max_load,
                   tokens_per_s, train_time_s (cumulative seconds in all training steps, evaluation excluded),
                   lr, diverged (the run stopped on a NaN/inf loss: a result, recorded; the sweep goes on)
  load.csv         (experiments with ``keep_load``) share of tokens per (run, step, layer, expert), every
                   ``load_every`` steps
  provenance.json  git commit, torch, CPU/GPU model, threads, jobs, date, exact command, wall time, configs

The experiments are defined in `switch_core.experiments` (sizes for the CPU and for one GPU).
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from .experiments import EXPERIMENTS, RUN_PREFIX, Experiment
from .train import NonFiniteLossError, TrainConfig, make_config, train

METRICS = ["train_loss", "val_loss", "balance_loss", "z_loss", "dropped_fraction", "tokens_per_s", "lr"]
TRAIN_ROWS_EVERY = 10  # results.csv keeps every 10th training step (and every eval step, and the last step)
DONE = "sweep_done.json"  # written into a run directory once train() has returned for its last step


@dataclass
class Run:
    """One run of a sweep: a label from the experiment, a seed, the full config and its run directory."""

    label: str
    seed: int
    cfg: TrainConfig
    out_dir: Path
    needs: tuple = ()  # labels whose run (same seed) must finish first: a teacher, a run to start from

    @property
    def name(self) -> str:
        return f"{self.label}-s{self.seed}"


def plan(exp: Experiment, device: str, runs_root: Path, seeds: int | None = None,
         steps: int | None = None) -> list[Run]:
    """Every (label, seed) run of ``exp`` at the size for ``device`` ("cpu" or "cuda"), in run order.

    seeds: use only the first ``seeds`` seeds; steps: override the number of steps (for a short trial)."""
    base = exp.size(device)
    chosen = exp.seeds[:seeds] if seeds is not None else exp.seeds
    out = []
    for seed in chosen:
        for label, overrides in exp.overrides(device).items():
            extra = {"steps": steps} if steps is not None else {}
            # run_of(label) values ("run:teacher"): that label's run directory for this seed, run first.
            needs = tuple(dict.fromkeys(v[len(RUN_PREFIX):] for v in overrides.values()
                                        if isinstance(v, str) and v.startswith(RUN_PREFIX)))
            unknown = [n for n in needs if n not in exp.variants or n == label]
            if unknown:
                raise ValueError(f"{exp.name}: {label} needs the run of {unknown[0]!r}, not another label")
            overrides = {k: str(runs_root / f"{v[len(RUN_PREFIX):]}-s{seed}")
                         if isinstance(v, str) and v.startswith(RUN_PREFIX) else v for k, v in overrides.items()}
            cfg = make_config(None, **{**base, **overrides, **extra, "seed": seed, "sample_chars": 0,
                                       "device": device})
            out.append(Run(label, seed, cfg, runs_root / f"{label}-s{seed}", needs))
    return out


def stages(runs: list[Run], finished: list[Run] = ()) -> list[list[Run]]:
    """The runs in stages: each after the runs it needs (same seed; a teacher first), unless already finished.

    ValueError when runs need each other in a cycle."""
    out, placed, left = [], {(r.label, r.seed) for r in finished}, list(runs)
    while left:
        ready = [r for r in left if all((n, r.seed) in placed for n in r.needs)]
        if not ready:
            raise ValueError(f"runs need each other in a cycle: {', '.join(sorted({r.label for r in left}))}")
        out.append(ready)
        placed |= {(r.label, r.seed) for r in ready}
        left = [r for r in left if r not in ready]
    return out


def varied_fields(runs: list[Run]) -> list[str]:
    """Config fields (flat names) whose value differs between the runs' labels (seed excluded)."""
    flats = [_flat(r.cfg) for r in runs]
    keys = [k for k in flats[0] if k not in ("seed", "device")]
    return [k for k in keys if len({json.dumps(f[k]) for f in flats}) > 1]


def _flat(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    return {**d.pop("model"), **d}


def _is_done(run: Run) -> bool:
    marker = run.out_dir / DONE
    return marker.exists() and json.loads(marker.read_text()).get("steps") == run.cfg.steps


def _run_one(job: tuple[Run, bool, int]) -> tuple[str, float]:
    """Train one run in this (worker) process; returns (name, wall seconds). Resumes from a checkpoint if any."""
    run, resume, threads = job
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    has_ckpt = resume and any(run.out_dir.glob("checkpoint*.pt"))
    diverged = None
    try:
        train(run.cfg, run.out_dir, resume=has_ckpt, overwrite=not has_ckpt, progress=False)
    except NonFiniteLossError as e:  # a result, not a failure of the sweep: recorded, and the sweep goes on
        diverged = str(e)
    wall = time.perf_counter() - t0
    tmp = run.out_dir / (DONE + ".tmp")
    tmp.write_text(json.dumps({"steps": run.cfg.steps, "wall_s": wall, "diverged": diverged}) + "\n")
    os.replace(tmp, run.out_dir / DONE)
    return run.name, wall


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def collect(exp: Experiment, runs: list[Run], results_dir: Path) -> Path:
    """Write results.csv (and load.csv) from the runs' metrics.csv / expert_load.csv; returns results.csv."""
    varied = varied_fields(runs) if len(runs) > 1 else []
    results_dir.mkdir(parents=True, exist_ok=True)
    rows, loads = [], []
    for run in runs:
        flat = _flat(run.cfg)
        tokens = run.cfg.batch_size * run.cfg.model.seq_len
        by_step: dict[int, float] = {}
        load_rows = _read_csv(run.out_dir / "expert_load.csv") if (run.out_dir / "expert_load.csv").exists() else []
        E = run.cfg.model.n_experts
        for r in load_rows:
            s = int(r["step"])
            by_step[s] = max(by_step.get(s, 0.0), float(r["fraction"]) * E)
            if exp.keep_load and s % exp.load_every == 0:
                loads.append(dict(run=run.name, label=run.label, seed=run.seed, step=s, layer=int(r["layer"]),
                                  expert=int(r["expert"]), fraction=float(r["fraction"])))
        train_time = 0.0
        marker = run.out_dir / DONE
        diverged = bool(marker.exists() and json.loads(marker.read_text()).get("diverged"))
        metrics = _read_csv(run.out_dir / "metrics.csv")
        last = max((int(m["step"]) for m in metrics), default=0)
        for m in metrics:
            step = int(m["step"])
            if m["tokens_per_s"]:
                train_time += tokens / float(m["tokens_per_s"])
            if not (m["val_loss"] or step % TRAIN_ROWS_EVERY == 0 or step == last):
                continue  # train_time_s still counts the step
            rows.append(dict(experiment=exp.name, run=run.name, label=run.label, seed=run.seed,
                             **{(f"config_{k}" if k in METRICS else k): flat[k] for k in varied}, step=step,
                             **{k: m[k] for k in METRICS if k != "tokens_per_s"},
                             max_load=by_step.get(step, ""), tokens_per_s=m["tokens_per_s"],
                             train_time_s=round(train_time, 4), diverged=diverged))
    path = results_dir / "results.csv"
    _write_csv(path, rows)
    if exp.keep_load:
        _write_csv(results_dir / "load.csv", loads)
    return path


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]) if rows else ["run"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def read_results(name: str, device: str = "cpu", root: str | os.PathLike = "book/data"):
    """A committed sweep: (results.csv as a pandas DataFrame, provenance.json as a dict), from
    ``root/<name>/<device>/``. Needs pandas (the book's extra)."""
    import pandas as pd

    results_dir = Path(root) / name / device
    if not (results_dir / "results.csv").is_file():
        raise FileNotFoundError(f"no committed results at {results_dir}; run python -m switch_core.sweep {name}"
                                + (" --device cuda" if device == "cuda" else ""))
    return (pd.read_csv(results_dir / "results.csv"),
            json.loads((results_dir / "provenance.json").read_text()))


def machine(device: str) -> str:
    """The CPU model (and core count), or the GPU's name."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def git_commit(package: str | os.PathLike | None = None) -> str:
    """HEAD of the checkout holding this package, or 'unknown' outside git. '+dirty' when a tracked file differs
    from HEAD or the package folder holds an untracked (not ignored) file: code the runs would use that no commit
    holds. Untracked files elsewhere (run folders, notes) leave it clean. package: the folder (default: this one)."""
    here = Path(package) if package is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no") or git("ls-files", "--others",
                                                                              "--exclude-standard", "--", ".")
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_sweep(name: str, *, device: str = "cpu", runs_root: str | os.PathLike | None = None,
              results_root: str | os.PathLike = "book/data", resume: bool = False, overwrite: bool = False,
              jobs: int = 1, threads: int = 1, seeds: int | None = None, steps: int | None = None,
              progress: bool = True, command: str | None = None) -> Path:
    """Run (or finish, with resume) every run of experiment ``name``; write results.csv and provenance.json.

    Returns the results directory. jobs: runs at a time (processes), threads: torch threads per run."""
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {', '.join(EXPERIMENTS)}; got {name!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    for arg, v in (("jobs", jobs), ("threads", threads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {v!r}")
    if resume and overwrite:
        raise ValueError("resume and overwrite contradict each other; pass one of them")
    exp = EXPERIMENTS[name]
    runs_dir = Path(runs_root) if runs_root is not None else Path("runs") / "sweeps" / f"{name}-{device}"
    results_dir = Path(results_root) / name / device
    runs = plan(exp, device, runs_dir, seeds=seeds, steps=steps)
    started = [r for r in runs if (r.out_dir / "metrics.csv").exists()]
    if started and not (resume or overwrite):
        raise FileExistsError(f"{runs_dir} already holds runs of this sweep ({started[0].name}, ...); pass --resume "
                              f"to finish it or --overwrite to start again")
    todo = [r for r in runs if not (resume and _is_done(r))]
    t0 = time.perf_counter()
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    commit = git_commit()  # the code the runs start from (the checkout may change while they run)
    walls = {}
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), disable=not progress, desc=f"sweep {name}",
               unit="run")
    # One stage, unless some runs need others (a distillation teacher): those come first.
    for stage in stages(todo, [r for r in runs if r not in todo]):
        jobs_list = [(r, resume, threads) for r in stage]
        if jobs == 1 or len(stage) <= 1:
            for job in jobs_list:
                n, w = _run_one(job)
                walls[n] = w
                bar.update()
        else:
            # NOTE: spawn, not fork: a forked child would inherit this process's torch thread pools and RNG state.
            with mp.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
                for n, w in pool.imap_unordered(_run_one, jobs_list):
                    walls[n] = w
                    bar.update()
    bar.close()
    collect(exp, runs, results_dir)
    provenance = dict(
        experiment=name, title=exp.title, device=device, machine=machine(device), torch=torch.__version__,
        python=platform.python_version(), git_commit=commit, date=when,
        command=command or "python -m switch_core.sweep " + name, jobs=jobs, threads_per_run=threads, train_rows_every=TRAIN_ROWS_EVERY,
        wall_time_s=round(time.perf_counter() - t0, 1), runs_timed_this_call=len(walls),
        run_wall_s={k: round(v, 2) for k, v in sorted(walls.items())},
        seeds=[r.seed for r in runs if r.label == runs[0].label],
        base_config=exp.size(device), variants=exp.overrides(device))
    tmp = results_dir / "provenance.json.tmp"
    tmp.write_text(json.dumps(provenance, indent=2) + "\n")
    os.replace(tmp, results_dir / "provenance.json")
    return results_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m switch_core.sweep", description=__doc__.split("\n")[0],
                                epilog="\n".join(f"  {k}: {e.title}" for k, e in EXPERIMENTS.items()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", nargs="?", help="experiment name (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments and their runs")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="size and device (default cpu)")
    p.add_argument("--runs", default=None, help="where the run directories go (default runs/sweeps/NAME-DEVICE)")
    p.add_argument("--results", default="book/data", help="results root: RESULTS/NAME/DEVICE (default book/data)")
    p.add_argument("--resume", action="store_true", help="skip finished runs, continue interrupted ones")
    p.add_argument("--overwrite", action="store_true", help="start every run again")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 2 on CPU, 1 on GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--seeds", type=int, default=None, help="only the first N seeds")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps (a short trial)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.list:
        for k, e in EXPERIMENTS.items():
            print(f"{k}: {e.title}\n  labels: {', '.join(e.variants)}\n  seeds: {list(e.seeds)}")
        return 0
    if args.experiment is None:
        p.error("the experiment name is required (see --list)")
    try:
        out = run_sweep(args.experiment, device=args.device, runs_root=args.runs, results_root=args.results,
                        resume=args.resume, overwrite=args.overwrite,
                        jobs=args.jobs or (2 if args.device == "cpu" else 1), threads=args.threads,
                        seeds=args.seeds, steps=args.steps, progress=not args.no_progress,
                        command=shlex.join(["python", "-m", "switch_core.sweep", *(argv or sys.argv[1:])]))
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
