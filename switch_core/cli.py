"""The trainer's command line, `python -m switch_core.train`: one flag per config field, presets, resume from a
run's own config; bad input ends in one `error:` line and exit status 2."""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import MISSING, fields, replace
from pathlib import Path

import torch

from . import distill, parallel
from .checkpoint import load_checkpoint, recover_replaced_run
from .config import PRESETS, TrainConfig, _field_names, apply_overrides, make_config, saved_config
from .model import ModelConfig, parameter_counts
from .train import __doc__ as TRAIN_DOC
from .train import train


def _parse_value(annotation: str):
    """argparse type for a field annotation such as 'int', 'float | None'."""
    base = {"int": int, "float": float, "str": str}[annotation.replace(" | None", "")]
    if "None" not in annotation:
        return base

    def parse(text: str):
        return None if text.lower() == "none" else base(text)

    parse.__name__ = annotation  # argparse names the type in its error message
    return parse


def build_parser() -> argparse.ArgumentParser:
    """Run options, then one flag per ModelConfig / TrainConfig field (--n-experts, --capacity-factor, ...)."""
    presets = "\n".join(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in o.items()) for name, o in PRESETS.items())
    p = argparse.ArgumentParser(prog="python -m switch_core.train", description=TRAIN_DOC.split("\n")[0],
                                epilog=f"presets (overrides of the field defaults above):\n{presets}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="size preset, a dict of config overrides (default: cpu; on --resume: the checkpoint's)")
    p.add_argument("--out", default=None, help="run directory (metrics.csv, checkpoint.pt, ...); none = no files")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--dense", action="store_true", help="dense baseline: no Switch layers (--switch-every 0)")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step, as if preempted (resume later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="expert parallel: how long the ranks wait for each other (init and collectives; default 600)")
    for cls, title in ((ModelConfig, "model"), (TrainConfig, "training")):
        group = p.add_argument_group(f"{title} config ({cls.__name__} fields)")
        for f in fields(cls):
            if f.name == "model":
                continue
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not MISSING else f.default_factory()
            if f.type == "bool":
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=f"default {default}")
            else:
                group.add_argument(flag, dest=f.name, type=_parse_value(f.type), default=argparse.SUPPRESS,
                                   metavar=f.name.upper(), help=f"default {default}")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset, then explicit flags; on --resume the checkpoint's config, then explicit flags."""
    run_keys = {"preset", "out", "resume", "overwrite", "dense", "stop_at", "no_progress", "dist_timeout"}
    overrides = {k: v for k, v in vars(args).items() if k not in run_keys}
    if args.dense:
        overrides["switch_every"] = 0
    saved_at = None
    if args.resume and args.out is not None:  # rank 0's file when expert-parallel (the same config on every rank)
        if _launch_rank() == 0:  # finish an interrupted --overwrite before reading its checkpoint
            recover_replaced_run(Path(args.out))
        single = Path(args.out) / "checkpoint.pt"
        saved_at = next((p for p in (single, parallel.committed_shard_path(single, 0)) if p and p.exists()), None)
    if saved_at is not None:
        # Only the config is needed here: the weights are mapped from the file, not read.
        saved = saved_config(load_checkpoint(saved_at, mmap=True), saved_at)
        return apply_overrides(saved, {**(PRESETS[args.preset] if args.preset else {}), **overrides})
    source = overrides.get("distill_from") or overrides.get("init_from")
    if source is not None:  # the model defaults to the teacher's dense twin / the fine-tuned run's model
        model = distill.run_model_config(source)
        model = distill.student_config(model) if overrides.get("distill_from") else model
        cfg = make_config(args.preset or "cpu", **{k: v for k, v in overrides.items() if k in _TRAIN_KEYS})
        return apply_overrides(replace(cfg, model=model), overrides)
    return make_config(args.preset or "cpu", **overrides)


_TRAIN_KEYS = set(_field_names(TrainConfig))


def _launch_rank() -> int:
    """This process's rank: the process group's, else torchrun's RANK, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _error(message: object) -> None:
    """One `error:` line on stderr, written at once (ranks other than 0 say which they are)."""
    rank = _launch_rank()
    text = " ".join(str(message).split("\n"))
    sys.stderr.write(f"error: {text}\n" if rank == 0 else f"error: [rank {rank}] {text}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad flags: argparse prints "error: ..." and exits 2
    try:
        cfg = config_from_args(args)
        result = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, stop_at=args.stop_at,
                       progress=not args.no_progress, dist_timeout=args.dist_timeout)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    except (ValueError, TypeError, OSError, OverflowError, MemoryError) as e:  # config, files, checkpoints, disk
        _error(e if not isinstance(e, MemoryError) else f"out of memory ({e}); lower --batch-size or --n-experts")
        return 2
    except RuntimeError as e:  # NaN/inf guard, data checksum or download, a rank lost; or out of memory
        if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):
            need = re.search(r"allocate (\d+ bytes|[\d.]+ [GMK]iB)", str(e))
            _error("out of memory" + (f" (an allocation of {need.group(1)} failed)" if need else "") +
                   "; lower --batch-size, --n-experts, --d-model or --seq-len")
            return 2
        timed_out = torch.distributed.is_available() and torch.distributed.is_initialized() and \
            "timed out" in str(e).lower()
        _error(f"another rank did not answer within --dist-timeout {args.dist_timeout:g} s ({e})" if timed_out
               else e)
        return 1
    finally:
        parallel.teardown_distributed()
    if rank != 0:  # rank 0 reports for the whole run
        return 0
    counts = parameter_counts(result.config.model)  # the whole model, also when experts are sharded
    last = result.metrics[-1] if result.metrics else {}
    val = [m["val_loss"] for m in result.metrics if m["val_loss"] is not None]
    tps = [m["tokens_per_s"] for m in result.metrics if m["tokens_per_s"] is not None]
    print(f"step {last.get('step')}: val_loss {val[-1] if val else float('nan'):.4f}, "
          f"{sum(tps) / max(1, len(tps)):,.0f} tokens/s, params {counts['total']:,} total / "
          f"{counts['active']:,} active" + (f", run in {args.out}" if args.out else ""))
    return 0
