"""The fused CPU layer (fused_cpu.SwitchCPU, one autograd node) equals the step-by-step layer, and runs only where
it applies."""
import pytest
import torch
from torch.testing import assert_close

from switch_core import SwitchFeedForward


def _outputs_and_grads(layer, x, fuse, loss_terms):
    layer.fuse_cpu = fuse
    assert layer.fuses_on_cpu(x) == fuse  # each side really runs the path it claims to
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    y, st = layer(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    terms = {"y": (y * w).sum(), "aux": 0.3 * st.balance_loss + 0.7 * st.z_loss,
             "stats": (st.router_probs ** 2).sum() + st.router_logits.sin().sum() + st.gates.cos().sum()}
    sum(terms[k] for k in loss_terms).backward()
    outs = [y, st.balance_loss, st.z_loss, st.counts, st.kept_counts, st.dropped_fraction, st.expert_index,
            st.gates, st.router_probs, st.router_logits]
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    return [o.detach() for o in outs], [None if g is None else g.clone() for g in grads], st.capacity


@pytest.mark.parametrize("n_experts, capacity_factor, activation, training", [
    (4, 1.25, "relu", True), (4, 0.5, "gelu", True), (8, None, "silu", False), (1, 1.0, "relu", True),
    (16, 0.25, "relu", True),  # experts that get no token, and heavy dropping
    (8, 2.0, "relu", False)])
@pytest.mark.parametrize("loss_terms", [("y",), ("y", "aux"), ("y", "aux", "stats"), ("aux",)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_layer_equals_the_step_by_step_layer(n_experts, capacity_factor, activation, training, loss_terms,
                                                    dtype):
    torch.manual_seed(0)
    layer = SwitchFeedForward(16, 32, n_experts, capacity_factor=capacity_factor,
                              eval_capacity_factor=capacity_factor, activation=activation).to(dtype).train(training)
    x = torch.randn(3, 17, 16, dtype=dtype, requires_grad=True)
    steps, g_steps, c_steps = _outputs_and_grads(layer, x, False, loss_terms)
    fused, g_fused, c_fused = _outputs_and_grads(layer, x, True, loss_terms)
    assert c_steps == c_fused
    tol = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(steps + g_steps, fused + g_fused):
        if a is None or b is None:
            assert a is None and b is None or torch.count_nonzero(a if b is None else b) == 0
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, **tol)


def test_fused_layer_passes_gradcheck():
    torch.manual_seed(0)
    layer = SwitchFeedForward(6, 8, 3, capacity_factor=0.8).double()
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    assert layer.fuses_on_cpu(x)

    def f(x, *ps):
        y, st = torch.func.functional_call(layer, dict(zip(names, ps)), (x,))
        return y, st.balance_loss, st.z_loss, st.router_probs

    inputs = (x,) + tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("change, applies", [
    ({}, True),
    (dict(top_k=2), False), (dict(drop_policy="priority"), False), (dict(group_size=5), False),
    (dict(group_size=10**6), True), (dict(activation="swiglu"), False), (dict(bias=True), False),
    (dict(jitter_eps=0.1), False), (dict(expert_dropout=0.1), False), (dict(backend="loop"), False),
    (dict(backend="padded"), False), (dict(backend="grouped"), True), (dict(router_dtype="bfloat16"), False)])
def test_the_fused_layer_runs_only_where_it_applies(change, applies):
    layer = SwitchFeedForward(8, 16, 4, **change).train()
    x = torch.randn(2, 9, 8)
    assert layer.fuses_on_cpu(x) == applies
    y, st = layer(x)  # whichever path, it runs
    assert y.shape == x.shape and st.expert_index.shape == (2, 9, layer.top_k)
    if change.get("jitter_eps") or change.get("expert_dropout"):
        assert layer.eval().fuses_on_cpu(x)  # jitter and expert dropout are training-only


def test_the_fused_layer_steps_aside_for_masks_dtypes_autocast_and_empty_input():
    layer = SwitchFeedForward(8, 16, 4)
    x = torch.randn(2, 9, 8)
    assert layer.fuses_on_cpu(x)
    assert not layer.fuses_on_cpu(x, torch.ones(2, 9, dtype=torch.bool))
    assert not layer.fuses_on_cpu(x.bfloat16())
    assert not layer.fuses_on_cpu(x[:, :0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.fuses_on_cpu(x)
    layer.fuse_cpu = False
    assert not layer.fuses_on_cpu(x)


def test_fused_layer_with_an_input_and_weights_that_need_no_gradient():
    torch.manual_seed(0)
    layer = SwitchFeedForward(16, 32, 4, capacity_factor=0.75).double()
    layer.experts.w_out.requires_grad_(False)  # e.g. frozen experts while fine-tuning
    x = torch.randn(40, 16, dtype=torch.float64)  # a leaf without gradient
    grads = []
    for fuse in (False, True):
        layer.fuse_cpu = fuse
        assert layer.fuses_on_cpu(x) == fuse
        layer.zero_grad(set_to_none=True)
        y, st = layer(x)
        (y.sin().sum() + st.balance_loss + st.z_loss).backward()
        grads.append([p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b)
    assert grads[1][2] is None and x.grad is None
