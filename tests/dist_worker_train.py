"""One rank of the trainer's 2-rank expert-parallel run; tests/test_parallel.py launches it with torchrun.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker_train.py OUT_DIR DATA_ROOT

The tiny preset trains 20 steps in one go, then again as 10 steps + a resume to 20 (all in this one launch:
torch is imported once). Each rank writes what differed between the two runs to OUT_DIR/train_rank{r}.json.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch

from switch_core.parallel import gather_full_state_dict, marker_path, read_marker, shard_path, teardown_distributed
from switch_core.train import make_config, train


def main(out: Path, data_root: str) -> int:
    problems, rank = [], -1
    try:
        cfg = make_config("tiny", expert_parallel=True, device="cpu", data_root=data_root)
        full = train(cfg, out / "full", progress=False)
        train(cfg, out / "part", stop_at=10, progress=False)
        part = train(cfg, out / "part", resume=True, progress=False)
        rank = torch.distributed.get_rank()
        drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
        if len(full.metrics) != cfg.steps + 1 or any(r["train_loss"] != r["train_loss"] for r in full.metrics[1:]):
            problems.append(f"{len(full.metrics)} metric rows, or a NaN loss")
        # Only rank 0 reads the logs back on resume; the other ranks hold the rows since the checkpoint.
        n, m = (len(full.metrics), len(full.expert_load)) if rank == 0 else (len(part.metrics), len(part.expert_load))
        if drop(full.metrics)[-n:] != drop(part.metrics) or full.expert_load[-m:] != part.expert_load:
            problems.append("the resumed run's metrics differ from the uninterrupted run's")
        if full.samples != part.samples:
            problems.append("samples differ")
        a, b = gather_full_state_dict(full.model), gather_full_state_dict(part.model)
        if any(not torch.equal(a[k], b[k]) for k in a):
            problems.append("final weights differ")
        ckpt = out / "part" / "checkpoint.pt"
        if not marker_path(ckpt).exists() or read_marker(ckpt) != {"step": 20, "world_size": 2} \
                or not shard_path(ckpt, 20, rank).exists():
            problems.append("no committed per-rank checkpoint of step 20")
        if sorted(p.name for p in ckpt.parent.glob("checkpoint*")) != [
                "checkpoint.shards.json", "checkpoint.step20.rank0.pt", "checkpoint.step20.rank1.pt"]:
            problems.append(f"stale checkpoint files: {sorted(p.name for p in ckpt.parent.glob('checkpoint*'))}")
    except Exception:
        problems.append(traceback.format_exc())
        rank = rank if rank >= 0 else int(__import__("os").environ.get("RANK", 0))
    (out / f"train_rank{rank}.json").write_text(json.dumps(problems))
    teardown_distributed()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
