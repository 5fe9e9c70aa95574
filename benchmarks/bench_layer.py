"""Forward + backward time of SwitchFeedForward (each backend) as a ratio to a dense FFN of the same d_ff.

Peers a user would otherwise pick are timed in the same process when installed: Hugging Face transformers'
``SwitchTransformersSparseMLP``. Runs are interleaved (one of each per round) and the median is reported.

    python benchmarks/bench_layer.py                  # CPU, fp32, T=8192, d_model=256, d_ff=1024, CF 1.25
    python benchmarks/bench_layer.py --device cuda    # bf16, d_model=1024, d_ff=4096, T=16384
    python benchmarks/bench_layer.py --json out.json  # also write the numbers
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from switch_core import FeedForward, SwitchFeedForward
from switch_core.checkpoint import replace_text
from switch_core.runtime import tune_cpu_allocator
from switch_core.sweep import git_commit, machine

PRESETS = {
    "cpu": dict(tokens=8192, d_model=256, d_ff=1024, dtype="float32", rounds=7),
    "cuda": dict(tokens=16384, d_model=1024, d_ff=4096, dtype="bfloat16", rounds=20),
    "quick": dict(tokens=1024, d_model=64, d_ff=128, dtype="float32", rounds=2),  # keeps the script from rotting
}


def hf_layer(d_model: int, d_ff: int, n_experts: int, capacity_factor: float, tokens: int):
    """HF's Switch MLP with the same sizes, or None when transformers is not installed."""
    try:
        from transformers import SwitchTransformersConfig
        from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP
    except Exception:  # noqa: BLE001 - any import problem means "peer not available"
        return None
    cfg = SwitchTransformersConfig(d_model=d_model, d_ff=d_ff, num_experts=n_experts, expert_capacity=
                                   max(1, int(capacity_factor * tokens / n_experts)), dropout_rate=0.0,
                                   router_jitter_noise=0.0, dense_act_fn="relu")
    mlp = SwitchTransformersSparseMLP(cfg)

    def run(x):
        out = mlp(x)
        return out[0] if isinstance(out, tuple) else out
    return mlp, run


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(fn, x: torch.Tensor, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    y = fn(x)
    y.float().square().mean().backward()
    sync(device)
    return time.perf_counter() - t0


def round_ratios(times: list[float], dense: list[float]) -> list[float]:
    """Quartiles [25 %, 50 %, 75 %] of the per-round ratios times[r] / dense[r]. Each round times every layer back
    to back, so a ratio within a round sees the machine in one state; their spread shows how far to trust the
    ratio of medians on a shared machine."""
    ratios = [t / d for t, d in zip(times, dense)]
    if len(ratios) < 2:
        return [ratios[0]] * 3
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return [q1, q2, q3]


def check_json_path(ap: argparse.ArgumentParser, path: str | None) -> None:
    """Refuse (argparse's error line, exit 2) a --json path whose folder does not exist, before any timing."""
    if path and not Path(path).resolve().parent.is_dir():
        ap.error(f"--json: no folder {Path(path).resolve().parent} to write {Path(path).name} into")


def allocator_setting(device: str, default: bool) -> str:
    """Tune glibc malloc for the CPU run (`runtime.tune_cpu_allocator`, the same for every candidate) unless
    default; returns how malloc ran, for the results' header."""
    if device != "cpu" or default:
        return "default"
    return "tuned (tune_cpu_allocator)" if tune_cpu_allocator() else "default (tuning unavailable)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--experts", default="8,64")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (a smoke test of the script)")
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-peers", action="store_true", help="skip the Hugging Face layer")
    ap.add_argument("--json", default=None, help="write the results to this file as well")
    ap.add_argument("--default-allocator", action="store_true",
                    help="leave glibc malloc as it is (default on the CPU: runtime.tune_cpu_allocator)")
    args = ap.parse_args()
    check_json_path(ap, args.json)
    p = dict(PRESETS["quick" if args.quick else args.device])
    rounds = args.rounds or p["rounds"]
    dev, dtype = args.device, getattr(torch, p["dtype"])
    T, D, F_ = p["tokens"], p["d_model"], p["d_ff"]
    torch.manual_seed(0)
    allocator = allocator_setting(dev, args.default_allocator)
    results = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
               "device": machine(dev), "commit": git_commit(), "command": shlex.join(["python", *sys.argv]),
               "threads": torch.get_num_threads(), "cpu_allocator": allocator, "tokens": T, "d_model": D, "d_ff": F_,
               "dtype": p["dtype"],
               "capacity_factor": args.capacity_factor, "rounds": rounds, "rows": [],
               **({"no_host_sync": {}} if dev == "cuda" else {})}  # experts -> the auto layer's check passed
    print(f"# {results['when']}  torch {results['torch']}  {results['device']}  commit {results['commit']}\n"
          f"# {results['command']}\n# {dev} {p['dtype']}  T={T} d_model={D} d_ff={F_} CF={args.capacity_factor}  "
          f"{results['threads']} threads  malloc {allocator}  median of {rounds} interleaved rounds")
    x = torch.randn(T // 16, 16, D, device=dev, dtype=dtype)
    for E in [int(e) for e in args.experts.split(",")]:
        dense = FeedForward(D, F_).to(dev, dtype)
        candidates = {"dense FeedForward": dense}
        for backend in ("loop", "padded", "grouped", "auto"):
            candidates[f"switch {backend}"] = SwitchFeedForward(D, F_, E, capacity_factor=args.capacity_factor,
                                                                 backend=backend).to(dev, dtype)
        if dev == "cpu":  # the auto layer run step by step rather than as one autograd node (fused_cpu.py)
            candidates["switch auto, steps"] = SwitchFeedForward(D, F_, E, capacity_factor=args.capacity_factor,
                                                                 backend="auto").to(dev, dtype)
            candidates["switch auto, steps"].fuse_cpu = False
        resolved = candidates["switch auto"].resolve_backend(x)
        if candidates["switch auto"].fuses_on_cpu(x):
            resolved += ", fused into one autograd node"
        fns = {name: (lambda m: (lambda inp: m(inp)[0] if isinstance(m, SwitchFeedForward) else m(inp)))(m)
               for name, m in candidates.items()}
        if not args.no_peers and (hf := hf_layer(D, F_, E, args.capacity_factor, T)) is not None:
            hf[0].to(dev, dtype)
            fns["HF SwitchTransformersSparseMLP"] = hf[1]
        times = {name: [] for name in fns}
        for r in range(rounds + 1):  # round 0 is a warm-up
            for name, fn in fns.items():
                t = time_fwd_bwd(fn, x, dev)
                if r:
                    times[name].append(t)
            for m in candidates.values():
                m.zero_grad(set_to_none=True)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        print(f"\n{E} experts  (auto -> {resolved})")
        print(f"  {'layer':34s} {'median ms':>10s} {'ratio to dense':>15s}   {'per round: median [IQR]':s}")
        for name, m in med.items():
            ratio = m / med["dense FeedForward"]
            q = round_ratios(times[name], times["dense FeedForward"])
            print(f"  {name:34s} {1e3 * m:10.1f} {ratio:15.2f}x   {q[1]:.2f}x [{q[0]:.2f}-{q[2]:.2f}]")
            results["rows"].append({"experts": E, "layer": name, "median_ms": 1e3 * m, "ratio_to_dense": ratio,
                                    "round_ratio_quartiles": q})
        if "switch auto, steps" in med:
            print(f"  auto fused / auto steps: {med['switch auto'] / med['switch auto, steps']:.2f}x")
        if dev == "cuda":
            print(f"  loop / auto speedup: {med['switch loop'] / med['switch auto']:.2f}x")
            # Any host-device synchronisation inside the auto layer's forward/backward raises here.
            torch.cuda.set_sync_debug_mode("error")
            try:
                time_fwd_bwd(fns["switch auto"], x, "none")
                print("  host syncs in auto forward+backward: none (torch.cuda.set_sync_debug_mode('error'))")
                results["no_host_sync"][str(E)] = True
            except RuntimeError as e:
                print(f"  host sync found: {e}")
                results["no_host_sync"][str(E)] = False
            finally:
                torch.cuda.set_sync_debug_mode("default")
        if args.json:  # after every expert count, atomically: a run stopped on the way keeps the counts done
            replace_text(Path(args.json), json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
