"""Where a CPU training step's time goes, dense against Switch, measured inside the step (``bench_train.py --phases``).

A profiler inflates the cost of small ops, and a layer timed alone runs with warm caches; neither says what a Switch
layer costs inside a real step (its router's ops measured 3-5x slower there than alone, on the 2-core development
machine). Here each model does the work of the trainer's step (`switch_core.train.train_step` less its finiteness
checks and LR schedule: forward with the auxiliary losses, backward, clip, AdamW) in three timed phases, and hooks
on every block's FFN time its forward (module hooks) and its backward (from the gradient of its output to that of
its input: a block's FFN input, the second LayerNorm's output, has no other consumer). Rounds interleave the
models; medians are printed.

CPU only: the phases are host wall-clock times, which on a GPU would measure kernel launches.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from switch_core.model import SwitchLM
from switch_core.train import compute_loss, make_config, make_optimizer

PHASES = ("forward", "backward", "clip + AdamW", "FFN forward", "FFN backward")


def _time_ffns(model: SwitchLM, acc: dict) -> None:
    """Add every FFN's forward and backward seconds into acc["FFN forward"] / acc["FFN backward"]."""
    for block in model.blocks:
        mark = {}

        def pre(module, args, mark=mark):
            mark["forward"] = time.perf_counter()
            if args[0].requires_grad:
                args[0].register_hook(lambda g: acc.__setitem__(
                    "FFN backward", acc["FFN backward"] + time.perf_counter() - mark["grad"]))

        def post(module, args, out, mark=mark):
            acc["FFN forward"] += time.perf_counter() - mark["forward"]
            y = out[0] if isinstance(out, tuple) else out
            if y.requires_grad:
                y.register_hook(lambda g: mark.__setitem__("grad", time.perf_counter()))

        block.ffn.register_forward_pre_hook(pre)
        block.ffn.register_forward_hook(post)


def phase_stepper(overrides: dict):
    """A function running one training step on a fixed batch and returning its phases' seconds (dict)."""
    cfg = make_config("cpu", **overrides, device="cpu", vocab_size=65, steps=10**6, warmup_steps=0)
    torch.manual_seed(0)
    model = SwitchLM(cfg.model)
    optimizer = make_optimizer(model, cfg)
    x = torch.randint(0, 65, (cfg.batch_size, cfg.model.seq_len))
    y = torch.randint(0, 65, (cfg.batch_size, cfg.model.seq_len))
    acc = dict.fromkeys(PHASES, 0.0)
    _time_ffns(model, acc)

    def step() -> dict:
        acc.update(dict.fromkeys(PHASES, 0.0))
        t0 = time.perf_counter()
        loss = compute_loss(model, x, y, cfg)[0]
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        optimizer.step()
        t3 = time.perf_counter()
        return {**acc, "forward": t1 - t0, "backward": t2 - t1, "clip + AdamW": t3 - t2}
    return step


def phases(name: str, overrides: dict, rounds: int, steps_per_round: int) -> list[dict]:
    """Print and return the median ms per step of every phase, dense and Switch, and the difference."""
    runs = {"dense": phase_stepper({**overrides, "switch_every": 0}), "Switch": phase_stepper(overrides)}
    samples = {k: {p: [] for p in PHASES} for k in runs}
    for r in range(rounds + 1):  # round 0 warms up
        for k, step in runs.items():
            got = [step() for _ in range(steps_per_round)]
            if r:
                for p in PHASES:
                    samples[k][p].append(statistics.mean(g[p] for g in got))
    med = {k: {p: 1e3 * statistics.median(v) for p, v in s.items()} for k, s in samples.items()}
    every = overrides["switch_every"]
    n_switch = overrides["n_layer"] // every if every else 0  # the FFNs that differ: blocks every-1, 2·every-1, ...
    print(f"\n{name}: {', '.join(f'{k}={v}' for k, v in overrides.items())}")
    print(f"  {'phase (ms per step, median)':30s} {'dense':>8s} {'Switch':>8s} {'Switch - dense':>15s} "
          f"{'per Switch layer':>17s}")
    rows = []
    for p in PHASES:
        d, s = med["dense"][p], med["Switch"][p]
        layer = f"{(s - d) / n_switch:17.2f}" if p.startswith("FFN") and n_switch else ""
        print(f"  {p:30s} {d:8.2f} {s:8.2f} {s - d:15.2f} {layer}".rstrip())
        rows.append(dict(config=name, phase=p, dense_ms=d, switch_ms=s))
    total = {k: sum(med[k][p] for p in PHASES[:3]) for k in med}
    print(f"  {'step (the first three)':30s} {total['dense']:8.2f} {total['Switch']:8.2f} "
          f"{total['Switch'] - total['dense']:15.2f}   Switch ÷ dense tokens/s {total['dense'] / total['Switch']:.2f}x")
    return rows
