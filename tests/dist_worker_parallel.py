"""One rank of the expert-parallel checks; tests/test_parallel.py launches it with torchrun (2 ranks, gloo).

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker_parallel.py OUT_DIR

Every rank builds the same single-process layer (same seed) and its own tokens. The reference runs the unsharded
layer on every rank's tokens, one call per rank (each rank its own capacity group), and sums the gradients; the
sharded layer runs only this rank's tokens. Each rank writes {case name: "ok" or what differed} to
OUT_DIR/rank{r}.json. A mismatch is recorded, not raised, so the ranks stay in step through every case.
"""
from __future__ import annotations

import itertools
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from switch_core import SwitchFeedForward
from switch_core.parallel import (ExpertParallelSwitch, all_reduce_mean, clip_grad_norm_, expert_parameters,
                                  gather_full_state_dict, load_sharded_checkpoint, marker_path,
                                  save_sharded_checkpoint, setup_distributed, shard_experts, shard_model_experts,
                                  shard_path, sync_gradients, teardown_distributed)

WORLD = 2
D, F_ = 8, 16


def _layer_case(E, cf, policy, k, masked, **extra):
    name = f"E{E}-cf{cf}-{policy}-top{k}" + ("-masked" if masked else "")
    return {"name": name, "E": E, "cf": cf, "policy": policy, "k": k, "masked": masked, **extra}


# The grid of the brief: expert counts x capacity factors x drop policies x top-k, padding on every other case.
LAYER_CASES = [_layer_case(E, cf, policy, k, masked=(i % 2 == 1))
               for i, (E, cf, policy, k) in enumerate(itertools.product((2, 4, 8), (0.5, 1.0, 1.25, None),
                                                                        ("position", "priority", "random"), (1, 2)))]
LAYER_CASES += [
    _layer_case(4, 1.0, "position", 1, True, name="eval-mode-uses-eval-capacity", train=False, eval_cf=0.5),
    _layer_case(4, 1.25, "position", 2, True, name="unaligned-dims-loop-fallback", d_model=6, d_ff=10),
    _layer_case(4, 1.0, "priority", 1, True, name="geglu-with-bias", activation="geglu", bias=True),
    _layer_case(4, 1.0, "position", 1, True, name="batched-3d-input", shape=(2, 7)),
    _layer_case(4, 1.0, "random", 2, False, name="jitter-and-random-policy", jitter=0.1),
    _layer_case(4, 1.0, "position", 1, True, name="rank1-all-padding", all_pad_rank=1),
    _layer_case(8, 0.5, "position", 1, False, name="uneven-tokens-per-rank", tokens=(24, 5)),
    _layer_case(4, 1.25, "position", 1, True, name="bfloat16", dtype=torch.bfloat16),
]
OTHER_CASES = ["error-n-experts-not-divisible", "error-not-a-switch-layer", "error-wrong-device-for-backend",
               "shard-model-experts", "model-train-step-gradients", "three-adamw-steps-match-one-process",
               "gather-full-state-dict", "all-reduce-mean", "checkpoint-roundtrip", "checkpoint-wrong-layout"]
CASE_NAMES = [c["name"] for c in LAYER_CASES] + OTHER_CASES


def make_layer(c) -> SwitchFeedForward:
    torch.manual_seed(1234)
    layer = SwitchFeedForward(c.get("d_model", D), c.get("d_ff", F_), c["E"], top_k=c["k"], capacity_factor=c["cf"],
                              eval_capacity_factor=c.get("eval_cf", 2.0), drop_policy=c["policy"],
                              jitter_eps=c.get("jitter", 0.0), activation=c.get("activation", "relu"),
                              bias=c.get("bias", False))
    return layer.train(c.get("train", True))


def tokens(c, w):
    """This case's tokens, padding mask and upstream gradient on rank w (the same on every rank that asks)."""
    g = torch.Generator().manual_seed(100 * CASE_NAMES.index(c["name"]) + w)
    shape = c.get("shape") or (c.get("tokens", (16, 16))[w],)
    dt = c.get("dtype", torch.float32)
    x = torch.randn(*shape, c.get("d_model", D), generator=g).to(dt).requires_grad_()
    mask = torch.rand(*shape, generator=g) > 0.3 if c["masked"] else None
    if c.get("all_pad_rank") == w:
        mask = torch.zeros(shape, dtype=torch.bool)
    return x, mask, torch.randn(*x.shape, generator=g).to(dt)


def run(layer, x, mask, up, w):
    torch.manual_seed(7 + w)  # the random drop policy and jitter draw from the global RNG: same on both sides
    y, s = layer(x, token_mask=mask)
    ((y.float() * up.float()).sum() + s.balance_loss + s.z_loss).backward()
    return y.detach(), s


def diff(tag, a, b, tol) -> list[str]:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    try:
        torch.testing.assert_close(a.float() if a.is_floating_point() else a,
                                   b.float() if b.is_floating_point() else b, atol=tol, rtol=tol)
        return []
    except AssertionError as e:
        return [f"{tag}: {str(e).splitlines()[0]} {str(e).splitlines()[-1]}"]


def check_layer(c, rank) -> list[str]:
    tol = 2e-2 if c.get("dtype") == torch.bfloat16 else 1e-5
    ref = make_layer(c)
    inputs = [tokens(c, w) for w in range(WORLD)]
    refs = [run(ref, *inputs[w], w) for w in range(WORLD)]  # parameter gradients summed over the ranks' calls
    ref_x = inputs[rank][0]
    x, mask, up = tokens(c, rank)
    sharded = shard_experts(make_layer(c))
    y, s = run(sharded, x, mask, up, rank)
    y_ref, s_ref = refs[rank]
    errs = diff("output", y, y_ref, tol) + diff("input grad", x.grad, ref_x.grad, tol)
    for field in ("counts", "kept_counts", "balance_loss", "z_loss", "dropped_fraction", "expert_index", "gates",
                  "router_probs"):
        errs += diff(f"stats.{field}", getattr(s, field).detach(), getattr(s_ref, field).detach(), tol)
    errs += [] if s.capacity == s_ref.capacity else [f"capacity {s.capacity} != {s_ref.capacity}"]
    L = c["E"] // WORLD
    for name in ("w_in", "w_gate", "w_out", "b_in", "b_out"):
        p = getattr(sharded.experts, name)
        if p is not None:
            errs += [] if p.shape[0] == L else [f"{name} has {p.shape[0]} experts, not {L}"]
            errs += diff(f"{name}.grad", p.grad, getattr(ref.experts, name).grad[rank * L:(rank + 1) * L], tol)
    router_grad = sharded.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    errs += diff("router grad (summed over ranks)", router_grad, ref.router.weight.grad, tol)
    return errs


def expect_error(fn, exc, words) -> list[str]:
    try:
        fn()
    except exc as e:
        return [] if all(w in str(e) for w in words) else [f"message {str(e)!r} lacks {words}"]
    return [f"no {exc.__name__} raised"]


def tiny_model():
    from switch_core.model import ModelConfig, SwitchLM
    torch.manual_seed(0)
    return SwitchLM(ModelConfig(vocab_size=17, seq_len=12, n_layer=2, n_head=2, d_model=16, d_ff=32, n_experts=4,
                                switch_every=1, capacity_factor=1.0))


def model_loss(model, w):
    g = torch.Generator().manual_seed(50 + w)
    idx = torch.randint(0, 17, (3, 12), generator=g)
    logits, stats = model(idx)
    ce = nn.functional.cross_entropy(logits.flatten(0, 1), torch.roll(idx, -1, 1).flatten())
    return ce + sum(0.01 * s.balance_loss + 0.001 * s.z_loss for s in stats)


def check_model_step(rank) -> list[str]:
    ref = tiny_model()
    for w in range(WORLD):  # the data-parallel objective: the mean of the ranks' losses
        (model_loss(ref, w) / WORLD).backward()
    ref_norm = torch.cat([p.grad.reshape(-1) for p in ref.parameters()]).norm()
    model = shard_model_experts(tiny_model())
    model_loss(model, rank).backward()
    sync_gradients(model)
    experts = dict(expert_parameters(model))
    errs, L = [], 4 // WORLD
    for name, p in model.named_parameters():
        want = ref.get_parameter(name).grad
        errs += diff(f"{name}.grad", p.grad, want[rank * L:(rank + 1) * L] if name in experts else want, 1e-5)
    errs += diff("global grad norm", clip_grad_norm_(model, 1e9), ref_norm, 1e-5)
    return errs


def check_adamw_steps(rank) -> list[str]:
    """3 AdamW steps with clipping: the sharded model, gathered, equals one process training on the mean loss."""
    ref, model = tiny_model(), shard_model_experts(tiny_model())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, model)]
    for step in range(3):
        for opt in opts:
            opt.zero_grad()
        for w in range(WORLD):
            (model_loss(ref, w + 10 * step) / WORLD).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        model_loss(model, rank + 10 * step).backward()
        sync_gradients(model)
        clip_grad_norm_(model, 0.05)
        for opt in opts:
            opt.step()
    full, errs = gather_full_state_dict(model), []
    for k, v in ref.state_dict().items():
        errs += diff(k, full[k], v, 1e-5)
    return errs


def check_shard_model(rank) -> list[str]:
    model = shard_model_experts(tiny_model())
    layers = [m for m in model.modules() if isinstance(m, SwitchFeedForward)]
    errs = [] if len(layers) == 2 and all(isinstance(m, ExpertParallelSwitch) for m in layers) else ["not replaced"]
    names = [n for n, _ in expert_parameters(model)]
    errs += [] if names == ["blocks.0.ffn.experts.w_in", "blocks.0.ffn.experts.w_out", "blocks.1.ffn.experts.w_in",
                            "blocks.1.ffn.experts.w_out"] else [f"expert parameters {names}"]
    errs += [] if model.blocks[0].ffn.experts.w_in.shape == (2, 16, 32) else ["wrong shard shape"]
    return errs


def check_gather(rank) -> list[str]:
    full = gather_full_state_dict(shard_model_experts(tiny_model()))
    ref = tiny_model().state_dict()
    errs = [] if full.keys() == ref.keys() else ["keys differ"]
    for k, v in ref.items():
        errs += diff(k, full[k], v, 0.0)
    fresh = type(tiny_model())(tiny_model().cfg)
    fresh.load_state_dict(full)  # loads into the single-device model
    return errs


def check_checkpoint(rank, out_dir: Path) -> list[str]:
    model = shard_model_experts(tiny_model())
    path = out_dir / "checkpoint.pt"
    save_sharded_checkpoint(path, {"model": model.state_dict(), "step": 3})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state = load_sharded_checkpoint(path)
    model.load_state_dict(state["model"])
    errs = [] if state["step"] == 3 else ["step lost"]
    errs += [] if shard_path(path, 3, rank).exists() and marker_path(path).exists() else ["no per-rank file"]
    dist.barrier()  # both ranks have loaded; only this case's files (the next case may be writing other.pt)
    errs += [] if not list(out_dir.glob("checkpoint*.tmp")) else ["temporary file left behind"]
    for k, v in model.state_dict().items():
        errs += diff(k, v, saved[k], 0.0)
    return errs


def check_wrong_layout(rank, out_dir: Path) -> list[str]:
    path = out_dir / "other.pt"
    save_sharded_checkpoint(path, {"step": 1})
    if rank == 0:  # pretend rank 0's file came from a 4-rank run
        f = shard_path(path, 1, 0)
        torch.save({**torch.load(f, weights_only=True), "expert_parallel": {"rank": 0, "world_size": 4}}, f)
    dist.barrier()
    return expect_error(lambda: load_sharded_checkpoint(path), ValueError, ["world size"])


def main(out_dir: Path) -> int:
    device, rank, world = setup_distributed("cpu", timeout_s=60)
    assert (device.type, world) == ("cpu", WORLD) and dist.get_backend() == "gloo"
    torch.set_num_threads(1)
    results = {}
    others = {
        "error-n-experts-not-divisible": lambda: expect_error(
            lambda: shard_experts(SwitchFeedForward(D, F_, 3)), ValueError, ["n_experts (3)", "divisible"]),
        "error-not-a-switch-layer": lambda: expect_error(
            lambda: shard_experts(nn.Linear(4, 4)), TypeError, ["SwitchFeedForward", "Linear"]),
        "error-wrong-device-for-backend": lambda: expect_error(
            lambda: shard_experts(SwitchFeedForward(D, F_, 4).to("meta")), ValueError, ["meta", "gloo"]),
        "shard-model-experts": lambda: check_shard_model(rank),
        "model-train-step-gradients": lambda: check_model_step(rank),
        "three-adamw-steps-match-one-process": lambda: check_adamw_steps(rank),
        "gather-full-state-dict": lambda: check_gather(rank),
        "all-reduce-mean": lambda: diff("mean", all_reduce_mean(torch.tensor([1.0 + rank, 3.0])),
                                        torch.tensor([1.5, 3.0]), 0.0),
        "checkpoint-roundtrip": lambda: check_checkpoint(rank, out_dir),
        "checkpoint-wrong-layout": lambda: check_wrong_layout(rank, out_dir),
    }
    try:
        for c in LAYER_CASES:
            results[c["name"]] = check_layer(c, rank)
        for name in OTHER_CASES:
            results[name] = others[name]()
        code = 0
    except Exception:  # an exception desynchronises the ranks: record it and stop (torchrun stops the other)
        results["worker-crashed"] = [traceback.format_exc()]
        code = 1
    (out_dir / f"rank{rank}.json").write_text(json.dumps({k: "ok" if not v else "; ".join(v)
                                                          for k, v in results.items()}, indent=1))
    teardown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
