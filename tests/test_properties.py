"""The properties of docs/contract.md, as Hypothesis tests run unchanged on every backend.

Truth is this file's own float64 evaluation of SPEC's definition (``evaluate``), written
independently of ``reference/sdm.py``: dense and loop-free, absent samples handled by
explicit masks and a masked ``logsumexp`` instead of removing them by indexing, the
forward divergence through ``xlogy`` instead of a guarded log.

Tolerances. The loss is computed in fp32 (float64 for float64 inputs) whatever the
input dtype, so results are compared with ``rtol * |truth| + floor``:

* ``rtol`` is SPEC's 1e-5 for the fp32 compute dtype, 1e-12 for float64;
* ``floor`` is the error fp32 itself cannot avoid, from a first-order error model
  (``floors``): a logit carries an absolute error of a few units of roundoff times its
  magnitude, which the loss inherits through ``logsumexp`` and the gradient through
  ``dL/dS``; a near-zero loss (a near-perfect match) is a difference of O(s) terms and
  cannot be known better than ``u * s`` (see ``truth_for``). ``FLOOR_ULPS`` multiplies the
  model; it was set by measuring the reference and an fp32 evaluation of this file's
  formula over thousands of cases: their largest error/model ratios were 2.6 and 4.5
  (losses, gradients), so 16 leaves a margin for other summation orders;
* and never less than ``BASELINE_FACTOR`` times the error of PyTorch computing this
  file's formula in the compute dtype (the measured baseline of STYLE.md), so a case
  that fp32 itself computes badly does not fail a backend that is as good as fp32.

For bf16 / fp16 inputs the loss keeps the fp32 tolerance (SPEC's precision section);
gradients come back in the input dtype and may add the rounding to it (``2 u_half``).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st

from sdm_triton.reference import SDMRowLosses
from strategies import ARG_LAYOUTS, FAST_DTYPES, HALF_DTYPES, backend_property, cases, log_uniform, sdm_options

F64 = torch.float64
NORM_EPS = 1e-12            # SPEC step 1: F.normalize semantics, F.normalize's default eps
DIRECTIONS = ("q2g", "g2q")
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
FLOOR_ULPS = 16.0
BASELINE_FACTOR = 4.0


def compute_dtype(dtype):
    return F64 if dtype == F64 else torch.float32


# --------------------------------------------------------------------------- float64 truth

@dataclasses.dataclass
class Side:
    """One direction of the evaluation: per-row losses, validity, and |dL_i/dS_ij| magnitudes."""

    loss: torch.Tensor       # [rows]
    valid: torch.Tensor      # [rows] bool
    magnitude: torch.Tensor  # [rows, cols]: sum of |terms| of dL_i/dS_ij (for the error floors)


def _side(S, y, row_keep, col_keep, kl, eps):
    """Rows of S against y: P = softmax over kept columns, Y = y / sum y; SPEC steps 3-4."""
    k = y.sum(dim=1)
    valid = row_keep & (k > 0)
    if not bool(col_keep.any()):
        return Side(S.sum(dim=1) * 0, valid, torch.zeros_like(S.detach()))
    lse = torch.logsumexp(S.masked_fill(~col_keep, -math.inf), dim=1, keepdim=True)
    log_p = torch.where(col_keep, S - lse, 0.0)          # finite everywhere, 0 on absent columns
    p = torch.where(col_keep, log_p.exp(), 0.0)
    Y = y / torch.where(k > 0, k, 1.0)[:, None]
    if kl == "forward":
        terms = torch.xlogy(Y, Y) - Y * log_p                # 0 log 0 = 0
        magnitude = p + Y
    else:
        log_y = torch.log(Y + eps)
        terms = p * (log_p - log_y)
        magnitude = p * (1 + log_p.abs() + log_y.abs() + terms.sum(dim=1, keepdim=True).abs())
    loss = torch.where(valid, terms.sum(dim=1), 0.0)
    magnitude = torch.where(valid[:, None], magnitude.detach(), 0.0)
    return Side(loss, valid, magnitude)


def evaluate(case, q, g, scale, opts, dtype=F64):
    """SPEC's definition in ``dtype`` on the given (grad-requiring) q, g and scale tensor.

    Returns the logits S and a dict direction -> Side for the directions asked for.
    """
    qx, gx = q.to(dtype), g.to(dtype)
    s = scale.to(dtype) if scale is not None else case.scale_value()
    if opts["normalize"]:
        qx = qx / qx.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        gx = gx / gx.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    S = s * (qx @ gx.T)
    q_keep, g_keep = case.keep()
    y = case.y(dtype) * (q_keep[:, None] & g_keep[None, :])
    sides = {}
    if opts["direction"] in ("both", "q2g"):
        sides["q2g"] = _side(S, y, q_keep, g_keep, opts["kl"], opts["eps"])
    if opts["direction"] in ("both", "g2q"):
        sides["g2q"] = _side(S.T, y.T, g_keep, q_keep, opts["kl"], opts["eps"])
    return S, sides


def reduction_weights(sides, opts):
    """w per direction such that the returned scalar is sum_i w_i L_i (SPEC step 6)."""
    half = 0.5 if len(sides) == 2 and opts["combine"] == "mean" else 1.0
    weights = {}
    for name, side in sides.items():
        w = torch.full_like(side.loss.detach(), half)
        if opts["reduction"] == "mean":
            w = w / max(1, int(side.valid.sum()))
        weights[name] = w
    return weights


# --------------------------------------------------------------------------- running

@dataclasses.dataclass
class Result:
    """A call's output and the gradients of ``objective = <grad_output, output>``."""

    value: torch.Tensor                 # scalar loss, or objective value for reduction="none"
    rows: dict                          # direction -> per-row losses (reduction="none" only)
    valid: dict                         # direction -> validity (reduction="none" only)
    grads: dict                         # "q", "g", "scale" -> gradient (None: not asked for)


def _grads(objective, leaves):
    names = ("q", "g", "scale")
    wanted = [(n, t) for n, t in zip(names, leaves) if t is not None]
    if not objective.requires_grad:     # nothing depends on the inputs: zero gradient
        got = [None] * len(wanted)
    else:
        got = torch.autograd.grad(objective, [t for _, t in wanted], allow_unused=True)
    out = dict.fromkeys(names)
    for (name, t), d in zip(wanted, got):
        out[name] = torch.zeros_like(t) if d is None else d
    return out


def grad_outputs(case, opts, seed):
    """grad_output != 1: a scalar for reduced losses, random per-row weights for "none"."""
    gen = torch.Generator().manual_seed(seed)
    if opts["reduction"] != "none":
        return float(torch.empty(()).uniform_(0.25, 3.0, generator=gen)) * (1 if seed % 2 else -1)
    return {name: torch.randn(size, generator=gen, dtype=F64)
            for name, size in (("q2g", case.n), ("g2q", case.m))}


def run_backend(sdm_impl, case, opts, gout=1.0, q=None, g=None):
    """Call the backend on fresh leaves of the case and differentiate <gout, output>."""
    lq, lg, ls = case.leaves(q, g)
    out = case.call(sdm_impl, lq, lg, ls, **opts)
    if opts["reduction"] == "none":
        assert isinstance(out, SDMRowLosses), f"reduction='none' must return SDMRowLosses, got {type(out)}"
        rows, valid, objective = {}, {}, 0
        for name in DIRECTIONS:
            loss, ok = getattr(out, name), getattr(out, name + "_valid")
            if name not in _directions(opts):
                assert loss is None and ok is None, f"{name} was not asked for but returned"
                continue
            assert loss.shape == ok.shape == (case.n if name == "q2g" else case.m,)
            assert ok.dtype == torch.bool
            rows[name], valid[name] = loss, ok
            objective = objective + (gout[name].to(loss.device, loss.dtype) * loss).sum()
        value = objective.detach()
    else:
        assert out.dim() == 0, f"reduction={opts['reduction']!r} must return a 0-dim tensor"
        rows, valid, value = {}, {}, out.detach()
        objective = gout * out
    return Result(value, rows, valid, _grads(objective, (lq, lg, ls)))


def _directions(opts):
    return DIRECTIONS if opts["direction"] == "both" else (opts["direction"],)


@dataclasses.dataclass
class Truth:
    """The float64 evaluation of a case: values, gradients and the error floors of fp32."""

    result: Result
    baseline: Result                    # the same formula computed in the compute dtype
    loss_floor: float                   # per row loss
    total_weight: float                 # sum of |weights| of the rows in the objective
    value_floor: float                  # the scalar (weighted sum of rows)
    grad_floors: dict                   # "q": [N], "g": [M], "scale": scalar
    compute_dtype: torch.dtype


def _evaluate_result(case, opts, gout, dtype):
    lq, lg, ls = case.leaves()
    S, sides = evaluate(case, lq, lg, ls, opts, dtype)
    if opts["reduction"] == "none":
        weights = {name: gout[name].to(side.loss.device, dtype) for name, side in sides.items()}
        value = sum((weights[name] * side.loss).sum() for name, side in sides.items())
        objective = value
        rows = {name: side.loss.detach() for name, side in sides.items()}
        valid = {name: side.valid for name, side in sides.items()}
    else:
        weights = reduction_weights(sides, opts)
        value = sum((weights[name] * side.loss).sum() for name, side in sides.items())
        objective = gout * value
        weights = {name: gout * w for name, w in weights.items()}
        rows, valid = {}, {}
    grads = _grads(objective, (lq, lg, ls))
    return Result(value.detach(), rows, valid, grads), S.detach(), sides, weights, (lq, lg)


def truth_for(case, opts, gout=1.0):
    """Float64 truth, the compute-dtype baseline, and the floors of the error model."""
    result, S, sides, weights, (lq, lg) = _evaluate_result(case, opts, gout, F64)
    ct = compute_dtype(case.dtype)
    baseline = _evaluate_result(case, opts, gout, ct)[0]
    u = UNIT_ROUNDOFF[ct]
    q_keep, g_keep = case.keep()
    pairs = q_keep[:, None] & g_keep[None, :]
    s_max = float(S.abs().masked_fill(~pairs, 0).max()) if bool(pairs.any()) else 0.0
    terms = 1 + s_max + math.log(max(case.n, case.m)) + (abs(math.log(opts["eps"])) if opts["kl"] == "reverse" else 0)
    # Contributions of a unit error in every logit, weighted as the objective weighs rows.
    unit = FLOOR_ULPS * u * terms
    A = torch.zeros_like(S)
    for name, side in sides.items():
        contrib = weights[name].abs().to(F64)[:, None] * side.magnitude
        A = A + (contrib if name == "q2g" else contrib.T)
    s = case.scale_value()
    qn, gn = lq.detach().double().norm(dim=1), lg.detach().double().norm(dim=1)
    if opts["normalize"]:
        q_in, g_in = qn / qn.clamp_min(NORM_EPS), gn / gn.clamp_min(NORM_EPS)   # |q_hat|
        q_div, g_div = qn.clamp_min(NORM_EPS), gn.clamp_min(NORM_EPS)
    else:
        q_in, g_in, q_div, g_div = qn, gn, torch.ones_like(qn), torch.ones_like(gn)
    # Below the normal range relative precision ends: a probability that underflows the
    # compute dtype errs by an absolute amount (`tiny` on every dL/dS_ij, then amplified
    # like any other error, e.g. by 1 / NORM_EPS at a zero row), and a half gradient in
    # fp16's subnormal range by the subnormal spacing (times sqrt(D) for a row's 2-norm).
    tiny = FLOOR_ULPS * torch.finfo(ct).tiny
    E = unit * A + tiny                                          # error bound of each dL/dS_ij
    out_tiny = 0.0
    if case.dtype in HALF_DTYPES:
        info = torch.finfo(case.dtype)
        out_tiny = 2 * info.smallest_normal * info.eps * math.sqrt(case.q.shape[1])
    grad_floors = {
        "q": (s * (E @ g_in) / q_div + out_tiny).cpu(),
        "g": (s * (E.T @ q_in) / g_div + out_tiny).cpu(),
        "scale": torch.tensor(float((E * S.abs()).sum()) / s),
    }
    total_weight = sum(float(w.abs().sum()) for w in weights.values())
    return Truth(result, baseline, unit + tiny, total_weight, unit * total_weight + tiny, grad_floors, ct)


# --------------------------------------------------------------------------- comparisons

def _report(what, err, tol, case):
    ratio = err / tol
    worst = int(ratio.argmax()) if ratio.dim() else None
    return (f"{what}: error {float(err.max()):.3e} > tolerance {float(tol.flatten()[worst or 0]):.3e}"
            f" (worst index {worst}, error/tolerance {float(ratio.max()):.2f}) for {case}")


def assert_close(what, actual, truth, baseline, floor, rtol, case, row_wise=False, extra_rtol=0.0):
    """|actual - truth| <= (rtol + extra_rtol) |truth| + max(floor, BASELINE_FACTOR * |baseline - truth|).

    ``row_wise``: rows of a matrix compared by their 2-norm (gradients of q and g).
    """
    actual = actual.detach().to(F64).cpu()
    truth = truth.detach().to(F64).cpu()
    baseline = baseline.detach().to(F64).cpu()
    floor = torch.as_tensor(floor, dtype=F64).cpu()

    def size(x):
        return x.norm(dim=1) if row_wise else x.abs()

    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert bool(torch.isfinite(actual).all()), f"{what}: not finite for {case}"
    err = size(actual - truth)
    tol = (rtol + extra_rtol) * size(truth) + torch.maximum(floor, BASELINE_FACTOR * size(baseline - truth))
    assert bool((err <= tol).all()), _report(what, err, tol, case)


def assume_gradients_fit(case, truth):
    """Skip an fp16 example whose exact gradient is beyond fp16's range (it cannot be returned)."""
    if case.dtype == torch.float16:
        top = torch.finfo(torch.float16).max / 2
        assume(all(bool((truth.result.grads[n].abs() < top).all()) for n in ("q", "g")))


def assert_matches_truth(result, truth, case, grad_extra_rtol=0.0):
    """Values, per-row losses, validity and gradients of ``result`` against the float64 truth."""
    rtol = RTOL[truth.compute_dtype]
    t, b = truth.result, truth.baseline
    assert_close("loss", result.value, t.value, b.value, truth.value_floor, rtol, case)
    for name in t.rows:
        assert torch.equal(result.valid[name].cpu(), t.valid[name].cpu()), f"{name}_valid differs for {case}"
        assert_close(f"{name} row losses", result.rows[name], t.rows[name], b.rows[name], truth.loss_floor,
                     rtol, case)
    for name in ("q", "g", "scale"):
        if t.grads[name] is None:
            continue
        assert result.grads[name] is not None, f"no gradient for {name}"
        assert_close(f"d/d{name}", result.grads[name], t.grads[name], b.grads[name], truth.grad_floors[name],
                     rtol, case, row_wise=name != "scale", extra_rtol=grad_extra_rtol)


# --------------------------------------------------------------------------- properties

@backend_property()
def test_forward_loss_is_nonnegative(sdm_impl, data):
    """forward: every row loss and the reduced loss are >= 0, exactly, for every dtype,
    temperature in [0.005, 10] and feature norm in [1e-4, 1e4]; invalid rows are 0."""
    case = data.draw(cases(sdm_impl, dtypes=FAST_DTYPES, fp16_grads_fit=False))
    opts = data.draw(sdm_options(kl=("forward",)))
    q, g, _ = case.leaves()
    rows = case.call(sdm_impl, q, g, **{**opts, "reduction": "none"})
    for name in _directions(opts):
        loss, valid = getattr(rows, name), getattr(rows, name + "_valid")
        assert bool((loss >= 0).all()), f"{name}: negative row loss {float(loss.min())} for {case}"
        assert bool((loss[~valid] == 0).all()), f"{name}: invalid rows must hold 0 for {case}"
    if opts["reduction"] != "none":
        out = case.call(sdm_impl, q, g, **opts).detach()
        assert float(out) >= 0, f"negative loss {float(out)} for {case}"


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
    out = case.call(sdm_impl, *case.leaves()[:2], **opts)
    truth = truth_for(case, opts, grad_outputs(case, opts, 0))
    q_keep, g_keep = case.keep()
    for name in _directions(opts):
        cols = int((g_keep if name == "q2g" else q_keep).sum())
        bound = -math.log1p(cols * opts["eps"])
        rows = getattr(out, name).double().cpu()
        slack = truth.loss_floor
        assert bool((rows >= bound - slack).all()), \
            f"{name}: row loss {float(rows.min()):.3e} below -log(1 + M eps) = {bound:.3e} (slack {slack:.1e}) for {case}"


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
    result = run_backend(sdm_impl, case, opts, gout)
    assert bool(torch.isfinite(result.value)), f"loss not finite for {case}"
    for name, rows in result.rows.items():
        assert bool(torch.isfinite(rows).all()), f"{name} row losses not finite for {case}"
    fits = {}
    if case.dtype == torch.float16:
        exact = truth_for(case, opts, gout).result.grads
        fits = {name: exact[name].abs() < torch.finfo(torch.float16).max for name in ("q", "g")}
    for name, grad in result.grads.items():
        if grad is None:
            continue
        finite = torch.isfinite(grad)
        if name in fits:
            finite = finite | ~fits[name].to(grad.device)
        assert bool(finite.all()), f"d/d{name} not finite for {case}"


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
    gout = grad_outputs(case, opts, 1)
    truth = truth_for(case, opts, gout)
    base = run_backend(sdm_impl, case, opts, gout)
    rtol = RTOL[truth.compute_dtype]
    for scaled in (dict(q=case.q * c), dict(g=case.g * c)):
        got = run_backend(sdm_impl, case, opts, gout, **scaled)
        # Twice the error budget: both calls may err by the floor in opposite directions.
        assert_close("scaled loss", got.value, base.value, base.value, 2 * truth.value_floor, 2 * rtol, case)
        for name in base.rows:
            assert_close(f"scaled {name} rows", got.rows[name], base.rows[name], base.rows[name],
                         2 * truth.loss_floor, 2 * rtol, case)


@backend_property()
def test_mask_equals_subset(sdm_impl, data):
    """A masked call equals the call on the kept samples (loss, per-row losses, gradients of
    kept samples); masked samples get exactly zero gradient and are invalid rows."""
    case = data.draw(cases(sdm_impl, dtypes=FAST_DTYPES + (torch.float64,),
                           mask_kinds=("random", "all_false", "kill_positives")))
    opts = data.draw(sdm_options())
    q_keep, g_keep = case.keep()
    gout = grad_outputs(case, opts, data.draw(st.integers(0, 2**31)))
    masked = run_backend(sdm_impl, case, opts, gout)
    truth = truth_for(case, opts, gout)
    assume_gradients_fit(case, truth)
    for name, keep in (("q", q_keep), ("g", g_keep)):
        dropped = masked.grads[name][~keep]
        assert bool((dropped == 0).all()), f"masked {name} rows got gradient {float(dropped.abs().max())} for {case}"
    for name, keep in zip(DIRECTIONS, (q_keep, g_keep)):
        if name in masked.rows:
            assert bool((masked.rows[name][~keep] == 0).all()) and not bool(masked.valid[name][~keep].any()), \
                f"masked {name} rows must be invalid with loss 0 for {case}"

    if not bool(q_keep.any()) or not bool(g_keep.any()):
        # The subset is empty on one side: no row is valid, the loss is 0, no gradient.
        assert float(masked.value) == 0, f"loss {float(masked.value)} with an empty side for {case}"
        for name in ("q", "g", "scale"):
            if masked.grads[name] is not None:
                assert bool((masked.grads[name] == 0).all()), f"d/d{name} nonzero with an empty side"
        return
    sub = dataclasses.replace(
        case, q=case.q[q_keep], g=case.g[g_keep], q_mask=None, g_mask=None,
        q_ids=None if case.q_ids is None else case.q_ids[q_keep],
        g_ids=None if case.g_ids is None else case.g_ids[g_keep],
        labels=None if case.labels is None else case.labels[q_keep][:, g_keep])
    sub_gout = gout if opts["reduction"] != "none" else {"q2g": gout["q2g"][q_keep.cpu()],
                                                         "g2q": gout["g2q"][g_keep.cpu()]}
    subset = run_backend(sdm_impl, sub, opts, sub_gout)
    rtol = RTOL[truth.compute_dtype]
    assert_close("loss vs subset", masked.value, subset.value, subset.value, 2 * truth.value_floor, 2 * rtol, case)
    for name, keep in zip(DIRECTIONS, (q_keep, g_keep)):
        if name in masked.rows:
            assert torch.equal(masked.valid[name][keep], subset.valid[name]), f"{name}_valid vs subset for {case}"
            assert_close(f"{name} rows vs subset", masked.rows[name][keep], subset.rows[name], subset.rows[name],
                         2 * truth.loss_floor, 2 * rtol, case)
    extra = 2 * UNIT_ROUNDOFF[case.dtype] if case.dtype in HALF_DTYPES else 0.0
    for name, keep in (("q", q_keep), ("g", g_keep)):
        assert_close(f"d/d{name} vs subset", masked.grads[name][keep], subset.grads[name], subset.grads[name],
                     2 * truth.grad_floors[name][keep.cpu()], 2 * rtol, case, row_wise=True, extra_rtol=extra)
    if masked.grads["scale"] is not None:
        assert_close("d/dscale vs subset", masked.grads["scale"], subset.grads["scale"], subset.grads["scale"],
                     2 * truth.grad_floors["scale"], 2 * rtol, case)


@backend_property()
def test_invalid_rows_have_no_loss_and_no_gradient(sdm_impl, data):
    """One direction only: a row with no positive among the kept columns (or a masked row)
    contributes 0 and its own features get exactly zero gradient."""
    case = data.draw(cases(sdm_impl, label_kinds=("ids", "soft", "binary")))
    direction = data.draw(st.sampled_from(("q2g", "g2q")))
    opts = data.draw(sdm_options(direction=(direction,), reduction=("none",)))
    result = run_backend(sdm_impl, case, opts, grad_outputs(case, opts, 7))
    valid = result.valid[direction]
    truth_valid = truth_for(case, opts, grad_outputs(case, opts, 7)).result.valid[direction]
    assert torch.equal(valid.cpu(), truth_valid.cpu()), f"{direction}_valid wrong for {case}"
    assume(not bool(valid.all()))
    own = result.grads["q" if direction == "q2g" else "g"]
    assert bool((result.rows[direction][~valid] == 0).all()), f"invalid rows hold a loss for {case}"
    assert bool((own[~valid] == 0).all()), f"invalid rows got gradient for {case}"


@backend_property()
def test_permutation_equivariance(sdm_impl, data):
    """Permuting the rows of q (with q_ids / label rows / q_mask) and of g jointly permutes
    the per-row losses and the gradients the same way."""
    case = data.draw(cases(sdm_impl, dtypes=FAST_DTYPES + (torch.float64,)))
    opts = data.draw(sdm_options(reduction=("none",)))
    pq = torch.tensor(data.draw(st.permutations(range(case.n))), device=case.q.device)
    pg = torch.tensor(data.draw(st.permutations(range(case.m))), device=case.q.device)
    gout = grad_outputs(case, opts, 3)
    truth = truth_for(case, opts, gout)
    assume_gradients_fit(case, truth)
    base = run_backend(sdm_impl, case, opts, gout)

    def take(t, p):
        return None if t is None else t[p]

    perm = dataclasses.replace(
        case, q=case.q[pq], g=case.g[pg], q_ids=take(case.q_ids, pq), g_ids=take(case.g_ids, pg),
        q_mask=take(case.q_mask, pq), g_mask=take(case.g_mask, pg),
        labels=None if case.labels is None else case.labels[pq][:, pg])
    permuted = run_backend(sdm_impl, perm, opts, {"q2g": gout["q2g"][pq.cpu()], "g2q": gout["g2q"][pg.cpu()]})
    rtol = RTOL[truth.compute_dtype]
    extra = 2 * UNIT_ROUNDOFF[case.dtype] if case.dtype in HALF_DTYPES else 0.0
    for name, p in zip(DIRECTIONS, (pq, pg)):
        if name in base.rows:
            assert torch.equal(permuted.valid[name], base.valid[name][p]), f"{name}_valid not permuted for {case}"
            assert_close(f"permuted {name} rows", permuted.rows[name], base.rows[name][p], base.rows[name][p],
                         2 * truth.loss_floor, 2 * rtol, case)
    for name, p in (("q", pq), ("g", pg)):
        assert_close(f"permuted d/d{name}", permuted.grads[name], base.grads[name][p], base.grads[name][p],
                     2 * truth.grad_floors[name][p.cpu()], 2 * rtol, case, row_wise=True, extra_rtol=extra)


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
        if name not in _directions(opts):
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
        if name not in _directions(opts):
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
    result = run_backend(sdm_impl, case, opts, gout)
    truth = truth_for(case, opts, gout)

    def objective(scale_value):
        scale = torch.tensor(scale_value, dtype=F64, device=case.q.device)
        out = case.call(sdm_impl, case.q, case.g, scale, **opts)
        if opts["reduction"] == "none":
            return sum(float((gout[n].to(case.q.device) * getattr(out, n)).sum()) for n in _directions(opts))
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
    assert_matches_truth(run_backend(sdm_impl, case, opts, gout), truth_for(case, opts, gout), case)


@backend_property()
def test_half_inputs_are_computed_in_fp32(sdm_impl, data):
    """bf16 / fp16 inputs: loss and per-row losses match the float64 evaluation on the same
    half-valued inputs to fp32 accuracy (SPEC, precision); gradients, returned in the input
    dtype, to fp32 accuracy plus twice the rounding to that dtype. fp16 cases keep their
    exact gradients inside the fp16 range."""
    case = data.draw(cases(sdm_impl, dtypes=HALF_DTYPES))
    opts = data.draw(sdm_options())
    gout = grad_outputs(case, opts, data.draw(st.integers(0, 2**31)))
    truth = truth_for(case, opts, gout)
    assume_gradients_fit(case, truth)
    assert_matches_truth(run_backend(sdm_impl, case, opts, gout), truth, case,
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
    assume_gradients_fit(case, truth)
    strided = run_backend(sdm_impl, case, opts, gout)
    dense_case = case.contiguous()
    dense = run_backend(sdm_impl, dense_case, opts, gout)
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
