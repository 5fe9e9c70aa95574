"""The load-balancing loss (Switch eq. 4-6) and the router z-loss (ST-MoE eq. 5), checked by hand."""
import math

import torch
from torch.testing import assert_close

from switch_core import balance_loss, z_loss


def test_balance_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    first = probs.argmax(-1)  # [0, 0, 1, 0] -> f = [0.75, 0.25]; P = [0.6, 0.4]
    # N * sum f_i P_i = 2 * (0.75 * 0.6 + 0.25 * 0.4) = 1.1
    assert_close(balance_loss(probs, first), torch.tensor(1.1))


def test_balance_loss_is_one_under_uniform_routing_for_any_n():
    for n in (1, 2, 8, 64):
        probs = torch.full((4 * n, n), 1.0 / n)
        first = torch.arange(4 * n) % n
        assert_close(balance_loss(probs, first), torch.tensor(1.0))


def test_balance_loss_gradient_flows_through_P_only():
    # d/dp_{t,i} [N * sum_i f_i * mean_t p_{t,i}] = N * f_i / T: the argmax counts are constants.
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]], requires_grad=True)
    balance_loss(probs, probs.argmax(-1)).backward()
    expected_row = 2 * torch.tensor([0.75, 0.25]) / 4
    assert_close(probs.grad, expected_row.expand(4, 2))


def test_balance_loss_ignores_padding():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.0, 1.0]])
    mask = torch.tensor([True, True, False])
    # real tokens: f = [1, 0], P = [0.65, 0.35] -> 2 * 0.65 = 1.3
    assert_close(balance_loss(probs, probs.argmax(-1), mask), torch.tensor(1.3))


def test_balance_loss_with_no_real_tokens_is_zero_not_nan():
    probs = torch.full((3, 2), 0.5)
    assert balance_loss(probs, probs.argmax(-1), torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = [math.log(2.0), math.log(math.e + math.e**2)]
    assert_close(z_loss(logits), torch.tensor((lse[0] ** 2 + lse[1] ** 2) / 2))
    assert_close(z_loss(logits, torch.tensor([True, False])), torch.tensor(lse[0] ** 2))


def test_losses_are_float32_for_low_precision_inputs():
    logits = torch.randn(8, 4).bfloat16()
    assert z_loss(logits).dtype == torch.float32
    assert balance_loss(logits.softmax(-1), logits.argmax(-1)).dtype == torch.float32
