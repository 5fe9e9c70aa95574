"""Hugging Face interop: SwitchTransformersSparseMLP <-> SwitchFeedForward on randomly initialised layers (no
download). Outputs, router probabilities, expert choices and dropped tokens equal HF's, in eval and training mode
(jitter off), and gradients too; what cannot be represented is refused by name."""
import pytest
import torch
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")
from transformers import SwitchTransformersConfig  # noqa: E402
from transformers.models.switch_transformers.modeling_switch_transformers import (  # noqa: E402
    SwitchTransformersSparseMLP,
)

from switch_core import SwitchFeedForward  # noqa: E402
from switch_core.hf import NotRepresentable, from_hf, to_hf  # noqa: E402

B, S, D, F, E = 3, 16, 16, 32, 4


def hf_mlp(capacity=3, act="relu", **kw):
    torch.manual_seed(0)
    cfg = SwitchTransformersConfig(d_model=D, d_ff=F, num_experts=E, expert_capacity=capacity, dropout_rate=0.0,
                                   router_jitter_noise=0.0, dense_act_fn=act, **kw)
    mlp = SwitchTransformersSparseMLP(cfg)
    with torch.no_grad():  # HF's init leaves the router at zero-mean small weights: make routing decisive
        mlp.router.classifier.weight.normal_(0, 1.0)
        for p in mlp.experts.parameters():
            p.normal_(0, 0.3)
    return mlp


def hf_reference(mlp, x):
    """HF's outputs, router probabilities and the kept expert per token (-1 where dropped)."""
    y = mlp(x)
    kept_onehot, _, logits = mlp.router(x)
    kept = torch.where(kept_onehot.sum(-1) > 0, kept_onehot.argmax(-1), -1)
    return y, torch.softmax(logits.float(), -1), kept


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("backend", ["loop", "padded", "grouped"])
def test_from_hf_computes_what_hf_computes(training, act, backend):
    mlp = hf_mlp(act=act).train(training)
    layer = from_hf(mlp, seq_len=S, backend=backend)
    assert layer.training == training and layer.group_size == S
    x = torch.randn(B, S, D, requires_grad=True)
    y_hf, probs_hf, kept_hf = hf_reference(mlp, x)
    y, s = layer(x)
    assert_close(y, y_hf)
    assert_close(s.router_probs, probs_hf)
    assert torch.equal(s.expert_index[..., 0], probs_hf.argmax(-1))
    dropped = (y == 0).all(-1)
    assert torch.equal(dropped, kept_hf == -1) and dropped.any()  # capacity 3 of 16 tokens per sequence bites
    assert s.capacity == 3
    g = torch.randn_like(y)
    g_hf = torch.autograd.grad(y_hf, [x, mlp.router.classifier.weight, mlp.experts["expert_1"].wi.weight], g)
    g_sc = torch.autograd.grad(y, [x, layer.router.weight, layer.experts.w_in], g)
    assert_close(g_sc[0], g_hf[0])
    assert_close(g_sc[1], g_hf[1])
    assert_close(g_sc[2][1], g_hf[2].T)


def test_round_trip_through_hf_gives_the_same_layer():
    torch.manual_seed(0)
    layer = SwitchFeedForward(D, F, E, capacity_factor=1.0, eval_capacity_factor=1.0, group_size=S,
                              activation="gelu")
    mlp = to_hf(layer)
    assert mlp.router.expert_capacity == 4  # ceil(1.0 * 16 / 4)
    back = from_hf(mlp, seq_len=S)
    for (n, a), (_, b) in zip(layer.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randn(B, S, D)
    layer.eval(), mlp.eval()
    assert_close(layer(x)[0], mlp(x))


def test_to_hf_needs_a_sequence_length_when_the_layer_has_no_groups():
    layer = SwitchFeedForward(D, F, E, capacity_factor=1.25, eval_capacity_factor=1.25)
    with pytest.raises(NotRepresentable, match="seq_len"):
        to_hf(layer)
    assert to_hf(layer, seq_len=32).router.expert_capacity == 10  # ceil(1.25 * 32 / 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=2), "top_k"), (dict(activation="geglu"), "gated"), (dict(bias=True), "biases"),
    (dict(drop_policy="priority"), "drop_policy"), (dict(eval_capacity_factor=2.0), "eval capacity"),
    (dict(capacity_factor=None, eval_capacity_factor=None), "dropless"), (dict(dropout=0.1), "dropout")])
def test_what_hf_cannot_represent_is_refused_by_name(kwargs, match):
    base = dict(capacity_factor=1.0, eval_capacity_factor=1.0, group_size=S)
    with pytest.raises(NotRepresentable, match=match):
        to_hf(SwitchFeedForward(D, F, E, **{**base, **kwargs}))


def test_from_hf_refuses_a_router_bias_and_tanh_gelu():
    mlp = hf_mlp(router_bias=True)
    with torch.no_grad():
        mlp.router.classifier.bias.fill_(0.5)
    with pytest.raises(NotRepresentable, match="bias"):
        from_hf(mlp, seq_len=S)
    with pytest.raises(NotRepresentable, match="activation"):
        from_hf(hf_mlp(act="gelu_new"), seq_len=S)
    with pytest.raises(TypeError, match="SwitchTransformersSparseMLP"):
        from_hf(torch.nn.Linear(2, 2), seq_len=S)
    with pytest.raises(ValueError, match="seq_len"):
        from_hf(hf_mlp(), seq_len=0)
