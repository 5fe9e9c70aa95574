"""The router (eq. 1): float32 logits, top-1 gate = max probability, top-k renormalised, input jitter."""
import pytest
import torch
from torch.testing import assert_close

from switch_core import Router, route


def test_top1_gate_is_the_unrenormalised_max_probability():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    r = route(logits, top_k=1)
    probs = logits.softmax(-1)
    assert r.expert_TK.squeeze(1).tolist() == [0, 2]
    assert_close(r.gates_TK.squeeze(1), probs.max(-1).values)


def test_top2_gates_are_renormalised_over_the_chosen_experts():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    r = route(logits, top_k=2)
    assert r.expert_TK.tolist() == [[0, 1]]
    assert_close(r.gates_TK, torch.tensor([[0.5 / 0.8, 0.3 / 0.8]]))


def test_router_weight_shape_and_float32_logits_under_autocast():
    router = Router(d_model=8, n_experts=4)
    assert router.weight.shape == (4, 8)
    x = torch.randn(5, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router(x)
    assert logits.dtype == torch.float32
    assert_close(logits, x.float() @ router.weight.T)


def test_jitter_is_multiplicative_on_the_input_and_only_in_training():
    router = Router(d_model=4, n_experts=4, jitter_eps=0.1)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    x = torch.ones(1000, 4)
    router.train()
    logits = router(x)  # identity router: the logits are the jittered input, in [0.9, 1.1]
    assert logits.min() >= 0.9 and logits.max() <= 1.1 and logits.std() > 0.03
    router.eval()
    assert_close(router(x), x)


def _reference_top1(logits_TE):
    probs = logits_TE.softmax(-1)
    gates, expert = probs.max(-1)
    return probs, gates, expert, torch.logsumexp(logits_TE, -1)


@pytest.mark.parametrize("used", ["all", "probs", "gates", "lse", "gates+lse"])
def test_fused_top1_softmax_matches_softmax_max_logsumexp_forward_and_backward(used):
    # route() computes softmax, choice, gate and logsumexp in one autograd node with its own backward; it must
    # give what the separate ops give, whichever of its outputs the loss uses (the others get no gradient).
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(50, 7, generator=g, dtype=torch.float64)).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    r = route(logits)
    probs, gates, expert, lse = _reference_top1(ref_logits)
    assert_close(r.probs_TE, probs)
    assert_close(r.gates_TK[:, 0], gates)
    assert torch.equal(r.expert_TK[:, 0], expert)
    assert_close(r.lse_T, lse)
    w_p, w_g, w_l = (torch.randn(50, 7, generator=g, dtype=torch.float64), torch.randn(50, generator=g,
                     dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64))
    def loss(p, gt, lt):
        terms = {"probs": (p * w_p).sum(), "gates": (gt * w_g).sum(), "lse": (lt * w_l).sum()}
        return sum(terms[k] for k in terms if used == "all" or k in used.split("+"))
    loss(r.probs_TE, r.gates_TK[:, 0], r.lse_T).backward()
    loss(probs, gates, lse).backward()
    assert_close(logits.grad, ref_logits.grad)


def test_fused_top1_softmax_passes_gradcheck_and_gradgradcheck():
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    def f(l):
        r = route(l)
        return r.probs_TE, r.gates_TK, r.lse_T
    assert torch.autograd.gradcheck(f, (logits,))
    assert torch.autograd.gradgradcheck(f, (logits,))


def test_router_gradients_match_a_plain_linear_and_reach_x_contiguous():
    router = Router(d_model=8, n_experts=4).double()
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(10, 4, dtype=torch.float64)
    (router(x) * g).sum().backward()
    w = router.weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (torch.nn.functional.linear(x2, w) * g).sum().backward()
    assert_close(router.weight.grad, w.grad)
    assert_close(x.grad, x2.grad)
    assert x.grad.is_contiguous()
    # the router's own backward, checked numerically (first and second order)
    from switch_core.router import _RouterLogits
    w, x = w.detach().requires_grad_(), x.detach().requires_grad_()
    assert torch.autograd.gradcheck(_RouterLogits.apply, (w, x))
    assert torch.autograd.gradgradcheck(_RouterLogits.apply, (w, x))


def test_low_precision_router_dtype_keeps_the_separate_softmax():
    logits = torch.randn(20, 5).bfloat16()
    r = route(logits)
    assert r.probs_TE.dtype == torch.bfloat16
    assert_close(r.gates_TK[:, 0], r.probs_TE.max(-1).values)
    assert_close(r.lse_T, torch.logsumexp(logits, -1))
