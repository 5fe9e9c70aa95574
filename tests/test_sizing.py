"""switch_core.sizing: hand-counted tiny models, and the paper's stated totals."""
from dataclasses import replace

import pytest

from switch_core import sizing
from switch_core.sizing import TABLE9, Layout, PaperConfig

# d_model 2, d_ff 3, heads·d_kv 2, one block per stack, vocab 5, ReLU. By hand:
#   embedding 5·2 = 10
#   encoder: attention 4 · 2·2 = 16, norms 2·(2·1 + 1) = 6, relative bias 32·2 = 64, FFN 2·3 + 3·2 = 12 -> 98
#   decoder: two attentions 32, norms 2·(3·1 + 1) = 8, relative bias 64, FFN 12                      -> 116
TINY = PaperConfig("tiny", d_model=2, d_ff=3, d_kv=1, n_heads=2, n_layers=1, vocab_size=5, geglu=False)
TINY_TOTAL = 10 + 98 + 116
# Every FFN a Switch layer with 4 experts: each stack swaps its FFN (12) for a router 2·4 = 8 and 4 experts of 12.
TINY_SWITCH = replace(TINY, n_experts=4, expert_every=1)


def test_dense_tiny_model_by_hand():
    p = sizing.parameters(TINY)
    assert p == {"total": TINY_TOTAL, "experts": 0, "dense": TINY_TOTAL, "per_token": TINY_TOTAL}


def test_switch_tiny_model_by_hand():
    p = sizing.parameters(TINY_SWITCH)
    assert p["experts"] == 2 * 4 * 12
    assert p["dense"] == TINY_TOTAL - 2 * 12 + 2 * 8
    assert p["total"] == p["dense"] + p["experts"]
    assert p["per_token"] == p["dense"] + 2 * 12  # one expert per stack


def test_geglu_adds_a_matrix_per_ffn():
    assert sizing.parameters(replace(TINY, geglu=True))["total"] == TINY_TOTAL + 2 * 2 * 3


def test_untied_embeddings_add_an_output_matrix():
    assert sizing.parameters(replace(TINY, tied_embeddings=False))["total"] == TINY_TOTAL + 2 * 5


def test_every_other_block_is_switch():
    cfg = replace(TINY, n_layers=4, n_experts=4, expert_every=2)
    assert cfg.switch_layers_per_stack == 2 and cfg.switch_layers == 4
    assert [w.copies for w in sizing.weights(cfg) if w.name == "encoder.ffn.wi"] == [2]
    assert [w.copies for w in sizing.weights(cfg) if w.name == "encoder.expert.wi"] == [2 * 4]


def test_flops_per_token_by_hand():
    # encoder: q k v o 4·2·2 = 16, FFN 12, cross-attention k v of this row 2·2·2 = 8 -> 36 MACs
    # decoder: self q k v o + cross q o 6·2·2 = 24, FFN 12, logits 2·5 = 10 -> 46 MACs
    assert sizing.flops_per_token(TINY) == {"encoder": 72, "decoder": 92}
    # Switch: the same FLOPs plus the router (2·4 MACs per token per Switch layer)
    assert sizing.flops_per_token(TINY_SWITCH) == {"encoder": 72 + 16, "decoder": 92 + 16}


def test_flops_per_sequence_by_hand():
    # 3 inputs, 2 targets; scores and weighted sums 2·2·(heads·d_kv = 2) per pair, 9 + 4 + 6 pairs
    assert sizing.flops_per_sequence(TINY, 3, 2) == 3 * 72 + 2 * 92 + 8 * 19


@pytest.mark.parametrize("name", ["T5-Base", "T5-XXL", "Switch-Base", "Switch-C"])
def test_paper_totals_within_one_percent(name):
    total = sizing.parameters(TABLE9[name])["total"]
    assert abs(total / sizing.STATED_PARAMS[name] - 1) < 0.01


def test_switch_xxl_as_printed_is_half_the_stated_size():
    stated = sizing.STATED_PARAMS["Switch-XXL"]
    assert sizing.parameters(TABLE9["Switch-XXL"])["total"] < 0.55 * stated
    for fix in (dict(n_experts=128), dict(expert_every=1)):
        total = sizing.parameters(replace(TABLE9["Switch-XXL"], **fix))["total"]
        assert abs(total / stated - 1) < 0.01


def test_switch_base_costs_t5_base_flops_plus_router():
    t5, sw = (sizing.flops_per_token(TABLE9[n]) for n in ("T5-Base", "Switch-Base"))
    router = 2 * 6 * 768 * 128  # 6 Switch layers per stack, 2 FLOPs per multiply-add
    assert sw == {"encoder": t5["encoder"] + router, "decoder": t5["decoder"] + router}


def test_memory_per_device_by_hand():
    p = sizing.parameters(TINY_SWITCH)
    one = sizing.memory_per_device(TINY_SWITCH, Layout(), tokens_per_batch=16)
    assert one["parameters"] == 4 * p["total"] and one["optimizer"] == 8 * p["total"]
    ep = sizing.memory_per_device(TINY_SWITCH, Layout(n_data=2, expert=True), tokens_per_batch=16)
    assert ep["parameters"] == 4 * (p["dense"] + p["experts"] / 2)  # half the experts, all the rest
    mp = sizing.memory_per_device(TINY_SWITCH, Layout(n_data=2, n_model=2, expert=True), tokens_per_batch=16)
    assert mp["parameters"] == ep["parameters"] / 2
    assert ep["total"] == ep["parameters"] + ep["gradients"] + ep["optimizer"]
    sgd = sizing.memory_per_device(TINY_SWITCH, Layout(), tokens_per_batch=16, optimizer="sgd")
    assert sgd["optimizer"] == 0


def test_adafactor_is_factored():
    # one [5, 2] embedding: 5 + 2 floats instead of 2·10 for Adam's two moments
    emb = [w for w in sizing.weights(TINY) if w.name == "embedding"]
    assert emb == [sizing.Weight("embedding", (5, 2), 1)]
    big = TABLE9["Switch-C"]
    layout = Layout(n_data=2048, expert=True)
    ada = sizing.memory_per_device(big, layout, optimizer="adafactor")["optimizer"]
    adam = sizing.memory_per_device(big, layout, optimizer="adam")["optimizer"]
    assert ada < adam / 100


def test_dispatch_rows_by_hand():
    # 16 tokens over 2 groups: 8 per core; 4 experts; C = ceil(CF · 8 / 4)
    layout = Layout(n_data=2, expert=True)
    assert sizing.dispatch_rows(TINY_SWITCH, layout, 16, 1.0) == 4 * 2
    assert sizing.dispatch_rows(TINY_SWITCH, layout, 16, 1.25) == 4 * 3
    assert sizing.dispatch_rows(TINY_SWITCH, layout, 16, 1.25, padded=False) == 8
    assert sizing.dispatch_rows(TINY_SWITCH, Layout(2, 2, True), 16, 1.0) == 4
    assert sizing.dispatch_rows(TINY, Layout(), 16) == 0


def test_all_to_all_bytes_by_hand():
    # 4 all-to-alls × 2 Switch layers × 8 rows × d_model 2 × 2 bytes × half of it off the core
    layout = Layout(n_data=2, expert=True)
    assert sizing.all_to_all_bytes_per_step(TINY_SWITCH, layout, 16) == 4 * 2 * 8 * 2 * 2 / 2
    assert sizing.all_to_all_bytes_per_step(TINY_SWITCH, Layout(n_data=2), 16) == 0  # experts are local


def test_layout_names():
    assert Layout().name == "one device"
    assert Layout(n_data=8).name == "data"
    assert Layout(n_model=8).name == "model"
    assert Layout(n_data=4, n_model=2).name == "model + data"
    assert Layout(n_data=4, expert=True).name == "expert + data"
    assert Layout(4, 2, True).name == "expert + model + data" and Layout(4, 2, True).n_devices == 8


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(d_model=0), ValueError, "d_model"),
    (dict(d_ff=2.0), TypeError, "d_ff"),
    (dict(n_experts=4), ValueError, "expert_every"),
    (dict(n_experts=2, expert_every=1, top_k=3), ValueError, "top_k"),
    (dict(geglu=1), TypeError, "geglu"),
    (dict(n_experts=-1), ValueError, "n_experts"),
])
def test_bad_config(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        replace(TINY, **kwargs)


@pytest.mark.parametrize("call, exc, name", [
    (lambda: Layout(n_data=0), ValueError, "n_data"),
    (lambda: Layout(n_model=1.5), TypeError, "n_model"),
    (lambda: Layout(expert="yes"), TypeError, "expert"),
    (lambda: sizing.memory_per_device(TINY_SWITCH, Layout(), tokens_per_batch=16, optimizer="lamb"),
     ValueError, "optimizer"),
    (lambda: sizing.memory_per_device(TINY_SWITCH, "data", tokens_per_batch=16), TypeError, "layout"),
    (lambda: sizing.memory_per_device(TINY_SWITCH, Layout(n_data=3), tokens_per_batch=16), ValueError,
     "tokens_per_batch"),
    (lambda: sizing.memory_per_device(TINY, Layout(n_data=2, expert=True), tokens_per_batch=16), ValueError,
     "n_experts"),
    (lambda: sizing.memory_per_device(TINY_SWITCH, Layout(n_data=8, expert=True), tokens_per_batch=16),
     ValueError, "n_experts"),
    (lambda: sizing.dispatch_rows(TINY_SWITCH, Layout(), 16, capacity_factor=0), ValueError, "capacity_factor"),
    (lambda: sizing.flops_per_sequence(TINY, 0, 2), ValueError, "inputs_length"),
])
def test_bad_arguments(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
