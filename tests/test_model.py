"""The character LM: config validation, shapes, causality, padding, sampling, parameter and FLOP counts.

Tiny sizes throughout (T=16, D=16, E=4) so the file runs in a few seconds on CPU."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from switch_core.model import ModelConfig, SwitchLM, flops_per_token, parameter_counts

TINY = dict(vocab_size=11, seq_len=16, n_layer=4, n_head=2, d_model=16, d_ff=32, n_experts=4)

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(**overrides) -> SwitchLM:
    torch.manual_seed(0)
    return SwitchLM(ModelConfig(**{**TINY, **overrides}))


@pytest.mark.parametrize("field, value", [
    ("n_layer", 0), ("d_model", -8), ("n_head", 3), ("n_experts", 0), ("top_k", 5), ("switch_every", -1),
    ("capacity_factor", 0.0), ("eval_capacity_factor", float("nan")), ("dropout", 1.0), ("jitter_eps", -0.1),
    ("init_scale", 0), ("drop_policy", "oldest"), ("activation", "tanh"), ("backend", "cuda"), ("bias", "no"),
    ("seq_len", 2.5),
])
def test_config_rejects_bad_value_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**TINY, field: value})


def test_config_round_trips_through_dict_and_rejects_unknown_keys():
    cfg = ModelConfig(**TINY)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="n_expert"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_expert": 3})


@pytest.mark.parametrize("switch_every, switch_blocks", [(0, []), (1, [0, 1, 2, 3]), (2, [1, 3]), (4, [3])])
def test_switch_placement_and_one_stats_per_switch_layer(switch_every, switch_blocks):
    model = tiny(switch_every=switch_every)
    assert model.switch_layers == switch_blocks
    logits, stats = model(torch.randint(0, 11, (3, 16)))
    assert logits.shape == (3, 16, 11) and logits.dtype == torch.float32
    assert len(stats) == len(switch_blocks)
    for s in stats:
        assert s.counts.shape == (4,) and s.counts.sum() == 3 * 16
        assert s.expert_index.shape == (3, 16, 1) and s.router_probs.shape == (3, 16, 4)
        assert s.balance_loss.dim() == s.z_loss.dim() == s.dropped_fraction.dim() == 0


def test_sequence_longer_than_seq_len_is_refused():
    with pytest.raises(ValueError, match="seq_len"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


# Causality: changing token t must not change the logits at positions < t. With a finite capacity this does
# NOT hold for a Switch model: capacity is shared by every token in the batch, so a changed future token can be
# routed to a different expert and take (or free) a slot that an earlier token -- of this or another sequence --
# needed, changing whether that token is dropped. So test it with the dense FFN and with dropless Switch
# (capacity_factor=None), where each token's output depends only on its own past.
@pytest.mark.parametrize("overrides", [dict(switch_every=0), dict(switch_every=1, capacity_factor=None)],
                         ids=["dense", "dropless_switch"])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(overrides):
    model = tiny(**overrides)
    idx = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 11
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(after[:, :9], before[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 9:], before[:, 9:])


def test_padding_mask_reaches_every_router():
    model = tiny(switch_every=2)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False  # right padding in the second sequence
    _, stats = model(torch.randint(0, 11, (2, 16)), token_mask=mask)
    for s in stats:
        assert (s.expert_index[1, 10:] == -1).all() and (s.expert_index[mask] >= 0).all()
        assert s.counts.sum() == mask.sum()  # padding is not routed


def test_padding_tokens_do_not_change_real_tokens():
    # Left padding: real tokens must see neither the padding's ids (attention mask) nor be displaced from an
    # expert by it (padding takes no capacity), so the real tokens' logits ignore what the padding holds.
    model = tiny(switch_every=1, capacity_factor=1.0)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[:, :5] = False
    idx = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(2))
    other = idx.clone()
    other[:, :5] = (idx[:, :5] + 3) % 11
    a, b = model(idx, token_mask=mask)[0], model(other, token_mask=mask)[0]
    assert torch.isfinite(a).all()  # padding rows (which see only padding) stay finite
    torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=1e-6)


def test_token_mask_with_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="token_mask"):
        tiny()(torch.zeros(2, 8, dtype=torch.long), token_mask=torch.ones(2, 7, dtype=torch.bool))


def test_generate_extends_past_seq_len_deterministically_and_restores_mode():
    model = tiny(switch_every=2)
    prompt = torch.zeros(2, 3, dtype=torch.long)
    out1 = model.generate(prompt, 20, top_k=5, generator=torch.Generator().manual_seed(0))
    out2 = model.generate(prompt, 20, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out1.shape == (2, 23) and torch.equal(out1, out2) and torch.equal(out1[:, :3], prompt)
    assert model.training  # generate switched to eval and back
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=0)


def test_head_is_tied_to_the_token_embedding():
    model = tiny(switch_every=0)
    names = [n for n, _ in model.named_parameters()]
    assert not any("head" in n for n in names)
    assert model.tok_emb.weight.grad is None
    model(torch.randint(0, 11, (1, 4)))[0].sum().backward()
    assert model.tok_emb.weight.grad is not None


def test_switch_model_costs_dense_flops_plus_router():
    dense, switch = ModelConfig(**TINY, switch_every=0), ModelConfig(**TINY, switch_every=2)
    D, E = TINY["d_model"], TINY["n_experts"]
    # 2 Switch blocks, each adds a D x E router matmul (2 FLOPs per multiply-add, x3 for forward + backward).
    assert flops_per_token(switch) - flops_per_token(dense) == 2 * (2 * D * E) * 3
    assert flops_per_token(dense, training=False) * 3 == flops_per_token(dense)


def test_dense_flops_by_hand():
    cfg = ModelConfig(vocab_size=10, seq_len=4, n_layer=1, n_head=1, d_model=2, d_ff=8, switch_every=0)
    # qkv + proj 4*2*2=16, attention 2*4*2=16, ffn 2*2*8=32, head 2*10=20 -> 84 MACs, 168 FLOPs forward.
    assert flops_per_token(cfg, training=False) == 168


def test_parameter_counts_total_and_active():
    dense, switch = tiny(switch_every=0), tiny(switch_every=2)
    D, F, E = TINY["d_model"], TINY["d_ff"], TINY["n_experts"]
    ffn, router = 2 * D * F, D * E  # no biases by default
    assert switch.num_parameters() == dense.num_parameters() + 2 * ((E - 1) * ffn + router)
    assert switch.num_parameters(active=True) == dense.num_parameters() + 2 * router
    assert dense.num_parameters(active=True) == dense.num_parameters()
    top2 = tiny(switch_every=2, top_k=2)
    assert top2.num_parameters(active=True) == dense.num_parameters() + 2 * (ffn + router)


def test_router_gets_gradient_from_the_language_model_loss():
    model = tiny(switch_every=2)
    logits, stats = model(torch.randint(0, 11, (2, 16)))
    (logits.logsumexp(-1).mean() + sum(s.balance_loss for s in stats)).backward()
    for i in model.switch_layers:
        assert model.blocks[i].ffn.router.weight.grad.abs().sum() > 0


def test_config_is_a_plain_dataclass():
    assert dataclasses.is_dataclass(ModelConfig) and ModelConfig().vocab_size == 65


@pytest.mark.parametrize("overrides", [dict(switch_every=0), dict(switch_every=2), dict(switch_every=1, top_k=2),
                                       dict(bias=True, activation="geglu", switch_every=2)])
def test_parameter_counts_from_config_match_the_built_model(overrides):
    model = tiny(**overrides)
    counts = parameter_counts(model.cfg)
    assert counts == {"total": model.num_parameters(), "active": model.num_parameters(active=True)}
