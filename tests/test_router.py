"""The router (eq. 1): float32 logits, top-1 gate = max probability, top-k renormalised, input jitter."""
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
