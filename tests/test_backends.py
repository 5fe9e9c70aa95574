"""The three backends compute the same outputs and gradients, including dropped and padded tokens, top-2,
every drop policy, biases and gated activations; the grouped backend has no host-device synchronisation."""
import itertools

import pytest
import torch
from torch.testing import assert_close

from switch_core import SwitchFeedForward
from switch_core.experts import grouped_mm_supported

CASES = list(itertools.product([1, 2], ["position", "priority", "random"], [0.5, 1.0, None]))


def _run(layer, backend, x, mask):
    layer.backend = backend
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the "random" policy draws the same permutation for every backend
    x = x.clone().requires_grad_()
    y, s = layer(x, token_mask=mask)
    (y.square().sum() + s.balance_loss + 0.1 * s.z_loss).backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}, s


@pytest.mark.parametrize("top_k, policy, cf", CASES)
def test_backends_agree(top_k, policy, cf):
    torch.manual_seed(0)
    layer = SwitchFeedForward(8, 16, 4, top_k=top_k, capacity_factor=cf, drop_policy=policy)
    x = torch.randn(2, 16, 8)
    mask = torch.rand(2, 16) > 0.25
    ref = _run(layer, "loop", x, mask)
    assert (ref[0][~mask] == 0).all()
    for backend in ("padded", "grouped"):
        out = _run(layer, backend, x, mask)
        assert_close(out[0], ref[0])
        assert_close(out[1], ref[1])
        for name in ref[2]:
            assert_close(out[2][name], ref[2][name], msg=f"{backend}: grad of {name}")
        assert torch.equal(out[3].kept_counts, ref[3].kept_counts)
        assert_close(out[3].dropped_fraction, ref[3].dropped_fraction)


@pytest.mark.parametrize("activation, bias", [("geglu", True), ("gelu", False), ("swiglu", True)])
def test_backends_agree_with_bias_and_activations(activation, bias):
    torch.manual_seed(0)
    layer = SwitchFeedForward(8, 16, 4, capacity_factor=0.75, activation=activation, bias=bias)
    with torch.no_grad():
        layer.experts.b_in.normal_() if bias else None
        layer.experts.b_out.normal_() if bias else None
    x = torch.randn(32, 8)
    ref = _run(layer, "loop", x, None)
    for backend in ("padded", "grouped"):
        out = _run(layer, backend, x, None)
        assert_close(out[0], ref[0])
        for name in ref[2]:
            assert_close(out[2][name], ref[2][name], msg=f"{backend}: grad of {name}")


def test_expert_with_no_tokens_in_every_backend():
    torch.manual_seed(0)
    layer = SwitchFeedForward(8, 16, 4, capacity_factor=None)
    with torch.no_grad():
        layer.router.weight.abs_()
        layer.router.weight[3] *= -1  # positive inputs: expert 3 has the only negative logit
    x = torch.randn(16, 8).abs()
    outs = [_run(layer, b, x, None) for b in ("loop", "padded", "grouped")]
    assert outs[0][3].counts[3] == 0
    for out in outs[1:]:
        assert_close(out[0], outs[0][0])
        assert (out[2]["experts.w_in"][3] == 0).all()


def test_auto_picks_grouped_on_cpu_for_every_dtype_and_size():
    # On the CPU the grouped backend runs expert by expert (no grouped_mm needed, a host sync is free).
    assert SwitchFeedForward(16, 32, 4).resolve_backend(torch.randn(4, 16)) == "grouped"
    assert SwitchFeedForward(16, 32, 4).resolve_backend(torch.randn(4, 16).double()) == "grouped"
    assert SwitchFeedForward(6, 10, 4).resolve_backend(torch.randn(4, 6)) == "grouped"


def test_auto_on_an_accelerator_needs_grouped_mm_for_the_dtype_and_alignment():
    # The meta device stands in for an accelerator: its grouped_mm kernel takes bfloat16 only, like CUDA's on
    # some builds. Where grouped_mm cannot run, auto uses the padded backend, unless dropless.
    def resolve(d_model, d_ff, dtype, **kw):
        layer = SwitchFeedForward(d_model, d_ff, 4, **kw)
        return layer.resolve_backend(torch.empty(4, d_model, device="meta", dtype=dtype))

    if not grouped_mm_supported("meta", torch.bfloat16):
        pytest.skip("this torch build has no grouped_mm")
    assert resolve(16, 32, torch.bfloat16) == "grouped"
    assert resolve(16, 32, torch.float32) == ("grouped" if grouped_mm_supported("meta", torch.float32) else "padded")
    assert resolve(4, 12, torch.bfloat16) == "padded"  # 8 bytes per row: not 16-byte aligned
    assert resolve(4, 12, torch.bfloat16, capacity_factor=None) == "grouped"  # dropless: no [E, T, D] buffer


@pytest.mark.parametrize("backend", ["grouped", "padded"])
def test_accelerator_forward_and_backward_have_no_host_sync(backend):
    # On the meta device any .item(), .tolist() or nonzero() (the host syncs of a GPU run) raises, so running
    # forward and backward there proves the accelerator path never waits for the device.
    if backend == "grouped" and not grouped_mm_supported("meta", torch.bfloat16):
        pytest.skip("this torch build has no grouped_mm")
    torch.manual_seed(0)
    layer = SwitchFeedForward(16, 32, 4, top_k=2, backend=backend).to("meta", torch.bfloat16)
    x = torch.randn(2, 8, 16, dtype=torch.bfloat16, device="meta", requires_grad=True)
    y, s = layer(x, token_mask=torch.ones(2, 8, dtype=torch.bool, device="meta"))
    (y.float().sum() + s.balance_loss + s.z_loss).backward()
    assert y.shape == (2, 8, 16) and x.grad.shape == x.shape


def test_loop_backend_does_sync_so_the_check_can_fail():
    layer = SwitchFeedForward(16, 32, 4, backend="loop").to("meta")
    with pytest.raises(NotImplementedError, match="nonzero"):
        layer(torch.randn(8, 16, device="meta"))


def test_grouped_backend_falls_back_for_sizes_grouped_mm_cannot_take():
    torch.manual_seed(0)
    layer = SwitchFeedForward(6, 10, 4, capacity_factor=1.0)  # 6 and 10 floats are not 16-byte multiples
    x = torch.randn(12, 6)
    ref = _run(layer, "loop", x, None)
    out = _run(layer, "grouped", x, None)
    assert_close(out[0], ref[0])
    assert_close(out[2]["experts.w_in"], ref[2]["experts.w_in"])


@pytest.mark.parametrize("backend", ["auto", "loop"])
def test_training_loss_of_the_whole_model_has_no_host_sync_on_an_accelerator(backend):
    # The layer test above, one level up: the language model's forward, the cross-entropy, every layer's balance
    # and z-loss summed (train.compute_loss), and the backward, on the meta device. The loop backend syncs (its
    # nonzero), which shows the check can fail.
    from switch_core.model import SwitchLM
    from switch_core.train import compute_loss, make_config

    cfg = make_config("tiny", vocab_size=11, n_layer=2, seq_len=8, backend=backend)
    model = SwitchLM(cfg.model).to("meta", torch.bfloat16)
    x_BT, y_BT = (torch.randint(0, 11, (2, 8), device="meta") for _ in range(2))
    if backend == "loop":
        with pytest.raises(NotImplementedError, match="nonzero"):
            compute_loss(model, x_BT, y_BT, cfg)
        return
    loss, ce, stats = compute_loss(model, x_BT, y_BT, cfg)
    loss.backward()
    assert loss.shape == () and len(stats) >= 1
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())
