"""The properties of docs/contract.md, as Hypothesis tests run unchanged on every backend.

Problems, the float64 comparison, the tolerance rule and the property checks are
``sdm_triton.testing``'s, the kit users test their own implementations with; its docstrings
state the rule. Truth here is the kit's ``dense_reference``: SPEC's definition evaluated in
float64, dense and loop-free, written independently of ``reference/sdm.py`` (which is one of
the backends under test), so every call passes ``reference=TRUTH``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st

from sdm_triton.options import NORM_EPS
from sdm_triton.testing import _compare, _properties, sdm_options
from sdm_triton.testing._compare import FLOOR_ULPS, RTOL, UNIT_ROUNDOFF, assert_close, directions, grad_outputs, run
from sdm_triton.testing._problems import ARG_LAYOUTS, FAST_DTYPES, HALF_DTYPES, log_uniform
from strategies import backend_property, cases

F64 = torch.float64
TRUTH = _compare.dense_reference


def truth_for(case, opts, gout=1.0):
    return _compare.truth_for(case, opts, gout, reference=TRUTH)


# --------------------------------------------------------------------------- properties

@backend_property()
def test_forward_loss_is_nonnegative(sdm_impl, data):
    """forward: every row loss and the reduced loss are >= 0, exactly, for every dtype,
    temperature in [0.005, 10] and feature norm in [1e-4, 1e4]; invalid rows are 0."""
    case = data.draw(cases(sdm_impl, dtypes=FAST_DTYPES, fp16_grads_fit=False))
    _properties.forward_kl_nonnegative(sdm_impl, case, data.draw(sdm_options(kl=("forward",))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_loss_is_nonnegative_when_rounding_cancels(sdm_impl, dtype):
    """Samples of an identity that differ only in norm fit their labels so well that each
    row loss is a difference of equal terms, and rounding alone gives about -1e-7 unless
    the implementation keeps the result at 0. The batches were found by searching random
    ones of this kind for a negative value of the reference without its clamp."""
    for seed, temperature in [(0, 0.01), (2, 0.05), (4, 0.01), (9, 0.02), (11, 10.0)]:
        gen = torch.Generator().manual_seed(seed)
        n = int(torch.randint(2, 9, (1,), generator=gen))
        d = int(torch.randint(1, 9, (1,), generator=gen))
        pool = int(torch.randint(1, 3, (1,), generator=gen))
        ids = torch.randint(0, pool, (n,), generator=gen)
        x = torch.randn(pool, d, generator=gen)[ids] * torch.exp(torch.randn(n, 1, generator=gen))
        x, ids = x.to(sdm_impl.device, dtype), ids.to(sdm_impl.device)
        out = sdm_impl(x, x, ids, ids, temperature=temperature, reduction="none")
        for rows in (out.q2g, out.g2q):
            assert bool((rows >= 0).all()), f"negative row loss {float(rows.min())} (seed {seed}, tau {temperature})"


@backend_property()
def test_reverse_loss_lower_bound(sdm_impl, data):
    """reverse: each row loss is >= -log(1 + M_valid * eps), up to float rounding."""
    case = data.draw(cases(sdm_impl, dtypes=FAST_DTYPES, fp16_grads_fit=False))
    opts = data.draw(sdm_options(kl=("reverse",), reduction=("none",)))
    _properties.reverse_kl_lower_bound(sdm_impl, case, opts, reference=TRUTH)


@pytest.mark.parametrize("eps", [1e-8, 1e-2, 0.1])
def test_reverse_loss_attains_its_bound(sdm_impl, eps):
    """The bound is sharp: sum_j P (log P - log(Y + eps)) = KL(P || (Y + eps) / Z) - log Z,
    Z = 1 + M eps, so at P = (Y + eps) / Z every row loss is exactly -log(1 + M eps).
    One match per row and orthonormal features give that P at s = log((1 + eps) / eps)."""
    m = 16
    x = torch.eye(m, device=sdm_impl.device)
    ids = torch.arange(m, device=sdm_impl.device)
    s = math.log((1 + eps) / eps)
    out = sdm_impl(x, x, ids, ids, temperature=1 / s, kl="reverse", eps=eps, reduction="none")
    bound = -math.log1p(m * eps)
    atol = FLOOR_ULPS * UNIT_ROUNDOFF[torch.float32] * (1 + s + math.log(m) + abs(math.log(eps)))
    for rows in (out.q2g, out.g2q):
        torch.testing.assert_close(rows.double().cpu(), torch.full((m,), bound, dtype=F64), rtol=1e-5, atol=atol)


@backend_property()
def test_finite_loss_and_gradients(sdm_impl, data):
    """Finite inputs (zero vectors, extreme norms and temperatures included) give a finite
    loss and finite gradients for q, g and a tensor logit_scale. fp16 gradients are
    checked where the exact gradient fits fp16 (a row of norm 1e-4 at scale 200 has a
    gradient ~1e6, which no fp16 tensor holds)."""
    case = data.draw(cases(sdm_impl, dtypes=FAST_DTYPES, fp16_grads_fit=False))
    opts = data.draw(sdm_options())
    gout = grad_outputs(case, opts, data.draw(st.integers(0, 2**31)))
    _properties.finite_loss_and_gradients(sdm_impl, case, opts, gout, reference=TRUTH)


@backend_property()
def test_scale_invariance(sdm_impl, data):
    """L(c q, g) = L(q, c g) = L(q, g) for c > 0 in normalised mode, loss and per-row losses.
    Half inputs are scaled by powers of two, which is exact in half (fp16: upwards only,
    since scaling down rounds subnormal elements); fp32 / float64 by any c."""
    case = data.draw(cases(sdm_impl, dtypes=(torch.float32, torch.float64) + HALF_DTYPES, zero_rows=False,
                           log10_norms=(-3.0, 3.0)))
    opts = data.draw(sdm_options(reduction=("none",)))
    if case.dtype == torch.float16:
        c = 2.0 ** data.draw(st.integers(0, 4))
    elif case.dtype == torch.bfloat16:
        c = 2.0 ** data.draw(st.integers(-6, 6))
    else:
        c = data.draw(log_uniform(1e-3, 1e3))
    assert _properties.scale_invariance(sdm_impl, case, opts, c, grad_outputs(case, opts, 1), reference=TRUTH)


@backend_property()
def test_mask_equals_subset(sdm_impl, data):
    """A masked call equals the call on the kept samples (loss, per-row losses, gradients of
    kept samples); masked samples get exactly zero gradient and are invalid rows."""
    case = data.draw(cases(sdm_impl, dtypes=FAST_DTYPES + (torch.float64,),
                           mask_kinds=("random", "all_false", "kill_positives")))
    opts = data.draw(sdm_options())
    gout = grad_outputs(case, opts, data.draw(st.integers(0, 2**31)))
    _properties.mask_equals_subset(sdm_impl, case, opts, gout, reference=TRUTH)


@backend_property()
def test_invalid_rows_have_no_loss_and_no_gradient(sdm_impl, data):
    """One direction only: a row with no positive among the kept columns (or a masked row)
    contributes 0 and its own features get exactly zero gradient."""
    case = data.draw(cases(sdm_impl, label_kinds=("ids", "soft", "binary")))
    direction = data.draw(st.sampled_from(("q2g", "g2q")))
    opts = data.draw(sdm_options(direction=(direction,), reduction=("none",)))
    assume(_properties.invalid_rows_get_nothing(sdm_impl, case, opts, grad_outputs(case, opts, 7), reference=TRUTH))


@backend_property()
def test_permutation_equivariance(sdm_impl, data):
    """Permuting the rows of q (with q_ids / label rows / q_mask) and of g jointly permutes
    the per-row losses and the gradients the same way."""
    case = data.draw(cases(sdm_impl, dtypes=FAST_DTYPES + (torch.float64,)))
    opts = data.draw(sdm_options(reduction=("none",)))
    pq = torch.tensor(data.draw(st.permutations(range(case.n))), device=case.q.device)
    pg = torch.tensor(data.draw(st.permutations(range(case.m))), device=case.q.device)
    _properties.permutation_equivariance(sdm_impl, case, opts, pq, pg, grad_outputs(case, opts, 3), reference=TRUTH)


def _logits64(case):
    q, g = case.q.double().cpu(), case.g.double().cpu()
    return case.scale_value() * F.normalize(q, dim=1, eps=NORM_EPS) @ F.normalize(g, dim=1, eps=NORM_EPS).T


@backend_property()
def test_unique_ids_equal_cross_entropy(sdm_impl, data):
    """One match per row: forward equals F.cross_entropy on S, in each direction, over the
    rows that have their match (ids, or a dense one-hot with arbitrary positive weights)."""
    case = data.draw(cases(sdm_impl, dtypes=FAST_DTYPES + (torch.float64,), label_kinds=("unique_ids",),
                           mask_kinds=("none",)))
    direction = data.draw(st.sampled_from(("both", "q2g", "g2q")))
    if data.draw(st.booleans()):      # dense labels: the one positive carries any weight > 0
        weight = data.draw(log_uniform(1e-3, 1e3))
        case = dataclasses.replace(case, labels=case.y(torch.float32) * weight, q_ids=None, g_ids=None)
    opts = dict(kl="forward", eps=1e-8, direction=direction, combine="mean", reduction="none", normalize=True)
    out = case.call(sdm_impl, *case.leaves()[:2], **opts)
    S, y = _logits64(case), case.y().cpu()
    truth = truth_for(case, opts, grad_outputs(case, opts, 0))
    for name, logits, match in (("q2g", S, y), ("g2q", S.T, y.T)):
        if name not in directions(opts):
            continue
        has = match.sum(dim=1) > 0
        ce = torch.zeros(logits.shape[0], dtype=F64)
        if bool(has.any()):
            ce[has] = F.cross_entropy(logits[has], match[has].argmax(dim=1), reduction="none")
        rows = getattr(out, name)
        assert torch.equal(getattr(out, name + "_valid").cpu(), has), f"{name}_valid for {case}"
        assert_close(f"{name} vs cross_entropy", rows, ce, ce, truth.loss_floor, RTOL[truth.compute_dtype], case)


@backend_property()
def test_binary_labels_closed_form(sdm_impl, data):
    """Binary labels, forward: L_i = LSE_i(S) - mean_{j in pos(i)} S_ij - log k_i."""
    case = data.draw(cases(sdm_impl, dtypes=FAST_DTYPES + (torch.float64,), label_kinds=("ids", "binary"),
                           mask_kinds=("none",)))
    opts = data.draw(sdm_options(kl=("forward",), reduction=("none",)))
    out = case.call(sdm_impl, *case.leaves()[:2], **opts)
    S, y = _logits64(case), case.y().cpu()
    truth = truth_for(case, opts, grad_outputs(case, opts, 0))
    for name, logits, pos in (("q2g", S, y), ("g2q", S.T, y.T)):
        if name not in directions(opts):
            continue
        k = pos.sum(dim=1)
        closed = torch.logsumexp(logits, dim=1) - (logits * pos).sum(dim=1) / k.clamp_min(1) - torch.log(k.clamp_min(1))
        closed = torch.where(k > 0, closed, 0.0)
        assert_close(f"{name} closed form", getattr(out, name), closed, closed, truth.loss_floor,
                     RTOL[truth.compute_dtype], case)


@backend_property()
def test_logit_scale_gradient_matches_finite_differences(sdm_impl, data):
    """float64: dL/d logit_scale equals a central finite difference of the loss."""
    case = data.draw(cases(sdm_impl, dtypes=(torch.float64,), logit_scale=True))
    opts = data.draw(sdm_options())
    gout = grad_outputs(case, opts, data.draw(st.integers(0, 2**31)))
    result = run(sdm_impl, case, opts, gout)
    truth = truth_for(case, opts, gout)

    def objective(scale_value):
        scale = torch.tensor(scale_value, dtype=F64, device=case.q.device)
        out = case.call(sdm_impl, case.q, case.g, scale, **opts)
        if opts["reduction"] == "none":
            return sum(float((gout[n].to(case.q.device) * getattr(out, n)).sum()) for n in directions(opts))
        return gout * float(out)

    # dS/ds = cos(q, g) lies in [-1, 1], so every derivative of L in s is O(weights) whatever
    # s is, and an absolute step suits every scale. Richardson-extrapolated central
    # differences leave a truncation error ~h^4 (1e-12) and a rounding error ~u|L|/h (1e-13).
    s, h = case.scale_value(), 1e-3

    def central(step):
        return (objective(s + step) - objective(s - step)) / (2 * step)

    fd = (4 * central(h / 2) - central(h)) / 3
    got = float(result.grads["scale"])
    size = truth.total_weight * (1 + (abs(math.log(opts["eps"])) if opts["kl"] == "reverse" else 0))
    assert abs(got - fd) <= 1e-9 * size + 1e-9 * abs(fd), f"dL/ds = {got!r}, finite difference {fd!r} for {case}"


@backend_property(examples=2)
def test_agrees_with_float64_evaluation(sdm_impl, data):
    """Loss, per-row losses, validity and gradients (q, g, logit_scale) agree with the float64
    evaluation of SPEC's definition: relative 1e-5 for fp32 inputs (1e-12 for float64),
    plus the fp32 error floor; all options, ids and dense labels, masks, grad_output != 1."""
    case = data.draw(cases(sdm_impl, dtypes=(torch.float32, torch.float64)))
    opts = data.draw(sdm_options(normalize=(True, False)))
    gout = grad_outputs(case, opts, data.draw(st.integers(0, 2**31)))
    _compare.assert_close_to_reference(sdm_impl, case, opts, grad_output=gout, reference=TRUTH)


@backend_property()
def test_half_inputs_are_computed_in_fp32(sdm_impl, data):
    """bf16 / fp16 inputs: loss and per-row losses match the float64 evaluation on the same
    half-valued inputs to fp32 accuracy (SPEC, precision); gradients, returned in the input
    dtype, to fp32 accuracy plus twice the rounding to that dtype. fp16 cases keep their
    exact gradients inside the fp16 range."""
    case = data.draw(cases(sdm_impl, dtypes=HALF_DTYPES))
    opts = data.draw(sdm_options())
    gout = grad_outputs(case, opts, data.draw(st.integers(0, 2**31)))
    _compare.assert_close_to_reference(sdm_impl, case, opts, grad_output=gout, reference=TRUTH,
                                      grad_extra_rtol=2 * UNIT_ROUNDOFF[case.dtype])


@backend_property(examples=0.5)
def test_noncontiguous_inputs_give_the_same_result(sdm_impl, data):
    """Transposed or strided q and g, with ids / masks taken as a column of a table, strided
    or expanded, and transposed, strided or expanded dense labels (SPEC, input hygiene: any
    strides for every tensor argument) give the loss, per-row losses and gradients of the
    contiguous copies."""
    non_contiguous = tuple(layout for layout in ARG_LAYOUTS if layout != "contiguous")
    case = data.draw(cases(sdm_impl, dtypes=FAST_DTYPES, layouts=("transposed", "strided"),
                           arg_layouts=non_contiguous))
    opts = data.draw(sdm_options())
    gout = grad_outputs(case, opts, 5)
    truth = truth_for(case, opts, gout)
    _compare.assume_gradients_fit(case, truth)
    strided = run(sdm_impl, case, opts, gout)
    dense_case = case.contiguous()
    dense = run(sdm_impl, dense_case, opts, gout)
    rtol = RTOL[truth.compute_dtype]
    assert_close("loss", strided.value, dense.value, dense.value, 2 * truth.value_floor, 2 * rtol, case)
    for name in dense.rows:
        assert torch.equal(strided.valid[name], dense.valid[name]), f"{name}_valid differs for {case}"
        assert_close(f"{name} rows", strided.rows[name], dense.rows[name], dense.rows[name],
                     2 * truth.loss_floor, 2 * rtol, case)
    for name in ("q", "g"):
        assert strided.grads[name].shape == dense.grads[name].shape
        assert_close(f"d/d{name}", strided.grads[name], dense.grads[name], dense.grads[name],
                     2 * truth.grad_floors[name], 2 * rtol, case, row_wise=True,
                     extra_rtol=2 * UNIT_ROUNDOFF[case.dtype] if case.dtype in HALF_DTYPES else 0.0)


@pytest.mark.gpu
def test_more_than_2_31_logits(sdm_impl):
    """N * M > 2^31 (offsets into N x M need 64 bits): one match per row, forward, both
    directions; per-row losses against a float64 cross-entropy evaluated in column chunks,
    and finite gradients."""
    if sdm_impl.name == "reference":
        pytest.skip("the reference materialises N x M several times (~9 GB each at this size)")
    n = m = 46_400                                           # n * m = 2.153e9 > 2^31
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(n, 12, device="cuda", generator=gen)
    g = torch.randn(m, 12, device="cuda", generator=gen)
    q_ids = torch.arange(n, device="cuda")
    g_ids = torch.empty_like(q_ids)
    g_ids[torch.randperm(n, device="cuda", generator=gen)] = q_ids    # any one-to-one matching
    tau = 0.05
    q_leaf, g_leaf = q.clone().requires_grad_(), g.clone().requires_grad_()
    out = sdm_impl(q_leaf, g_leaf, q_ids, g_ids, temperature=tau, reduction="none")
    (out.q2g.sum() + out.g2q.sum()).backward()

    qh, gh = F.normalize(q.double(), dim=1), F.normalize(g.double(), dim=1)
    pos = (qh * gh[torch.argsort(g_ids)]).sum(dim=1) / tau        # S[i, match of q row i]
    row_lse = torch.empty(n, dtype=F64, device="cuda")
    col_lse = torch.full((m,), -math.inf, dtype=F64, device="cuda")
    for i in range(0, n, 4096):
        S = qh[i:i + 4096] @ gh.T / tau
        row_lse[i:i + 4096] = torch.logsumexp(S, dim=1)
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(S, dim=0))
    atol = FLOOR_ULPS * UNIT_ROUNDOFF[torch.float32] * (1 + 1 / tau + math.log(m))
    torch.testing.assert_close(out.q2g.double(), row_lse - pos, rtol=1e-5, atol=atol)
    torch.testing.assert_close(out.g2q.double(), col_lse - pos[g_ids], rtol=1e-5, atol=atol)   # q row of id k is k
    assert bool(torch.isfinite(q_leaf.grad).all()) and bool(torch.isfinite(g_leaf.grad).all())
