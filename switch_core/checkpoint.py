"""The run directory: refuse-or-overwrite checks, CSV logs, RNG states and atomic checkpoints.

A run directory holds metrics.csv, expert_load.csv, config.json, checkpoint.pt and samples.txt (see
`switch_core.train`). A checkpoint is written to a temporary file and renamed into place (os.replace), so a crash
never leaves a half-written checkpoint.pt. On resume, CSV rows logged after the checkpoint's step are dropped so
the resumed run's files equal an uninterrupted run's.
"""
from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import torch

METRIC_COLUMNS = ["step", "train_loss", "val_loss", "balance_loss", "z_loss", "dropped_fraction", "tokens_per_s", "lr"]
LOAD_COLUMNS = ["step", "layer", "expert", "fraction", "kept_fraction"]
RUN_FILES = ("metrics.csv", "expert_load.csv", "config.json", "checkpoint.pt", "samples.txt")


def prepare_out_dir(out_dir, resume: bool, overwrite: bool) -> Path | None:
    """Check the run directory: refuse to clobber an existing run unless resume or overwrite is asked for."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one of them")
    if out_dir is None:
        if resume:
            raise ValueError("resume needs an out_dir holding checkpoint.pt")
        return None
    out = Path(out_dir)
    if resume:
        if not any(out.glob("checkpoint*.pt")):  # checkpoint.pt, or checkpoint.rank{r}.pt (expert parallel)
            raise FileNotFoundError(f"cannot resume: no checkpoint at {out / 'checkpoint.pt'}")
        return out
    if (out / "metrics.csv").exists() or any(out.glob("checkpoint*.pt")):
        if not overwrite:
            raise FileExistsError(f"{out} already holds a run (metrics.csv/checkpoint.pt); pass --resume to "
                                  f"continue it or --overwrite to replace it")
        for path in [*(out / name for name in RUN_FILES), *out.glob("checkpoint.rank*.pt")]:
            path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def read_csv_rows(path: Path, upto_step: int) -> list[dict]:
    """Rows of a metrics/expert_load CSV with step <= upto_step, numbers parsed (empty -> None)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [{k: (None if v == "" else int(v) if k in ("step", "layer", "expert") else float(v))
                 for k, v in r.items()} for r in csv.DictReader(f)]
    return [r for r in rows if r["step"] <= upto_step]


class CsvLog:
    """Appends rows to a CSV (flushed each row, so a crash keeps what was logged). No-op without a path."""

    def __init__(self, path: Path | None, columns: list[str], rows: list[dict]):
        self.columns, self.file, self.writer = columns, None, None
        if path is not None:  # rewrite what we keep (drops rows logged after the checkpoint we resume from)
            self.file = open(path, "w", newline="")
            self.writer = csv.DictWriter(self.file, columns)
            self.writer.writeheader()
            self.writer.writerows([{k: ("" if r[k] is None else r[k]) for k in columns} for r in rows])
            self.file.flush()

    def write(self, rows: list[dict]) -> None:
        if self.writer is not None:
            self.writer.writerows([{k: ("" if r[k] is None else r[k]) for k in self.columns} for r in rows])
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def rng_state() -> dict:
    """The global RNG states a training step can draw from (CPU torch: dropout and jitter; CUDA; Python)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dict(state, config: dict) -> dict:
    """Everything needed to continue bit-exactly: a train.TrainState, this process's RNGs and the config."""
    return dict(model=state.model.state_dict(), optimizer=state.optimizer.state_dict(),
                scheduler=state.scheduler.state_dict(), rng=rng_state(), batch_rng=state.batch_gen.get_state(),
                step=state.step, config=config)


def save_checkpoint(path: Path, state, config: dict) -> None:
    """`checkpoint_dict`, written to a temporary file and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint_dict(state, config), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """The checkpoint dict (tensors on CPU). weights_only: it holds only tensors and plain Python values."""
    return torch.load(path, map_location="cpu", weights_only=True)


class RunLog:
    """The metrics and expert-load rows, in memory and (when out is given) in the CSV files.

    resumed_step: the checkpoint's step when resuming; the CSVs are rewritten with only the rows up to it."""

    def __init__(self, out: Path | None, resumed_step: int | None):
        keep = lambda name: read_csv_rows(out / name, resumed_step) if out and resumed_step is not None else []  # noqa
        self.metrics, self.loads = keep("metrics.csv"), keep("expert_load.csv")
        self.files = [CsvLog(out / "metrics.csv" if out else None, METRIC_COLUMNS, self.metrics),
                      CsvLog(out / "expert_load.csv" if out else None, LOAD_COLUMNS, self.loads)]

    def log(self, row: dict, load: list[dict]) -> None:
        self.metrics.append(row)
        self.loads.extend(load)
        self.files[0].write([row])
        self.files[1].write(load)

    def close(self) -> None:
        for f in self.files:
            f.close()
