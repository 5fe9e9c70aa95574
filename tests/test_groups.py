"""Capacity groups (group_size): capacity, slot order, drops and the balance loss are per group of G consecutive
tokens, the same in every backend. Expected values worked out by hand."""
import pytest
import torch
from torch.testing import assert_close

from switch_core import SwitchFeedForward, balance_loss, dispatch
from switch_core.capacity import n_groups_of

BACKENDS = ("loop", "padded", "grouped", "auto")


def _plan(experts, capacity, group_size, n_experts=2, mask=None):
    expert_TK = torch.tensor(experts).view(len(experts), -1)
    return dispatch(expert_TK, torch.full(expert_TK.shape, 0.5), n_experts, capacity, group_size=group_size,
                    mask_T=None if mask is None else torch.tensor(mask))


def test_each_group_has_its_own_capacity_and_slots():
    # Groups of 3: (t0 t1 t2) and (t3 t4 t5). Group 0: expert 0 gets t0 (slot 0), t1 (slot 1: dropped), expert 1
    # gets t2. Group 1: expert 0 gets t3 (slot 0), expert 1 gets t4 (slot 0), t5 (slot 1: dropped).
    d = _plan([0, 0, 1, 0, 1, 1], capacity=1, group_size=3)
    assert d.slot_A.tolist() == [0, 1, 0, 0, 0, 1]
    assert d.keep_A.tolist() == [True, False, True, True, True, False]
    assert d.kept_GE.tolist() == [[1, 1], [1, 1]] and d.kept_E.tolist() == [2, 2]
    assert d.group_A.tolist() == [0, 0, 0, 1, 1, 1] and d.n_groups == 2
    # Rows in each expert's block: expert 0 holds t0 then t3, expert 1 holds t2 then t4.
    assert [int(d.rank_A[t]) for t in (0, 3, 2, 4)] == [0, 1, 0, 1]


def test_one_group_drops_the_later_tokens_groups_spread_the_drops():
    # The same routing as one group of 6 with capacity 2 (= 2 groups x 1): expert 0 keeps t0, t1 and drops t3;
    # expert 1 keeps t2, t4 and drops t5. With groups, t1 is dropped instead of t3.
    whole = _plan([0, 0, 1, 0, 1, 1], capacity=2, group_size=None)
    assert whole.keep_A.tolist() == [True, True, True, False, True, False]


def test_last_group_may_be_shorter_and_padding_takes_no_slot():
    # Groups of 4 over 6 tokens: (t0..t3), (t4 t5). t1 is padding: expert 0 keeps t0 and t2 (capacity 2), drops t3.
    d = _plan([0, 0, 0, 0, 0, 0], capacity=2, group_size=4, n_experts=1, mask=[True, False, True, True, True, True])
    assert d.keep_A.tolist() == [True, False, True, False, True, True]
    assert d.kept_GE.tolist() == [[2], [2]] and n_groups_of(6, 4) == 2 and d.group_tokens == 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k, policy, cf", [(1, "position", 0.5), (2, "position", 1.0), (1, "priority", 0.75),
                                               (2, "priority", None)])
def test_groups_of_one_sequence_equal_one_call_per_sequence(backend, top_k, policy, cf):
    torch.manual_seed(0)
    B, S, D, E = 3, 8, 8, 4
    grouped = SwitchFeedForward(D, 16, E, top_k=top_k, capacity_factor=cf, drop_policy=policy, backend=backend,
                                group_size=S)
    single = SwitchFeedForward(D, 16, E, top_k=top_k, capacity_factor=cf, drop_policy=policy, backend=backend)
    single.load_state_dict(grouped.state_dict())
    x = torch.randn(B, S, D, requires_grad=True)
    y, s = grouped(x)
    per_seq = [single(x[b]) for b in range(B)]
    assert_close(y, torch.stack([o[0] for o in per_seq]))
    assert torch.equal(s.kept_counts, sum(o[1].kept_counts for o in per_seq))
    assert torch.equal(s.counts, sum(o[1].counts for o in per_seq))
    assert_close(s.balance_loss, torch.stack([o[1].balance_loss for o in per_seq]).mean())
    assert s.capacity == per_seq[0][1].capacity
    # gradients too
    g_grouped = torch.autograd.grad(y.square().sum() + s.balance_loss, [x, grouped.router.weight])
    loss = sum(o[0].square().sum() for o in per_seq) + torch.stack([o[1].balance_loss for o in per_seq]).mean()
    g_single = torch.autograd.grad(loss, [x, single.router.weight])
    for a, b in zip(g_grouped, g_single):
        assert_close(a, b)


def test_grouped_balance_loss_is_the_mean_over_groups_with_real_tokens():
    # Group 0 (t0, t1): both pick expert 0 with p = (1, 0): loss 2 * (1 * 1) = 2. Group 1 (t2, t3) is padding.
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
    first = torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([True, True, False, False])
    assert_close(balance_loss(probs, first, mask, group_size=2), torch.tensor(2.0))
    # One group: f = (1, 0), P = (1, 0) over the real tokens: the same 2.0.
    assert_close(balance_loss(probs, first, mask), torch.tensor(2.0))
    # Uniform within each group: 1.0 each, whatever the other group holds.
    probs_u = torch.full((4, 2), 0.5)
    assert_close(balance_loss(probs_u, torch.tensor([0, 1, 0, 1]), group_size=2), torch.tensor(1.0))


def test_group_size_is_validated_by_name():
    with pytest.raises(ValueError, match="group_size"):
        SwitchFeedForward(8, 16, 4, group_size=0)
    with pytest.raises(TypeError, match="group_size"):
        SwitchFeedForward(8, 16, 4, group_size=2.5)
