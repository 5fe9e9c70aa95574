"""Bad arguments get a ValueError/TypeError that names the argument, before any compute."""
import pytest
import torch

from switch_core import FeedForward, SwitchFeedForward


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"n_experts": 0}, ValueError, "n_experts"),
        ({"n_experts": 2.0}, TypeError, "n_experts"),
        ({"capacity_factor": 0}, ValueError, "capacity_factor"),
        ({"capacity_factor": -1.0}, ValueError, "capacity_factor"),
        ({"eval_capacity_factor": 0.0}, ValueError, "eval_capacity_factor"),
        ({"capacity_factor": "1"}, TypeError, "capacity_factor"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_k": 5}, ValueError, "top_k"),
        ({"drop_policy": "oldest"}, ValueError, "drop_policy"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"activation": "tanh"}, ValueError, "activation"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"expert_dropout": -0.1}, ValueError, "expert_dropout"),
        ({"jitter_eps": 1.5}, ValueError, "jitter_eps"),
        ({"init_scale": 0.0}, ValueError, "init_scale"),
        ({"d_model": 0}, ValueError, "d_model"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, name):
    args = {"d_model": 8, "d_ff": 16, "n_experts": 4}
    args.update(kwargs)
    d_model, d_ff, n_experts = args.pop("d_model"), args.pop("d_ff"), args.pop("n_experts")
    with pytest.raises(exc, match=name):
        SwitchFeedForward(d_model, d_ff, n_experts, **args)


@pytest.mark.parametrize(
    "x, mask, exc, name",
    [
        (torch.randn(4, 7), None, ValueError, "x"),                      # last dim is not d_model
        (torch.tensor(1.0), None, ValueError, "x"),                      # a scalar
        (torch.ones(4, 8, dtype=torch.long), None, TypeError, "x"),      # not floating point
        ([[0.0] * 8], None, TypeError, "x"),                             # not a tensor
        (torch.randn(4, 8), torch.ones(5, dtype=torch.bool), ValueError, "token_mask"),
        (torch.randn(4, 8), torch.ones(4), TypeError, "token_mask"),     # float mask
    ],
)
def test_bad_forward_inputs(x, mask, exc, name):
    layer = SwitchFeedForward(8, 16, 4)
    with pytest.raises(exc, match=name):
        layer(x, token_mask=mask)


def test_bad_dense_arguments():
    with pytest.raises(ValueError, match="activation"):
        FeedForward(8, 16, activation="tanh")
    with pytest.raises(ValueError, match="x"):
        FeedForward(8, 16)(torch.randn(3, 9))
