"""Capacity (eq. 3) and which tokens keep a slot under each drop policy. Expected values worked out by hand."""
import pytest
import torch

from switch_core import dispatch, expert_capacity


@pytest.mark.parametrize(
    "T, E, cf, k, expected",
    [
        (16, 4, 1.25, 1, 5),   # 1.25 * 16 / 4 = 5
        (16, 4, 1.25, 2, 10),  # 2 * 1.25 * 16 / 4 = 10
        (10, 4, 1.0, 1, 3),    # 2.5 rounds up to 3
        (7, 8, 1.0, 1, 1),     # 0.875 rounds up to 1
        (12, 4, None, 1, 12),  # dropless: an expert can receive every token
    ],
)
def test_expert_capacity(T, E, cf, k, expected):
    assert expert_capacity(T, E, cf, k) == expected


def _plan(experts, gates=None, capacity=2, n_experts=2, mask=None, policy="position", generator=None):
    expert_TK = torch.tensor(experts).view(len(experts), -1)
    gates_TK = torch.full(expert_TK.shape, 0.5) if gates is None else torch.tensor(gates).view(expert_TK.shape)
    mask_T = None if mask is None else torch.tensor(mask)
    return dispatch(expert_TK, gates_TK, n_experts, capacity, mask_T=mask_T, policy=policy, generator=generator)


def test_position_policy_keeps_earlier_tokens():
    # Expert 0 gets tokens 0, 1, 3 and expert 1 gets 2, 4, 5; 0-based slots in token order (Fig. 15's cumsum - 1).
    d = _plan([0, 0, 1, 0, 1, 1])
    assert d.slot_A.tolist() == [0, 1, 0, 2, 1, 2]
    assert d.keep_A.tolist() == [True, True, True, False, True, False]
    assert d.counts_E.tolist() == [3, 3] and d.kept_E.tolist() == [2, 2]


def test_capacity_keeps_exactly_capacity_tokens_not_one_fewer():
    # The printed inclusive cumsum with `position < capacity` would keep C - 1; 0-based slots keep C.
    d = _plan([0, 0, 0, 0], n_experts=1, capacity=3)
    assert int(d.keep_A.sum()) == 3


def test_priority_policy_keeps_highest_gates():
    # Expert 0: tokens 0 (0.5), 1 (0.9), 3 (0.8) -> order 1, 3, 0: token 0 is dropped.
    # Expert 1: tokens 2 (0.6), 4 (0.7), 5 (0.95) -> order 5, 4, 2: token 2 is dropped.
    d = _plan([0, 0, 1, 0, 1, 1], gates=[0.5, 0.9, 0.6, 0.8, 0.7, 0.95], policy="priority")
    assert d.keep_A.tolist() == [False, True, False, True, True, True]
    assert d.slot_A.tolist() == [2, 0, 2, 1, 1, 0]


def test_priority_policy_breaks_ties_by_position():
    d = _plan([0, 0, 0, 0], gates=[0.5, 0.7, 0.7, 0.7], n_experts=1, capacity=2, policy="priority")
    assert d.keep_A.tolist() == [False, True, True, False]


def test_random_policy_keeps_a_random_subset_of_the_right_size():
    seen_dropped = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        d = _plan([0, 0, 0, 0, 1], n_experts=2, capacity=2, policy="random", generator=g)
        assert d.kept_E.tolist() == [2, 1]
        assert int(d.keep_A[:4].sum()) == 2 and bool(d.keep_A[4])
        seen_dropped |= {i for i in range(4) if not d.keep_A[i]}
    assert seen_dropped == {0, 1, 2, 3}  # every token of the overloaded expert is dropped some of the time


def test_padding_takes_no_capacity_and_is_not_counted():
    d = _plan([0, 0, 0, 1], mask=[False, True, True, True], capacity=2)
    assert d.keep_A.tolist() == [False, True, True, True]
    assert d.counts_E.tolist() == [2, 1] and d.kept_E.tolist() == [2, 1]
    assert float(d.n_real) == 3.0


def test_top2_places_all_first_choices_before_second_choices():
    # First choices: t0->0 (slot 0), t1->1 (slot 0), t2->0 (slot 1).
    # Second choices: t0->1 (slot 1), t1->0 (slot 2: dropped), t2->1 (slot 2: dropped).
    d = _plan([[0, 1], [1, 0], [0, 1]], capacity=2)
    assert d.slot_A.view(3, 2).tolist() == [[0, 1], [0, 2], [1, 2]]
    assert d.keep_A.view(3, 2).tolist() == [[True, True], [True, False], [True, False]]
    assert d.counts_E.tolist() == [2, 1]  # counts are first choices only


def test_expert_with_no_tokens():
    d = _plan([0, 0, 0], n_experts=3, capacity=5)
    assert d.counts_E.tolist() == [3, 0, 0] and d.kept_E.tolist() == [3, 0, 0]
