"""Property-based tests of the Switch layer (hypothesis): random shapes (empty ones too), expert counts, top-k,
capacity factors (dropless included), capacity groups, drop policies, masks, activations, biases, train/eval,
dtypes (float32, float64, bfloat16) and non-finite values placed anywhere.

Properties, on every backend ("loop", "padded", "grouped", "auto"):

1. The layer equals a small independent float64 reference written here (router softmax, top-k, capacity by
   position or priority per group, y = Σ gate · expert(x)), outputs, statistics and gradients; for the "random"
   policy, whose draw cannot be replayed, each token's output is the reference's for *some* subset of its
   choices, and the number kept per expert is the one any fill order gives.
2. A NaN or inf stays in its token. A token whose input is finite gets a finite output, and (loss on the finite
   tokens) a finite input gradient; a dropped or padded token gets exactly 0, whatever it or anyone holds.
   What a non-finite token may still do, and does: take capacity slots (the router's choice for a NaN row is
   the layer's, taken from its statistics), so it can push a later token out of an expert; make the losses
   (means over the tokens) and, when kept, its expert's weight gradient NaN. Under the position policy the
   finite tokens then still equal the reference exactly.
3. Padding influences nothing: whatever padded positions hold (NaN, inf, huge), outputs, every statistic and
   every gradient are bit-identical to those with zeros there, and finite.

Runtime is bounded and the run is deterministic (derandomized, no example database). SWITCH_CORE_PROP_EXAMPLES
sets the examples per property (default 100); ``pytest -s`` prints how many ran.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from switch_core import SwitchFeedForward

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLES = int(os.environ.get("SWITCH_CORE_PROP_EXAMPLES", "100"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BACKENDS = ("loop", "padded", "grouped", "auto")
RAN = {"examples": 0}

# The reference's own table of activations: name -> (function, gated?)
ACT = {"relu": (torch.relu, False), "gelu": (F.gelu, False), "silu": (lambda h: h * torch.sigmoid(h), False),
       "geglu": (F.gelu, True), "swiglu": (lambda h: h * torch.sigmoid(h), True)}
# How far the layer's router may be from float64 (logits: relative to the row's magnitude; gates: absolute)
ROUTE_TOL = {torch.float64: 1e-11, torch.float32: 1e-5, torch.bfloat16: 1e-5}
# Outputs, statistics and gradients against the reference: (rtol, atol relative to the tensor's largest value)
TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (2e-4, 2e-5), torch.bfloat16: (4e-2, 4e-2)}


@pytest.fixture(scope="module", autouse=True)
def _report_examples():
    yield
    print(f"\ntest_properties: {RAN['examples']} property examples ran ({EXAMPLES} per property at most)")


# -- the configurations --------------------------------------------------------------------------------------
# capacity factors: None (dropless) or a factor, mostly small enough to overflow an expert
CAPACITY_FACTORS = st.one_of(st.sampled_from([0.5, 0.25, 1.0, None, 0.1, 0.75, 1.25, 2.0]), st.floats(0.05, 3.0))


@st.composite
def configs(draw, nonempty=False, masked=False):
    E = draw(st.integers(1, 6))
    # T tokens (none, a few, up to 40: enough to overflow), as 1 to 3 leading dims (an empty one anywhere)
    T = draw(st.sampled_from(([] if nonempty else [0]) + [1, 3, 6, 12, 20, 30, 40]))
    lead, rest = [], T
    for _ in range(draw(st.integers(0, 2))):
        n = draw(st.sampled_from([d for d in range(1, 9) if rest % d == 0] if T else [0, 2, 5]))
        lead.append(n)
        rest = rest // n if n else draw(st.sampled_from([0, 3]))
    lead = draw(st.permutations(lead + [rest]))
    assert math.prod(lead) == T
    return dict(
        E=E, K=draw(st.integers(1, min(E, 3))), D=draw(st.integers(1, 8)), F=draw(st.integers(1, 8)), lead=lead,
        group_size=draw(st.one_of(st.none(), st.integers(1, T + 2))),
        cf=draw(CAPACITY_FACTORS), eval_cf=draw(CAPACITY_FACTORS), training=draw(st.booleans()),
        policy=draw(st.sampled_from(["position", "priority", "random"])),
        activation=draw(st.sampled_from(sorted(ACT))), bias=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        # None: no mask; else P(real)
        real_p=draw(st.sampled_from([0.5, 0.8, 0.0, 1.0] if masked else [None, 0.8, 0.5, None, 0.0, 1.0])),
        router_scale=draw(st.sampled_from([1.0, 4.0, 16.0])), x_scale=draw(st.sampled_from([0.3, 1.0, 3.0])),
        seed=draw(st.integers(0, 2**31 - 1)))


def build(c):
    """(layer, x [*lead, D], mask or None, loss weights [T, D] float64) for configuration c."""
    torch.manual_seed(c["seed"])
    layer = SwitchFeedForward(c["D"], c["F"], c["E"], top_k=c["K"], capacity_factor=c["cf"],
                              eval_capacity_factor=c["eval_cf"], drop_policy=c["policy"],
                              activation=c["activation"], bias=c["bias"], group_size=c["group_size"])
    with torch.no_grad():
        layer.router.weight.mul_(c["router_scale"])  # sharper routing: collapse and overflow
        if c["bias"]:
            layer.experts.b_in.normal_()
            layer.experts.b_out.normal_(std=0.1)
    layer.to(c["dtype"]).train(c["training"])
    g = torch.Generator().manual_seed(c["seed"])
    x = (torch.randn(*c["lead"], c["D"], generator=g, dtype=torch.float64) * c["x_scale"]).to(c["dtype"])
    mask = None if c["real_p"] is None else torch.rand(c["lead"], generator=g) < c["real_p"]
    weights = torch.randn(math.prod(c["lead"]), c["D"], generator=g, dtype=torch.float64)
    return layer, x, mask, weights


def run(layer, backend, x, mask, weights, loss_T=None):
    """One call on a backend: (y, stats, x.grad, {name: grad}). loss_T: bool [T], the tokens the loss sees."""
    layer.backend = backend
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # the "random" policy draws the same permutation on every backend
    x = x.detach().clone().requires_grad_()
    y, s = layer(x, token_mask=mask)
    y_TD = y.reshape(-1, x.shape[-1]).double()
    if loss_T is not None:
        y_TD = torch.where(loss_T[:, None], y_TD, 0)
    ((y_TD * weights).sum() + s.balance_loss + s.z_loss).backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in layer.named_parameters()}
    return y.detach(), s, x.grad, grads


# -- the independent float64 reference ---------------------------------------------------------------------
def capacity_of(c, T):
    cf = c["cf"] if c["training"] else c["eval_cf"]
    G = T if c["group_size"] is None else c["group_size"]
    return G if cf is None else math.ceil(Fraction(repr(cf)) * c["K"] * G / c["E"])  # eq. 3, exact, rounded up


def groups_of(c, T):
    G = c["group_size"] or max(T, 1)
    return [list(range(a, min(a + G, T))) for a in range(0, T, G)]


def fill_counts(c, choice, real, T):
    """long [E]: assignments each expert keeps under any fill order that puts every k-th choice before any
    (k+1)-th (all three policies): per group and choice, min(free slots, demand)."""
    cap, kept = capacity_of(c, T), [0] * c["E"]
    for ts in groups_of(c, T):
        used = [0] * c["E"]
        for k in range(c["K"]):
            demand = [0] * c["E"]
            for t in ts:
                if real[t]:
                    demand[choice[t][k]] += 1
            for e in range(c["E"]):
                n = min(cap - used[e], demand[e])
                used[e] += n
                kept[e] += n
    return torch.tensor(kept)


def reference(c, params, x, mask, layer_stats, forced=()):
    """Everything the layer computes, in float64 from the layer's (float64-cast) parameters ``params``.

    Where float64 cannot tell two experts (top-k) or two gates (priority) apart within the layer's rounding, the
    layer's own choice or gates (``layer_stats``) settle it, and the layer's choice is checked to be a correct
    top-k within that rounding. ``forced``: tokens (non-finite inputs) that take the layer's choice as is;
    their own outputs are of no interest (their input is replaced by zeros here)."""
    E, K, D, dt = c["E"], c["K"], c["D"], c["dtype"]
    T = math.prod(c["lead"])
    real = [True] * T if mask is None else mask.reshape(T).tolist()
    real_T = torch.tensor(real, dtype=torch.bool).reshape(T)
    ok_T = real_T.clone()
    ok_T[list(forced)] = False
    x_TD = torch.where(ok_T[:, None], x.reshape(T, D).double(), 0)  # padding: a zero token
    logits = x_TD @ params["router.weight"].T
    probs = torch.softmax(logits, dim=-1)

    # Top-k: by float64 logit; within rounding, the layer's choice (checked to be one of the top k).
    lay_choice = layer_stats.expert_index.reshape(T, K).tolist()
    lay_gates = layer_stats.gates.reshape(T, K).double()
    scale = ((x_TD.abs() @ params["router.weight"].abs().T).amax(-1) + 1.0).tolist() if E else [1.0] * T
    choice = []
    for t in range(T):
        row = logits[t].tolist()
        best = sorted(range(E), key=lambda e: -row[e])
        tol = ROUTE_TOL[dt] * scale[t]
        if t in forced:
            assert len(set(lay_choice[t])) == K and all(0 <= e < E for e in lay_choice[t]), lay_choice[t]
            choice.append(lay_choice[t])
        elif not real[t] or all(row[best[j]] - row[best[j + 1]] > tol for j in range(min(K, E - 1))):
            choice.append(best[:K])
        else:
            assert all(abs(row[e] - row[b]) <= tol for e, b in zip(lay_choice[t], best)), (row, lay_choice[t])
            choice.append(lay_choice[t])
    idx_TK = torch.tensor(choice, dtype=torch.long).reshape(T, K)
    gates = probs.gather(1, idx_TK)
    if K > 1:
        gates = gates / gates.sum(-1, keepdim=True)

    # Capacity, and who keeps a slot (position: earlier first; priority: higher gate first, then earlier).
    cap = capacity_of(c, T)
    gl = gates.detach().tolist()
    keep = [[False] * K for _ in range(T)] if c["policy"] != "random" else None
    for ts in groups_of(c, T) if keep is not None else []:
        used = [0] * E
        for k in range(K):
            seq = list(ts)
            if c["policy"] == "priority":
                seq = sorted(ts, key=lambda t: (-gl[t][k], t))
                # Two gates of one expert closer than the layer's rounding (but not equal: equal ones are equal
                # there too, and tie by position): float64 cannot settle their order; the layer's gates do.
                by_expert = [sorted(gl[t][k] for t in ts if real[t] and choice[t][k] == e) for e in range(E)]
                if any(0 < b - a <= ROUTE_TOL[dt] for g in by_expert for a, b in zip(g, g[1:])):
                    lk = lay_gates[:, k].tolist()
                    seq = sorted(ts, key=lambda t: (-lk[t], t))
            for t in seq:
                if real[t] and used[choice[t][k]] < cap:
                    keep[t][k] = True
                    used[choice[t][k]] += 1

    # Every expert on every token (dense), then y = Σ_k [kept] · gate · expert(x).
    act, gated = ACT[c["activation"]]
    h = torch.einsum("td,edf->etf", x_TD, params["experts.w_in"])
    if c["bias"]:
        h = h + params["experts.b_in"][:, None, :]
    h = act(torch.einsum("td,edf->etf", x_TD, params["experts.w_gate"])) * h if gated else act(h)
    out_ETD = torch.einsum("etf,efd->etd", h, params["experts.w_out"])
    if c["bias"]:
        out_ETD = out_ETD + params["experts.b_out"][:, None, :]
    picked_TKD = out_ETD[idx_TK, torch.arange(T)[:, None]] if T else x_TD.new_zeros(0, K, D)
    contrib_TKD = gates[..., None] * picked_TKD

    # Statistics.
    n_real = sum(real)
    counts = torch.zeros(E, dtype=torch.long)
    for t in range(T):
        counts[choice[t][0]] += int(real[t])
    bal_terms = []
    for ts in groups_of(c, T):  # the mean over the groups with a real token of each group's loss
        rs = [t for t in ts if real[t]]
        if rs:
            f = torch.zeros(E, dtype=torch.float64)
            for t in rs:
                f[choice[t][0]] += 1.0 / len(rs)
            bal_terms.append(E * (f * probs[rs].mean(0)).sum())
    balance = torch.stack(bal_terms).mean() if bal_terms else logits.sum() * 0
    rows = [t for t in range(T) if real[t]]
    z = torch.logsumexp(logits[rows], -1).square().mean() if rows else logits.sum() * 0
    return dict(real=real_T, choice=choice, gates=gates, contrib=contrib_TKD, keep=keep, cap=cap, counts=counts,
                n_real=n_real, balance=balance, z=z, probs=probs, logits=logits)


def combine_ref(ref, keep):
    keep_TK = torch.tensor(keep, dtype=torch.bool).reshape(ref["contrib"].shape[:2])
    return torch.where(keep_TK[..., None], ref["contrib"], 0).sum(1)


def grad_of(p):
    return torch.zeros_like(p) if p.grad is None else p.grad


def close(actual, expected, dt, msg=""):
    rtol, atol = TOL[dt]
    expected = expected.detach().double()
    assert_close(actual.detach().double(), expected, rtol=rtol, atol=atol * (1 + expected.abs().max().item()
                                                                              if expected.numel() else 1), msg=msg)


def infer_keep(ref, y_TD, dt, tokens=None):
    """For the "random" policy: the subset of each token's choices that explains its output, for the real tokens
    (or those of ``tokens``, bool [T]). Returns (keep [T][K], whether every choice of subset was unambiguous)."""
    T, K = ref["contrib"].shape[:2]
    keep, clear = [], True
    rtol, atol = TOL[dt]
    for t in range(T):
        if not (ref["real"] if tokens is None else tokens)[t]:
            keep.append([False] * K)
            continue
        cands = [s for n in range(K + 1) for s in combinations(range(K), n)]
        sums = [ref["contrib"][t, list(s)].sum(0).detach() if s else ref["contrib"].new_zeros(y_TD.shape[1])
                for s in cands]
        scale = atol * (1 + max(v.abs().max().item() for v in sums)) + rtol * y_TD[t].abs().max().item()
        dist = sorted(((y_TD[t].double() - v).abs().max().item(), i) for i, v in enumerate(sums))
        assert dist[0][0] <= scale, f"token {t}: no subset of its choices gives its output ({dist[0][0]:.3g})"
        clear &= len(dist) == 1 or dist[1][0] > 4 * scale
        keep.append([k in cands[dist[0][1]] for k in range(K)])
    return keep, clear


def check_stats(c, s, ref, keep, dt):
    """The statistics of one call against the reference (keep: [T][K] kept assignments)."""
    T, K, E = math.prod(c["lead"]), c["K"], c["E"]
    real = ref["real"]
    assert s.capacity == ref["cap"]
    assert torch.equal(s.counts, ref["counts"]) and int(s.counts.sum()) == ref["n_real"]
    kept = torch.zeros(E, dtype=torch.long)
    for t in range(T):
        for k in range(K):
            kept[ref["choice"][t][k]] += int(keep[t][k])
    assert torch.equal(s.kept_counts, kept)
    assert torch.equal(s.kept_counts, fill_counts(c, ref["choice"], real.tolist(), T))
    n_assign = K * ref["n_real"]
    frac = float(s.dropped_fraction)
    assert 0.0 <= frac <= 1.0 and math.isclose(frac, (n_assign - int(kept.sum())) / max(n_assign, 1), abs_tol=1e-6)
    if capacity_of(c, T) >= (c["group_size"] or T):  # dropless (or as good as): nothing is dropped
        assert frac == 0.0
    idx = torch.tensor(ref["choice"], dtype=torch.long).reshape(T, K)
    assert torch.equal(s.expert_index.reshape(T, K), torch.where(real[:, None], idx, -1))
    close(s.gates.reshape(T, K), torch.where(real[:, None], ref["gates"], 0), torch.float32, "gates")
    close(s.router_logits.reshape(T, E), ref["logits"], torch.float32, "router_logits")
    close(s.router_probs.reshape(T, E), ref["probs"], torch.float32, "router_probs")
    for name in ("balance", "z"):
        value = getattr(s, f"{name}_loss" if name == "balance" else "z_loss")
        assert torch.isfinite(value) and value.dtype == torch.promote_types(dt, torch.float32)
        close(value, ref[name], torch.float32, name)


# -- 1. every backend equals the reference ------------------------------------------------------------------
@PROPERTY
@given(configs())
def test_every_backend_equals_the_float64_reference(c):
    layer, x, mask, weights = build(c)
    dt, T = c["dtype"], math.prod(c["lead"])
    outs = {b: run(layer, b, x, mask, weights) for b in BACKENDS}
    s0 = outs["loop"][1]
    params = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    ref = reference(c, params, x64, mask, s0)
    if c["policy"] == "random":  # the draw cannot be replayed: each token's output says what it kept
        keep, clear = infer_keep(ref, outs["loop"][0].reshape(T, c["D"]), dt)
    else:
        keep, clear = ref["keep"], True
    y_ref = combine_ref(ref, keep)
    event(f"{'no tokens' if T == 0 else 'some dropped' if s0.dropped_fraction > 0 else 'none dropped'}"
          f"{'' if mask is None else ', masked'}{'' if c['group_size'] is None else ', groups'}")
    if dt != torch.bfloat16:
        ((y_ref * weights).sum() + ref["balance"] + ref["z"]).backward()
    for backend, (y, s, gx, grads) in outs.items():
        y_TD = y.reshape(T, c["D"])
        assert y.shape == x.shape and y.dtype == dt and torch.isfinite(y).all()
        if backend != "loop":  # routing and dispatch come before the backends: identical statistics
            for field in ("counts", "kept_counts", "expert_index", "gates", "dropped_fraction"):
                assert torch.equal(getattr(s, field), getattr(s0, field)), (backend, field)
        if clear:  # (random policy: unless two subsets of some token's choices give the same output)
            check_stats(c, s, ref, keep, dt)
        assert (y_TD[~ref["real"]] == 0).all()
        for t in range(T):
            if not any(keep[t]):
                assert (y_TD[t] == 0).all(), f"{backend}: dropped token {t} is not exactly 0"
        close(y_TD, y_ref, dt, f"{backend}: y")
        for n, g in grads.items():
            assert torch.isfinite(g).all(), (backend, n)
        if dt != torch.bfloat16:
            close(gx, grad_of(x64), dt, f"{backend}: grad of x")
            for n, g in grads.items():
                close(g, grad_of(params[n]), dt, f"{backend}: grad of {n}")
    RAN["examples"] += 1


# -- 2. a NaN or inf stays in its token ----------------------------------------------------------------------
BAD = [float("nan"), float("inf"), -float("inf")]


@PROPERTY
@given(configs(nonempty=True), st.data())
def test_a_non_finite_value_stays_in_its_token(c, data):
    layer, x, mask, weights = build(c)
    dt, T, D, K, E = c["dtype"], math.prod(c["lead"]), c["D"], c["K"], c["E"]
    x_TD = x.reshape(T, D).clone()
    places = st.lists(st.tuples(st.integers(0, T - 1), st.integers(0, D - 1), st.sampled_from(BAD)), min_size=1,
                      max_size=4)
    for t, d, v in data.draw(places, label="non-finite (token, feature, value)"):
        x_TD[t, d] = v
    x = x_TD.reshape(x.shape)
    real_T = torch.ones(T, dtype=torch.bool) if mask is None else mask.reshape(T)
    good_T = torch.isfinite(x_TD).all(-1) & real_T  # real tokens with a finite input
    bad = (real_T & ~good_T).nonzero().flatten().tolist()  # real tokens with a non-finite input
    event("a real token is non-finite" if bad else "only padding is non-finite")
    outs = {b: run(layer, b, x, mask, weights, loss_T=good_T) for b in BACKENDS}
    s0 = outs["loop"][1]
    choice = s0.expert_index.reshape(T, K)
    # The statistics: integers consistent whatever the values; the losses finite unless a real token is not.
    assert int(s0.counts.sum()) == int(real_T.sum())
    assert ((choice >= 0) & (choice < E))[real_T].all() and (choice[~real_T] == -1).all()
    assert all(len(set(row)) == K for row in choice[real_T].tolist())
    assert torch.equal(s0.kept_counts, fill_counts(c, choice.tolist(), real_T.tolist(), T))
    n_assign = K * int(real_T.sum())
    frac = float(s0.dropped_fraction)
    expected = 1 - int(s0.kept_counts.sum()) / n_assign if n_assign else 0.0
    assert 0.0 <= frac <= 1.0 and math.isclose(frac, expected, abs_tol=1e-6)
    assert torch.isfinite(s0.gates.reshape(T, K)[good_T | ~real_T]).all()
    if not bad:
        assert torch.isfinite(s0.balance_loss) and torch.isfinite(s0.z_loss)
    # The reference for the finite tokens, non-finite ones taking the slots the layer gave them.
    params = {n: p.detach().double() for n, p in layer.named_parameters()}
    ref = reference(c, params, x, mask, s0, forced=bad)
    y0 = outs["loop"][0].reshape(T, D)
    if c["policy"] == "position":
        keep = ref["keep"]
    else:  # the order a NaN gate takes (priority) or the draw (random) is the layer's: infer who was kept
        keep, _ = infer_keep(ref, y0, dt, tokens=good_T)
    y_ref = combine_ref(ref, keep)
    for backend, (y, s, gx, grads) in outs.items():
        y_TD = y.reshape(T, D)
        for field in ("counts", "kept_counts", "expert_index", "dropped_fraction"):
            assert torch.equal(getattr(s, field), getattr(s0, field)), (backend, field)
        assert torch.isfinite(y_TD[good_T]).all(), f"{backend}: a non-finite value reached another token"
        assert (y_TD[~real_T] == 0).all(), f"{backend}: padding is not exactly 0"
        for t in range(T):
            if c["policy"] == "position" and real_T[t] and not any(keep[t]):
                assert (y_TD[t] == 0).all(), f"{backend}: dropped token {t} is not exactly 0"
        close(y_TD[good_T], y_ref[good_T], dt, f"{backend}: y of the finite tokens")
        assert torch.isfinite(gx.reshape(T, D)[good_T]).all(), f"{backend}: a non-finite value reached a gradient"
        assert (gx.reshape(T, D)[~real_T] == 0).all()
        if not bad:  # only padding is non-finite: every gradient is finite
            assert all(torch.isfinite(g).all() for g in grads.values()), backend
    RAN["examples"] += 1


# -- 3. padding influences nothing ---------------------------------------------------------------------------
JUNK = BAD + [3e38, -1e30]


@PROPERTY
@given(configs(masked=True), st.sampled_from(JUNK), st.booleans())
def test_padding_influences_nothing(c, fill, mixed):
    layer, x, mask, weights = build(c)
    T = math.prod(c["lead"])
    x_zero = torch.where(mask[..., None], x, 0)
    junk = torch.tensor(fill, dtype=x.dtype)
    if mixed:  # a different non-finite or huge value in every padded element
        pick = torch.randint(len(JUNK), x.shape, generator=torch.Generator().manual_seed(c["seed"]))
        junk = torch.tensor(JUNK, dtype=x.dtype)[pick]
    x_junk = torch.where(mask[..., None], x, junk)
    event("some padding" if T and not mask.all() else "no padding")
    for backend in BACKENDS:
        y0, s0, gx0, g0 = run(layer, backend, x_zero, mask, weights)
        y, s, gx, g = run(layer, backend, x_junk, mask, weights)
        assert torch.equal(y, y0) and (y[~mask] == 0).all() and torch.isfinite(y).all()
        for field in ("counts", "kept_counts", "balance_loss", "z_loss", "dropped_fraction", "expert_index", "gates",
                      "router_probs", "router_logits"):
            a, b = getattr(s, field), getattr(s0, field)
            assert torch.equal(a, b) and torch.isfinite(a.float()).all(), (backend, field)
        assert torch.equal(gx, gx0) and (gx[~mask] == 0).all()
        for n in g0:
            assert torch.equal(g[n], g0[n]) and torch.isfinite(g[n]).all(), (backend, n)
    RAN["examples"] += 1
