"""The run directory: refuse-or-overwrite checks, CSV logs, RNG states and atomic checkpoints.

A run directory holds metrics.csv, expert_load.csv, config.json, checkpoint.pt and samples.txt (see
`switch_core.train`). A checkpoint is written to a temporary file and renamed into place (os.replace), so a crash
never leaves a half-written checkpoint.pt. On resume, CSV rows logged after the checkpoint's step are dropped so
the resumed run's files equal an uninterrupted run's; the CSVs are rewritten atomically (temporary file, then
os.replace) and a damaged one is refused. `--overwrite` moves the old run aside into `.replaced-run/` and deletes
it only once the new run has committed its first checkpoint (it is put back when the new run fails before).

`fault_point(name, step)` is a test hook: with SWITCH_CORE_FAULT="name:step[:rank]" in the environment the
process kills itself (SIGKILL) when it reaches that point, so tests can interrupt a checkpoint write for real.
"""
from __future__ import annotations

import csv
import io
import os
import random
import shutil
import signal
import warnings
from pathlib import Path

import torch

METRIC_COLUMNS = ["step", "train_loss", "val_loss", "balance_loss", "z_loss", "dropped_fraction", "tokens_per_s", "lr"]
LOAD_COLUMNS = ["step", "layer", "expert", "fraction", "kept_fraction"]
RUN_FILES = ("metrics.csv", "expert_load.csv", "config.json", "checkpoint.pt", "samples.txt")
REPLACED_DIR = ".replaced-run"  # an old run moved aside by --overwrite until the new one has a checkpoint
FAULT_ENV = "SWITCH_CORE_FAULT"


def fault_point(name: str, step: int | None = None, rank: int = 0) -> None:
    """Test hook: SIGKILL this process here when $SWITCH_CORE_FAULT is "name", "name:step", "name:step:rank" or
    "name:step:rank:stop" (SIGSTOP instead: a hung rank). An empty or "*" step or rank matches any."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":") + ["", "", ""]
    if parts[0] != name or parts[1] not in ("", "*", str(step)) or parts[2] not in ("", "*", str(rank)):
        return
    os.kill(os.getpid(), signal.SIGSTOP if parts[3] == "stop" else signal.SIGKILL)


def has_checkpoint(out: Path) -> bool:
    """A committed checkpoint: checkpoint.pt, the sharded set's marker, or the old per-rank layout."""
    return (out / "checkpoint.pt").exists() or (out / "checkpoint.shards.json").exists() or \
        any(out.glob("checkpoint.rank*.pt"))


def run_files(out: Path) -> list[Path]:
    """The files of a run in `out` (what --overwrite replaces), temporary files included."""
    names = [*RUN_FILES, "checkpoint.shards.json"]
    found = [out / n for n in names if (out / n).exists()]
    found += [p for p in out.glob("checkpoint*") if p.is_file() and p not in found]
    found += [out / (n + ".tmp") for n in names if (out / (n + ".tmp")).is_file()]
    return sorted(set(found))


def recover_replaced_run(out: Path) -> None:
    """Finish an --overwrite that was interrupted, whatever step it was at (every step below is safe to be killed
    in and redone):

    - .replaced-run/ without its .moved mark: the move aside itself was cut short, so out holds only old files:
      move the rest back;
    - marked, and the new run committed a checkpoint: keep the new run (the old one is renamed to
      .replaced-run.delete, then deleted);
    - marked, no checkpoint: delete the new run's partial files, unmark, move the old run back."""
    trash = out / (REPLACED_DIR + ".delete")
    if trash.is_dir():
        shutil.rmtree(trash)
    aside = out / REPLACED_DIR
    if not aside.is_dir():
        return
    moved = aside / ".moved"
    if moved.exists():
        if has_checkpoint(out):
            commit_replacement(out)
            return
        for path in run_files(out):
            path.unlink()
        moved.unlink()
    for path in sorted(aside.iterdir()):
        os.replace(path, out / path.name)
    aside.rmdir()


def check_out_dir(out_dir, resume: bool, overwrite: bool) -> Path | None:
    """Check the run directory without touching it: refuse to clobber an existing run unless resume or overwrite
    is asked for. Returns the directory (None for an in-memory run)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one of them")
    if out_dir is None:
        if resume:
            raise ValueError("resume needs an out_dir holding checkpoint.pt")
        return None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if resume:
        if not has_checkpoint(out):  # checkpoint.pt, or the sharded set (expert parallel)
            raise FileNotFoundError(f"cannot resume: no checkpoint at {out / 'checkpoint.pt'}")
        return out
    if ((out / "metrics.csv").exists() or has_checkpoint(out)) and not overwrite:
        raise FileExistsError(f"{out} already holds a run (metrics.csv/checkpoint.pt); pass --resume to "
                              f"continue it or --overwrite to replace it")
    return out


def start_out_dir(out: Path | None, overwrite: bool) -> bool:
    """Make the run directory, once everything is validated. With overwrite, move an existing run's files aside
    into .replaced-run/ (see `commit_replacement`). Returns whether a run was moved aside."""
    if out is None:
        return False
    out.mkdir(parents=True, exist_ok=True)
    old = run_files(out)
    if not (overwrite and old):
        return False
    aside = out / REPLACED_DIR
    aside.mkdir()
    for path in old:
        os.replace(path, aside / path.name)
        fault_point("inside_move_aside")
    (aside / ".moved").touch()  # the move is complete (see `recover_replaced_run`)
    fault_point("after_move_aside")
    return True


def commit_replacement(out: Path) -> None:
    """The new run's first checkpoint is committed: the old run moved aside by --overwrite can go (renamed first,
    so a crash while deleting cannot leave a half-deleted old run to be put back over the new one)."""
    trash = out / (REPLACED_DIR + ".delete")
    if (out / REPLACED_DIR).is_dir():
        os.replace(out / REPLACED_DIR, trash)
    fault_point("before_delete_replaced")
    shutil.rmtree(trash, ignore_errors=True)


def prepare_out_dir(out_dir, resume: bool, overwrite: bool) -> Path | None:
    """`check_out_dir`, then make the directory (an old run is moved aside, not deleted: `start_out_dir`)."""
    out = check_out_dir(out_dir, resume, overwrite)
    start_out_dir(out, overwrite and not resume)
    return out


class CsvDamagedError(ValueError):
    """A metrics/expert_load CSV that cannot be resumed from (bad header, unparsable or missing rows)."""


def read_csv_rows(path: Path, upto_step: int, columns: list[str] | None = None,
                  rows_per_step: int | None = None, first_step: int = 0) -> list[dict]:
    """Rows of a metrics/expert_load CSV with step <= upto_step, numbers parsed (empty -> None).

    With `columns`, the file is checked: the header must be exactly `columns`, every row must parse, and each
    step first_step..upto_step must have rows_per_step rows (a missing file counts as empty). CsvDamagedError
    names the file and what is wrong."""
    def damaged(what: str):
        return CsvDamagedError(f"{path} is damaged ({what}); it cannot be resumed from. Restore it from a copy, or "
                               f"start the run again with --overwrite")
    if not path.exists():
        rows = []
    else:
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if columns is not None and reader.fieldnames != columns:
                    raise damaged(f"header {reader.fieldnames}, expected {columns}")
                rows = []
                for n, r in enumerate(reader, start=2):
                    try:
                        if None in r or None in r.values():
                            raise ValueError("wrong number of fields")
                        rows.append({k: (None if v == "" else int(v) if k in ("step", "layer", "expert")
                                         else float(v)) for k, v in r.items()})
                        if rows[-1]["step"] is None:
                            raise ValueError("no step")
                    except (ValueError, TypeError) as e:
                        raise damaged(f"line {n} does not parse: {e}") from None
        except UnicodeDecodeError:
            raise damaged("not text") from None
    rows = [r for r in rows if r["step"] <= upto_step]
    if columns is not None and rows_per_step is not None:
        counts: dict[int, int] = {}
        for r in rows:
            counts[r["step"]] = counts.get(r["step"], 0) + 1
        want = {s: rows_per_step for s in range(first_step, upto_step + 1)} if rows_per_step else {}
        if counts != want:
            bad = sorted(s for s in set(want) | set(counts) if counts.get(s, 0) != want.get(s, 0))
            raise damaged(f"{len(bad)} step(s) with missing or extra rows, first step {bad[0]}, up to the "
                          f"checkpoint's step {upto_step}")
    return rows


def replace_text(path: Path, text: str, fault: str | None = None) -> None:
    """Write a text file atomically (temporary file, then os.replace): a crash keeps the old file whole.
    fault: a `fault_point` between the write and the rename."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fault:
        fault_point(fault)
    os.replace(tmp, path)


class CsvLog:
    """Appends rows to a CSV (flushed each row, so a crash keeps what was logged). No-op without a path."""

    def __init__(self, path: Path | None, columns: list[str], rows: list[dict]):
        self.columns, self.file, self.writer = columns, None, None
        if path is not None:  # rewrite what we keep (drops rows logged after the checkpoint we resume from)
            text = io.StringIO()
            writer = csv.DictWriter(text, columns)
            writer.writeheader()
            writer.writerows([{k: ("" if r[k] is None else r[k]) for k in columns} for r in rows])
            replace_text(path, text.getvalue(), fault="before_csv_replace")
            self.file = open(path, "a", newline="")
            self.writer = csv.DictWriter(self.file, columns)

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


def save_file(obj, path: Path, fault: str | None = None, step: int | None = None, rank: int = 0) -> None:
    """torch.save `obj` to a temporary file beside `path`, then rename it into place. A failed write (disk full,
    permissions) raises OSError naming the file, removes the temporary file and leaves `path` as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        reason = (e.strerror or str(e)) if isinstance(e, OSError) else "the write failed (is the disk full?)"
        try:
            if shutil.disk_usage(path.parent).free < (1 << 20):
                reason = "no space left on the device"
        except OSError:
            pass
        raise OSError(f"could not write the checkpoint {path}: {reason}. The previous checkpoint (if any) was "
                      f"kept; free some space or fix the directory, then --resume") from None
    if fault:
        fault_point(fault, step, rank)
    os.replace(tmp, path)


def save_checkpoint(path: Path, state, config: dict) -> None:
    """`checkpoint_dict`, written to a temporary file and renamed into place (`save_file`)."""
    save_file(checkpoint_dict(state, config), path, fault="before_checkpoint_replace", step=state.step)
    fault_point("after_checkpoint", state.step)


class CheckpointError(ValueError):
    """A checkpoint file that is corrupt, truncated, hostile or not a checkpoint of this trainer."""


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "batch_rng", "step", "config")


def read_checkpoint_file(path: Path, mmap: bool = False) -> dict:
    """torch.load with weights_only=True (tensors and plain Python values only); CheckpointError naming the file
    and what is wrong for anything it cannot read. Never suggests weights_only=False: a file that needs it is
    refused. mmap: the tensors are mapped from the file and read only when used."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the file is refused or read, no need to warn
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        if isinstance(e, __import__("pickle").UnpicklingError) or "weights_only" in str(e):
            what = "it holds objects other than tensors and plain values, which are refused"
        elif isinstance(e, (EOFError,)) or "central directory" in str(e) or "zip archive" in str(e):
            what = "the file is truncated or not a torch checkpoint"
        else:
            what = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'unreadable'}"
        raise CheckpointError(f"{path} is not a usable checkpoint ({what})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a usable checkpoint (it holds a {type(obj).__name__}, not a dict)")
    return obj


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """The checkpoint dict (tensors on CPU), checked to hold what `checkpoint_dict` saves. weights_only: it holds
    only tensors and plain Python values. CheckpointError (a ValueError) names the file and what is wrong.
    mmap: tensors are mapped from the file (see `read_checkpoint_file`)."""
    return check_checkpoint(read_checkpoint_file(path, mmap), path)


def check_checkpoint(obj: dict, path) -> dict:
    """CheckpointError unless `obj` has the keys and types `checkpoint_dict` writes."""
    missing = [k for k in CHECKPOINT_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is not a usable checkpoint (missing {', '.join(missing)})")
    types = dict(model=dict, optimizer=dict, scheduler=dict, rng=dict, batch_rng=torch.Tensor, step=int,
                 config=dict)
    wrong = [k for k, t in types.items() if not isinstance(obj[k], t) or (t is int and isinstance(obj[k], bool))]
    if wrong or obj["step"] < 0:
        raise CheckpointError(f"{path} is not a usable checkpoint (bad {', '.join(wrong) or 'step'})")
    return obj


class RunLog:
    """The metrics and expert-load rows, in memory and (when out is given) in the CSV files.

    resumed_step: the checkpoint's step when resuming; the CSVs are rewritten (atomically) with only the rows
    up to it. rows: the (metrics, loads) already read and checked by `read_run_rows`, else they are read here."""

    def __init__(self, out: Path | None, resumed_step: int | None, rows: tuple[list, list] | None = None):
        if rows is None:
            resumed = out is not None and resumed_step is not None
            rows = tuple(read_csv_rows(out / name, resumed_step) if resumed else []
                         for name in ("metrics.csv", "expert_load.csv"))
        self.metrics, self.loads = rows
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


def read_run_rows(out: Path, resumed_step: int, load_rows_per_step: int) -> tuple[list, list]:
    """The metrics and expert_load rows up to the checkpoint's step, checked: a damaged CSV (bad header,
    unparsable rows, rows missing before the checkpoint's step) raises CsvDamagedError naming it."""
    metrics = read_csv_rows(out / "metrics.csv", resumed_step, METRIC_COLUMNS, 1, 0)
    loads = read_csv_rows(out / "expert_load.csv", resumed_step, LOAD_COLUMNS, load_rows_per_step, 1) \
        if (out / "expert_load.csv").exists() or load_rows_per_step else []
    return metrics, loads
