"""The Switch layer's semantics: output = gate × expert(x) for kept tokens, zero for dropped and padded tokens,
statistics, train/eval capacity, dtypes, initialisation and dropout."""
import math

import pytest
import torch
from torch.testing import assert_close

from switch_core import FeedForward, SwitchFeedForward

T, D, F, E = 16, 8, 16, 4


def _layer(**kw):
    torch.manual_seed(0)
    return SwitchFeedForward(D, F, E, **kw)


def test_shapes_and_parameter_layout():
    layer = _layer(top_k=2, bias=True)
    assert layer.router.weight.shape == (E, D)
    assert layer.experts.w_in.shape == (E, D, F) and layer.experts.w_out.shape == (E, F, D)
    assert layer.experts.b_in.shape == (E, F) and layer.experts.b_out.shape == (E, D)
    x = torch.randn(2, 3, T // 2, D)
    y, s = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert s.expert_index.shape == (2, 3, T // 2, 2) and s.gates.shape == (2, 3, T // 2, 2)
    assert s.router_probs.shape == (2, 3, T // 2, E) and s.counts.shape == (E,)
    assert s.counts.dtype == torch.long and int(s.counts.sum()) == 2 * 3 * T // 2


def test_kept_token_output_is_gate_times_its_expert():
    layer = _layer(capacity_factor=None)
    x = torch.randn(T, D)
    y, s = layer(x)
    probs = torch.softmax(x @ layer.router.weight.T, -1)
    gate, expert = probs.max(-1)
    expected = torch.stack([gate[t] * layer.experts.ffn(x[t : t + 1], int(expert[t]))[0] for t in range(T)])
    assert_close(y, expected)
    assert_close(s.gates.squeeze(-1), gate)
    assert torch.equal(s.expert_index.squeeze(-1), expert)


def test_dropped_tokens_get_zero_output():
    layer = _layer(capacity_factor=0.25)  # capacity = ceil(0.25 * 16 / 4) = 1 token per expert
    x = torch.randn(T, D)
    y, s = layer(x)
    assert s.capacity == 1
    n_kept = int(s.kept_counts.sum())
    assert n_kept == int((s.counts > 0).sum())  # one token per expert that was chosen at all
    zero_rows = (y == 0).all(-1)
    assert int(zero_rows.sum()) == T - n_kept
    assert_close(s.dropped_fraction, torch.tensor((T - n_kept) / T))
    # position policy: for each expert the earliest token that chose it is the one kept
    for e in range(E):
        chose = (s.expert_index.squeeze(-1) == e).nonzero().flatten().tolist()
        if chose:
            assert not zero_rows[chose[0]] and all(zero_rows[t] for t in chose[1:])


def test_padded_tokens_are_not_routed_and_do_not_count():
    layer = _layer(capacity_factor=1.0)
    x = torch.randn(T, D)
    mask = torch.ones(T, dtype=torch.bool)
    mask[::4] = False
    y, s = layer(x, token_mask=mask)
    assert (y[~mask] == 0).all()
    assert int(s.counts.sum()) == int(mask.sum())
    assert (s.expert_index[~mask] == -1).all() and (s.gates[~mask] == 0).all()
    # capacity still counts all T tokens of the call; the real tokens equal a call on the real tokens alone
    # whenever nothing is dropped in either call
    layer_nd = _layer(capacity_factor=None)
    y_nd, s_nd = layer_nd(x, token_mask=mask)
    y_real, s_real = layer_nd(x[mask])
    assert_close(y_nd[mask], y_real)
    assert_close(s_nd.balance_loss, s_real.balance_loss)
    assert_close(s_nd.z_loss, s_real.z_loss)
    assert torch.equal(s_nd.counts, s_real.counts)


def test_all_tokens_padded():
    layer = _layer()
    y, s = layer(torch.randn(T, D), token_mask=torch.zeros(T, dtype=torch.bool))
    assert (y == 0).all() and int(s.counts.sum()) == 0
    assert s.dropped_fraction.item() == 0.0 and s.balance_loss.item() == 0.0 and s.z_loss.item() == 0.0


def test_train_and_eval_capacity_factors():
    layer = _layer(capacity_factor=1.0, eval_capacity_factor=2.0)
    x = torch.randn(T, D)
    assert layer.train()(x)[1].capacity == 4
    assert layer.eval()(x)[1].capacity == 8


def test_dropless_drops_nothing_even_when_routing_collapses():
    layer = _layer(capacity_factor=None)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0  # every positive-sum token prefers expert 2
    x = torch.randn(T, D).abs()
    y, s = layer(x)
    assert s.counts.tolist() == [0, 0, T, 0] and s.dropped_fraction.item() == 0.0
    assert not (y == 0).all(-1).any()


def test_stats_losses_match_the_definitions():
    layer = _layer()
    x = torch.randn(T, D)
    _, s = layer(x)
    logits = x @ layer.router.weight.T
    probs = logits.softmax(-1)
    f = torch.bincount(probs.argmax(-1), minlength=E).float() / T
    assert_close(s.balance_loss, E * (f * probs.mean(0)).sum())
    assert_close(s.z_loss, torch.logsumexp(logits, -1).square().mean())
    assert s.balance_loss.dtype == s.z_loss.dtype == torch.float32


def test_bfloat16_input_keeps_router_in_float32():
    layer = _layer()
    x = torch.randn(T, D).bfloat16()
    y, s = layer(x)
    assert y.dtype == torch.bfloat16
    assert s.router_probs.dtype == s.gates.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32, s32 = layer(torch.randn(T, D))
    assert y32.dtype == torch.float32 and s32.router_logits.dtype == torch.float32


def test_init_is_truncated_normal_with_scaled_std_and_independent_experts():
    torch.manual_seed(0)
    layer = SwitchFeedForward(64, 256, 8, init_scale=0.1)
    for w, fan_in in ((layer.experts.w_in, 64), (layer.experts.w_out, 256), (layer.router.weight, 64)):
        std = math.sqrt(0.1 / fan_in)
        assert w.abs().max() <= 2 * std + 1e-7
        # a normal truncated at 2 std has std ~= 0.88 of the untruncated one
        assert 0.80 * std < w.std().item() < 0.95 * std
    w_in = layer.experts.w_in
    assert not torch.allclose(w_in[0], w_in[1])


def test_dropout_and_expert_dropout_act_only_in_training():
    x = torch.randn(T, D)
    for kw in ({"dropout": 0.5}, {"expert_dropout": 0.5}):
        layer = _layer(capacity_factor=None, **kw)
        ref = _layer(capacity_factor=None)
        layer.eval(), ref.eval()
        assert_close(layer(x)[0], ref(x)[0])
        layer.train()
        assert not torch.allclose(layer(x)[0], ref.train()(x)[0])


def test_gated_activation_adds_a_gate_projection():
    layer = _layer(activation="geglu", capacity_factor=None)
    assert layer.experts.w_gate.shape == (E, D, F)
    x = torch.randn(T, D)
    y, s = layer(x)
    e, g = int(s.expert_index[0, 0]), s.gates[0, 0]
    w_in, w_gate, w_out = layer.experts.w_in[e], layer.experts.w_gate[e], layer.experts.w_out[e]
    assert_close(y[0], g * ((torch.nn.functional.gelu(x[0] @ w_gate) * (x[0] @ w_in)) @ w_out))


def test_dense_feedforward_baseline():
    torch.manual_seed(0)
    ff = FeedForward(D, F, bias=True)
    x = torch.randn(3, T, D)
    expected = torch.relu(x @ ff.w_in.weight.T + ff.w_in.bias) @ ff.w_out.weight.T + ff.w_out.bias
    assert_close(ff(x), expected)
    assert ff.w_in.weight.abs().max() <= 2 * math.sqrt(0.1 / D) + 1e-7


def test_switch_with_one_expert_and_no_dropping_equals_gate_one_dense():
    layer = SwitchFeedForward(D, F, 1, capacity_factor=None)
    ff = FeedForward(D, F)
    with torch.no_grad():
        ff.w_in.weight.copy_(layer.experts.w_in[0].T)
        ff.w_out.weight.copy_(layer.experts.w_out[0].T)
    x = torch.randn(T, D)
    assert_close(layer(x)[0], ff(x))  # one expert: probability 1, so the gate is 1


def test_gradients_reach_the_router_through_the_gate():
    layer = _layer()
    y, _ = layer(torch.randn(T, D))
    y.square().sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend, bias, activation", [("loop", True, "relu"), ("padded", True, "relu"),
                                                      ("grouped", True, "geglu"), ("grouped", False, "gelu")])
def test_gradcheck_float64(backend, bias, activation):
    # grouped without bias or gate takes the CPU expert-by-expert path with its hand-written backward
    torch.manual_seed(0)
    layer = SwitchFeedForward(4, 6, 3, capacity_factor=1.0, top_k=2, bias=bias, activation=activation,
                              backend=backend).double()
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, True, False, True]])

    def f(x, *ps):
        y, s = torch.func.functional_call(layer, dict(zip(names, ps)), (x,), {"token_mask": mask})
        return y, s.balance_loss, s.z_loss

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["loop", "padded", "grouped", "auto"])
def test_a_non_finite_token_never_reaches_another_tokens_output(backend):
    # The repro: with capacity factor 0.5 most tokens are dropped; the padded backend used to read expert
    # 0's slot 0 for every dropped token and multiply it by a zero gate (NaN x 0 = NaN).
    torch.manual_seed(0)
    layer = SwitchFeedForward(16, 32, 4, backend=backend, capacity_factor=0.5)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 32, 16)
        x[0, 0] = bad
        x.requires_grad_()
        y, s = layer(x)
        assert torch.isfinite(y[1]).all() and torch.isfinite(y[0, 1:]).all()  # only the bad token itself
        assert float(s.dropped_fraction) > 0.4  # most of the 31 clean tokens around it were dropped
        y[1].sum().backward()  # nor does it reach another token's gradient
        assert torch.isfinite(x.grad[1]).all() and (x.grad[0, 1:] == 0).all()


@pytest.mark.parametrize("backend", ["loop", "padded", "grouped", "auto"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_empty_input_gives_an_empty_output_and_zero_statistics(backend, top_k):
    layer = _layer(backend=backend, top_k=top_k)
    x = torch.randn(0, 5, D, requires_grad=True)
    y, s = layer(x)
    assert y.shape == x.shape and s.expert_index.shape == (0, 5, top_k) and s.router_probs.shape == (0, 5, E)
    assert s.counts.tolist() == [0] * E and s.kept_counts.tolist() == [0] * E
    for value in (s.balance_loss, s.z_loss, s.dropped_fraction):
        assert float(value.detach()) == 0.0
    (y.sum() + s.balance_loss + s.z_loss).backward()
    assert x.grad.shape == x.shape


def test_router_dtype_bfloat16_rounds_the_router_and_nothing_else():
    layer = _layer(router_dtype="bfloat16", capacity_factor=None)
    x = torch.randn(T, D)
    y, s = layer(x)
    assert s.router_logits.dtype == torch.bfloat16 and s.gates.dtype == torch.bfloat16
    assert y.dtype == torch.float32
    expected = x.bfloat16() @ layer.router.weight.bfloat16().T
    assert torch.equal(s.router_logits, expected)
    ref = _layer(capacity_factor=None)  # same weights (same seed), float32 router
    y32, s32 = ref(x)
    assert s32.router_logits.dtype == torch.float32
    same = s.expert_index == s32.expert_index
    assert_close(y[same.squeeze(-1)], y32[same.squeeze(-1)], atol=1e-2, rtol=1e-2)  # gates differ by rounding
    with pytest.raises(ValueError, match="router_dtype"):
        _layer(router_dtype="int8")


@pytest.mark.parametrize("backend", ["loop", "padded", "grouped", "auto"])
@pytest.mark.parametrize("top_k, activation", [(1, "relu"), (2, "relu"), (1, "geglu")])
def test_a_padded_token_influences_nothing_whatever_it_holds(backend, top_k, activation):
    # A NaN or inf in a padded position used to reach the router: its logits and probabilities came out NaN
    # and, through the softmax's backward (0 x NaN), so did the router's weight gradient.
    torch.manual_seed(0)
    layer = SwitchFeedForward(16, 32, 4, backend=backend, capacity_factor=0.5, top_k=top_k, activation=activation)
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[0, :3] = mask[1, -2:] = False

    def run(fill):
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        x = torch.randn(2, 32, 16)
        x[~mask] = fill
        x.requires_grad_()
        y, s = layer(x, token_mask=mask)
        (y.square().sum() + s.balance_loss + s.z_loss).backward()
        return y, s, x.grad, {n: p.grad for n, p in layer.named_parameters()}

    y0, s0, gx0, g0 = run(0.0)
    for fill in (float("nan"), float("inf"), -float("inf"), 3e38):
        y, s, gx, g = run(fill)
        assert torch.equal(y, y0) and (y[~mask] == 0).all()
        for field in ("counts", "kept_counts", "balance_loss", "z_loss", "dropped_fraction", "expert_index", "gates",
                      "router_probs", "router_logits"):
            assert torch.equal(getattr(s, field), getattr(s0, field)), (fill, field)
        assert torch.equal(gx, gx0) and (gx[~mask] == 0).all()
        for name in g0:
            assert torch.isfinite(g[name]).all() and torch.equal(g[name], g0[name]), (fill, name)


@pytest.mark.parametrize("backend", ["loop", "padded", "grouped", "auto"])
@pytest.mark.parametrize("top_k, activation", [(1, "relu"), (2, "relu"), (1, "geglu"), (2, "swiglu")])
def test_a_dropped_token_gets_exactly_zero_even_when_its_own_input_is_not_finite(backend, top_k, activation):
    # A NaN token's gate is NaN; combine used to multiply its zeroed row by that gate (0 x NaN = NaN), so a dropped
    # NaN token came out NaN in every backend but the CPU fast path.
    torch.manual_seed(0)
    layer = SwitchFeedForward(16, 32, 4, backend=backend, capacity_factor=0.25, top_k=top_k, activation=activation)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(64, 16)
        x[-1, 3] = bad  # the last token: over capacity (position policy, at most 4·top_k slots, 63 tokens before)
        y, s = layer(x)
        assert all(int(s.counts[e]) >= 4 * top_k + 1 for e in s.expert_index[-1].tolist())
        assert (y[-1] == 0).all() and torch.isfinite(y).all(), bad


def test_a_dropped_non_finite_token_leaves_the_grouped_matmuls_weight_gradient_finite(monkeypatch):
    # On an accelerator grouped_mm stretches the last expert's group over the spare rows (the dropped and padded
    # assignments, see experts._gmm), so whatever those rows hold enters that expert's weight gradient as 0 x row.
    # Emulated here on the CPU: a dropped NaN token must not make it NaN.
    from switch_core import experts

    def stretched_gmm(x_SD, w_EDF, offs_E):
        return experts.segment_mm(x_SD, w_EDF, torch.cat([offs_E[:-1], offs_E.new_full((1,), x_SD.shape[0])]))

    monkeypatch.setattr(experts, "_gmm", stretched_gmm)
    torch.manual_seed(0)
    layer = SwitchFeedForward(16, 32, 4, backend="grouped", capacity_factor=0.25, activation="geglu")
    x = torch.randn(64, 16)
    x[-1] = float("nan")  # the last token: over capacity (position policy, 4 slots per expert, 63 tokens before)
    y, s = layer(x)
    assert (s.counts >= 5).all()  # whichever expert the NaN token picked, it had no slot left
    assert torch.isfinite(y[:-1]).all()
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        if name.startswith("experts."):
            assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("backend", ["loop", "padded", "grouped", "auto"])
@pytest.mark.parametrize("shape", [(0, D), (3, 0, D), (0, 0, D)])
def test_empty_input_of_any_shape_with_mask_groups_and_policies(backend, shape):
    # Issue 11, item 8: `layer(torch.randn(0, 16))` raised ZeroDivisionError.
    for top_k, policy, group_size, cf, activation, dtype in [(1, "position", None, 1.0, "relu", torch.float32),
                                                             (2, "priority", 3, None, "geglu", torch.float64),
                                                             (2, "random", 1, 0.5, "relu", torch.bfloat16)]:
        layer = _layer(backend=backend, top_k=top_k, drop_policy=policy, group_size=group_size, capacity_factor=cf,
                       activation=activation).to(dtype)
        x = torch.randn(*shape, dtype=dtype, requires_grad=True)
        for mask in (None, torch.ones(shape[:-1], dtype=torch.bool)):
            y, s = layer(x, token_mask=mask)
            assert y.shape == x.shape and y.dtype == dtype
            assert s.expert_index.shape == (*shape[:-1], top_k) and s.router_probs.shape == (*shape[:-1], E)
            assert s.counts.tolist() == [0] * E and s.kept_counts.tolist() == [0] * E
            for value in (s.balance_loss, s.z_loss, s.dropped_fraction):
                assert float(value.detach()) == 0.0
            layer.zero_grad(set_to_none=True)
            (y.sum() + s.balance_loss + s.z_loss).backward()
            assert all(p.grad is None or torch.isfinite(p.grad).all() for p in layer.parameters())
