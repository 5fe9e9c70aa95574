"""torch.compile(layer, fullgraph=True) traces the padded backend (static shapes) and the grouped one (its per-expert
matmuls a custom op) without a graph break, and the compiled layer's outputs, statistics and gradients equal eager
mode (CPU, small sizes)."""
import torch
from torch.testing import assert_close

from switch_core import SwitchFeedForward


def _run(layer, x):
    y, s = layer(x)
    (y.square().sum() + s.balance_loss + 0.1 * s.z_loss).backward()
    return y.detach(), s


def _compiled_equals_eager(layer, x):
    """Run layer compiled, then eager, on x; assert equal outputs, kept counts and gradients; return both stats."""
    y_c, s_c = _run(torch.compile(layer, fullgraph=True), x)  # fullgraph: any graph break raises
    grads_c = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad(set_to_none=True)
    y_e, s_e = _run(layer, x)
    grads_e = [x.grad] + [p.grad for p in layer.parameters()]
    assert_close(y_c, y_e)
    assert torch.equal(s_c.kept_counts, s_e.kept_counts)
    for a, b in zip(grads_c, grads_e):
        assert_close(a, b)
    return s_c, s_e


def test_padded_backend_compiles_with_fullgraph_and_equals_eager():
    torch.manual_seed(0)
    layer = SwitchFeedForward(16, 32, 4, backend="padded", capacity_factor=1.0, group_size=8)
    s_c, s_e = _compiled_equals_eager(layer, torch.randn(4, 8, 16, requires_grad=True))
    assert float(s_e.dropped_fraction) > 0
    assert_close(s_c.balance_loss, s_e.balance_loss)


def test_grouped_backend_compiles_with_fullgraph_and_equals_eager():
    # The CPU's per-expert matmuls read the rows per expert on the host; compiled, the segment_mm custom op does it
    # inside itself, so the whole layer (dropping tokens, capacity groups, gated experts) traces into one graph.
    torch.manual_seed(0)
    layer = SwitchFeedForward(16, 32, 4, backend="grouped", capacity_factor=1.0, group_size=8, activation="geglu")
    _, s = _compiled_equals_eager(layer, torch.randn(4, 8, 16, requires_grad=True))
    assert float(s.dropped_fraction) > 0


def test_a_dropless_layer_compiles_with_fullgraph_on_the_grouped_layout():
    torch.manual_seed(1)
    layer = SwitchFeedForward(16, 32, 4, capacity_factor=None)
    assert layer.resolve_backend(torch.randn(2, 16)) == "grouped"
    _, s = _compiled_equals_eager(layer, torch.randn(4, 8, 16, requires_grad=True))
    assert float(s.dropped_fraction) == 0
