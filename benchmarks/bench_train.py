"""Training-step speed of a Switch `SwitchLM` against its dense twin (same FLOPs per token), side by side.

Each round runs a few full training steps (forward, loss with the auxiliary terms, backward, clip, AdamW) of every
model in turn; the median step time over the rounds gives tokens/s, and the ratio Switch ÷ dense is printed. When
`labml-nn` is installed (benchmark-only: ``pip install --no-deps labml-nn==0.5.1 labml==0.4.168``), labml's annotated
Switch Transformer, the seed implementation this project started from, is timed in the same rounds at the configs
with a Switch FFN in every block, as in labml's (its own experiment's config is "labml").

    python benchmarks/bench_train.py                       # CPU fp32: labml's config, 2 x d64, the cpu preset
    python benchmarks/bench_train.py --device cuda         # bf16 autocast, the trainer's gpu preset sizes
    python benchmarks/bench_train.py --profile small       # where a Switch step's time goes (torch.profiler)
    python benchmarks/bench_train.py --phases              # the step's phases and FFNs, dense vs Switch (CPU)
    python benchmarks/bench_train.py --json out.json       # also write the numbers
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
import torch.nn.functional as F

from switch_core.checkpoint import replace_text
from switch_core.layer import SwitchFeedForward
from switch_core.model import SwitchLM
from switch_core.sweep import git_commit, machine
from switch_core.train import Runtime, TrainState, WarmupCosine, make_config, make_optimizer, train_step

# benchmarks/ is on sys.path: this file runs as a script
from bench_layer import allocator_setting, check_json_path, round_ratios
from step_phases import phases

SIZES = ("n_layer", "n_head", "d_model", "d_ff", "n_experts", "switch_every", "seq_len")


def preset_sizes(preset: str) -> dict:
    """The model and batch sizes of the trainer's preset (`switch_core.train.make_config`), as CONFIGS entries."""
    cfg = make_config(preset, device="cpu")
    return {**{k: getattr(cfg.model, k) for k in SIZES}, "batch_size": cfg.batch_size}


# name -> flat config overrides (ModelConfig / TrainConfig fields) for the Switch model; the dense twin sets
# switch_every=0. "labml" is labml's experiment config (experiment.py: 6 x d128, 4 heads, d_ff 256, 4 experts in
# every block, seq 64, batch 32); "cpu" and "gpu" are the trainer's presets (`--preset cpu|gpu`).
CONFIGS = {
    "labml": dict(n_layer=6, n_head=4, d_model=128, d_ff=256, n_experts=4, switch_every=1, seq_len=64,
                  batch_size=32),
    "small": dict(n_layer=2, n_head=4, d_model=64, d_ff=256, n_experts=8, switch_every=1, seq_len=64,
                  batch_size=32),
    "tiny": dict(n_layer=1, n_head=2, d_model=32, d_ff=64, n_experts=4, switch_every=1, seq_len=32, batch_size=8),
    "cpu": preset_sizes("cpu"),
    "gpu": preset_sizes("gpu"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def switch_core_stepper(overrides: dict, device: torch.device, compile_model: bool = False, fuse: bool = True):
    """A function running one training step of the trainer (switch_core.train.train_step) on a fixed batch.
    fuse=False runs every Switch layer step by step instead of as one autograd node on the CPU (fused_cpu.py)."""
    cfg = make_config("cpu", **overrides, device=device.type, vocab_size=65, steps=10**6, warmup_steps=0)
    torch.manual_seed(0)
    model = SwitchLM(cfg.model).to(device)
    for m in model.modules():
        if isinstance(m, SwitchFeedForward):
            m.fuse_cpu = fuse
    opt = make_optimizer(model, cfg)
    state = TrainState(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(cfg)), torch.Generator())
    runtime = Runtime(device)
    runner = torch.compile(model) if compile_model else model
    x = torch.randint(0, 65, (cfg.batch_size, cfg.model.seq_len), device=device)
    y = torch.randint(0, 65, (cfg.batch_size, cfg.model.seq_len), device=device)

    def step():
        train_step(state, runner, x, y, cfg, runtime)
    return step, x.numel()


def labml_stepper(overrides: dict, device: torch.device):
    """labml's Switch Transformer at the same sizes, trained as its experiment.py does, or None if not installed."""
    try:
        from labml_nn.transformers.feed_forward import FeedForward
        from labml_nn.transformers.mha import MultiHeadAttention
        from labml_nn.transformers.switch import SwitchFeedForward, SwitchTransformer, SwitchTransformerLayer
        from labml_nn.transformers.utils import subsequent_mask
    except Exception:  # noqa: BLE001 - any import problem means "peer not available"
        return None
    o = overrides
    torch.manual_seed(0)
    layer = SwitchTransformerLayer(
        d_model=o["d_model"], attn=MultiHeadAttention(o["n_head"], o["d_model"], 0.0),
        feed_forward=SwitchFeedForward(capacity_factor=1.0, drop_tokens=False, is_scale_prob=True,
                                       n_experts=o["n_experts"], expert=FeedForward(o["d_model"], o["d_ff"], 0.0),
                                       d_model=o["d_model"]), dropout_prob=0.0)
    emb, head = torch.nn.Embedding(65, o["d_model"]), torch.nn.Linear(o["d_model"], 65)
    model = torch.nn.ModuleList([emb, SwitchTransformer(layer, o["n_layer"]), head]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    T, B = o["seq_len"], o["batch_size"]
    x = torch.randint(0, 65, (T, B), device=device)  # labml is sequence-first
    y = torch.randint(0, 65, (T, B), device=device)
    mask = subsequent_mask(T).to(device)

    def step():
        res, counts, route_prob, n_dropped, _ = model[1](model[0](x), mask)
        logits = model[2](res)
        ce = F.cross_entropy(logits.view(-1, 65), y.view(-1))
        total = counts.sum(dim=-1, keepdims=True)
        balance = o["n_experts"] * ((counts / total) * (route_prob / total)).sum()
        opt.zero_grad()
        (ce + 0.01 * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ce.item()
    return step, x.numel()


def time_steps(step, n: int, device: torch.device) -> float:
    """Seconds per step, over n steps."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) / n


def bench(name: str, device: torch.device, rounds: int, steps_per_round: int, peers: bool, compile_model: bool):
    o = CONFIGS[name]
    runs = {"dense SwitchLM": switch_core_stepper({**o, "switch_every": 0}, device),
            "Switch SwitchLM": switch_core_stepper(o, device)}
    if device.type == "cpu":
        runs["Switch SwitchLM, steps"] = switch_core_stepper(o, device, fuse=False)
    if compile_model:
        runs["dense SwitchLM, compiled"] = switch_core_stepper({**o, "switch_every": 0}, device, True)
        runs["Switch SwitchLM, compiled"] = switch_core_stepper({**o, "backend": "padded"}, device, True)
    # labml's model has a Switch FFN in every block: a peer only where ours does too
    if peers and device.type == "cpu" and o["switch_every"] == 1 and (lab := labml_stepper(o, device)) is not None:
        runs["labml Switch Transformer"] = lab
    times = {k: [] for k in runs}
    for r in range(rounds + 1):  # round 0 warms up (allocator, caches, compilation)
        for k, (step, _) in runs.items():
            t = time_steps(step, steps_per_round, device)
            if r:
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: runs[k][1] / med[k] for k in runs}
    cfg = ", ".join(f"{k}={v}" for k, v in o.items())
    print(f"\n{name}: {cfg}")
    print(f"  {'model':30s} {'ms/step':>9s} {'tokens/s':>10s} {'÷ dense':>8s}   per round: median [IQR]")
    rows = []
    for k in runs:
        dense_key = "dense SwitchLM, compiled" if k.endswith("compiled") else "dense SwitchLM"
        ratio = tps[k] / tps[dense_key]
        q = round_ratios(times[dense_key], times[k])  # tokens/s ratio = dense time / this time
        print(f"  {k:30s} {1e3 * med[k]:9.2f} {tps[k]:10,.0f} {ratio:7.2f}x   {q[1]:.2f}x [{q[0]:.2f}-{q[2]:.2f}]")
        rows.append(dict(config=name, model=k, ms_per_step=1e3 * med[k], tokens_per_s=tps[k], ratio_to_dense=ratio,
                         round_ratio_quartiles=q))
    if compile_model:  # what a user gets by picking the faster mode of each
        best = {m: max((k for k in tps if k.startswith(m)), key=tps.get) for m in ("dense", "Switch")}
        print(f"  best Switch ({best['Switch']}) / best dense ({best['dense']}): "
              f"{tps[best['Switch']] / tps[best['dense']]:.2f}x; Switch compiled / eager: "
              f"{tps['Switch SwitchLM, compiled'] / tps['Switch SwitchLM']:.2f}x")
    if "Switch SwitchLM, steps" in tps:
        print(f"  Switch fused / Switch steps: {tps['Switch SwitchLM'] / tps['Switch SwitchLM, steps']:.2f}x")
    if "labml Switch Transformer" in tps:
        print(f"  Switch SwitchLM / labml: {tps['Switch SwitchLM'] / tps['labml Switch Transformer']:.2f}x")
    return rows


def profile(name: str, device: torch.device, steps: int = 10) -> None:
    step, _ = switch_core_stepper(CONFIGS[name], device)
    for _ in range(3):
        step()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                    if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--configs", default=None, help="comma-separated names from CONFIGS (default: per device)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--no-peers", action="store_true", help="skip labml's model")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models (padded backend)")
    ap.add_argument("--profile", default=None, metavar="CONFIG", help="profile the Switch model instead")
    ap.add_argument("--phases", action="store_true",
                    help="time the step's phases and every FFN inside it, dense vs Switch, instead (CPU)")
    ap.add_argument("--json", default=None, help="write the results to this file as well")
    ap.add_argument("--default-allocator", action="store_true",
                    help="leave glibc malloc as it is (default on the CPU: runtime.tune_cpu_allocator)")
    args = ap.parse_args()
    check_json_path(ap, args.json)
    device = torch.device(args.device)
    if args.phases and args.device != "cpu":
        ap.error("--phases times host wall clock: CPU only")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    if args.profile:
        allocator_setting(args.device, args.default_allocator)
        profile(args.profile, device)
        return
    names = (args.configs or ("gpu" if args.device == "cuda" else "labml,small,cpu")).split(",")
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        ap.error(f"--configs: unknown {', '.join(bad)} (choose from {', '.join(CONFIGS)})")
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    dev_name, commit, command = machine(args.device), git_commit(), shlex.join(["python", *sys.argv])
    allocator = allocator_setting(args.device, args.default_allocator)
    print(f"# {when}  torch {torch.__version__}  {dev_name}  commit {commit}\n# {command}\n"
          f"# {torch.get_num_threads()} threads  malloc {allocator}  "
          f"median of {args.rounds} interleaved rounds x {args.steps_per_round} steps")
    rows = []
    for name in names:
        rows += (phases(name, CONFIGS[name], args.rounds, args.steps_per_round) if args.phases else
                 bench(name, device, args.rounds, args.steps_per_round, not args.no_peers, args.compile))
        if args.json:  # after every config, atomically: a run stopped on the way keeps the configs done
            replace_text(Path(args.json), json.dumps(
                dict(when=when, torch=torch.__version__, device=dev_name, commit=commit, command=command,
                     threads=torch.get_num_threads(), cpu_allocator=allocator, rounds=args.rounds,
                     steps_per_round=args.steps_per_round, rows=rows), indent=2))


if __name__ == "__main__":
    main()
