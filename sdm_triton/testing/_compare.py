"""Comparing an implementation with a float64 evaluation, by SPEC's dtype-aware rule.

The truth is an oracle (``sdm_triton.reference.sdm_loss`` unless told otherwise) run on the
problem's inputs converted to float64; gradients flow back to the problem's own leaves.
Results are compared with ``rtol * |truth| + floor``:

* ``rtol`` is SPEC's 1e-5 for the fp32 compute dtype, 1e-12 for float64;
* ``floor`` is the error fp32 itself cannot avoid, from a first-order error model
  (``truth_for``): a logit carries an absolute error of a few units of roundoff times its
  magnitude, which the loss inherits through ``logsumexp`` and the gradient through
  ``dL/dS``; a near-zero loss (a near-perfect match) is a difference of O(s) terms and
  cannot be known better than ``u * s``. ``FLOOR_ULPS`` multiplies the model; it was set by
  measuring the reference and an fp32 evaluation of the dense formula over thousands of
  problems: their largest error/model ratios were 2.6 and 4.5 (losses, gradients), so 16
  leaves a margin for other summation orders;
* and never less than ``BASELINE_FACTOR`` times the error of the oracle computing the same
  problem in the compute dtype (STYLE.md's measured baseline), so a problem that fp32 itself
  computes badly does not fail an implementation that is as good as fp32.

For bf16 / fp16 inputs the loss keeps the fp32 tolerance (SPEC's precision section);
gradients come back in the input dtype and may add the rounding to it (``2 u_half``).

The error model needs the softmax of every row; ``evaluate`` computes it with SPEC's
definition written dense and loop-free (absent samples handled by explicit masks and a masked
``logsumexp``, the forward divergence through ``xlogy``), independently of
``sdm_triton.reference``. ``dense_reference`` is that evaluation with ``sdm_loss``'s signature:
the oracle this project tests ``sdm_triton.reference`` itself against.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
from hypothesis import assume
from hypothesis.errors import HypothesisException

from sdm_triton.options import NORM_EPS, SDMRowLosses

from ._problems import HALF_DTYPES

F64 = torch.float64
DIRECTIONS = ("q2g", "g2q")
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
FLOOR_ULPS = 16.0
BASELINE_FACTOR = 4.0
# sdm_loss's defaults: an option left out of an options dict means this value
DEFAULT_OPTIONS = dict(kl="forward", eps=1e-8, direction="both", combine="mean", reduction="mean", normalize=True)


def compute_dtype(dtype):
    return F64 if dtype == F64 else torch.float32


def full_options(options) -> dict:
    """``options`` with the omitted ones at ``sdm_loss``'s defaults."""
    unknown = set(options or {}) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown sdm_loss options {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)}")
    return {**DEFAULT_OPTIONS, **(options or {})}


def directions(options):
    direction = full_options(options)["direction"]
    return DIRECTIONS if direction == "both" else (direction,)


def describe(problem, options=None) -> str:
    """The repro of a failure: the problem's ``problem(...)`` call and the options."""
    text = f"\n  problem = {problem!r}"
    if options is not None:
        text += f"\n  options = {dict(options)!r}"
    return text


# --------------------------------------------------------------------------- float64 evaluation

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


def _evaluate(q, g, y, q_keep, g_keep, s, opts, dtype):
    """SPEC's definition in ``dtype``: the logits S and a dict direction -> Side."""
    qx, gx = q.to(dtype), g.to(dtype)
    # absent samples may hold anything (NaN included): whatever is not finite there becomes 0
    qx = torch.where(q_keep[:, None], qx, qx.nan_to_num(0.0, 0.0, 0.0))
    gx = torch.where(g_keep[:, None], gx, gx.nan_to_num(0.0, 0.0, 0.0))
    s = s.to(dtype) if isinstance(s, torch.Tensor) else s
    if opts["normalize"]:
        qx = qx / qx.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        gx = gx / gx.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    S = s * (qx @ gx.T)
    y = y.to(dtype) * (q_keep[:, None] & g_keep[None, :])
    sides = {}
    if opts["direction"] in ("both", "q2g"):
        sides["q2g"] = _side(S, y, q_keep, g_keep, opts["kl"], opts["eps"])
    if opts["direction"] in ("both", "g2q"):
        sides["g2q"] = _side(S.T, y.T, g_keep, q_keep, opts["kl"], opts["eps"])
    return S, sides


def evaluate(problem, q, g, scale, options, dtype=F64):
    """SPEC's definition in ``dtype`` on the given (grad-requiring) q, g and scale tensor of
    ``problem``. Returns the logits S and a dict direction -> Side for the directions asked for."""
    s = scale if scale is not None else problem.scale_value()
    q_keep, g_keep = problem.keep()
    return _evaluate(q, g, problem.y(dtype), q_keep, g_keep, s, full_options(options), dtype)


def reduction_weights(sides, options):
    """w per direction such that the returned scalar is sum_i w_i L_i (SPEC step 6)."""
    opts = full_options(options)
    half = 0.5 if len(sides) == 2 and opts["combine"] == "mean" else 1.0
    weights = {}
    for name, side in sides.items():
        w = torch.full_like(side.loss.detach(), half)
        if opts["reduction"] == "mean":
            w = w / max(1, int(side.valid.sum()))
        weights[name] = w
    return weights


def dense_reference(q, g, q_ids=None, g_ids=None, *, labels=None, q_mask=None, g_mask=None, temperature=0.02,
                    logit_scale=None, kl="forward", eps=1e-8, direction="both", combine="mean", reduction="mean",
                    normalize=True):
    """SPEC's definition, dense and loop-free, in fp32 (float64 for float64 inputs), with
    ``sdm_loss``'s signature: a second oracle, written independently of ``sdm_triton.reference``
    (no argument checks: for valid inputs only)."""
    opts = full_options(dict(kl=kl, eps=eps, direction=direction, combine=combine, reduction=reduction,
                             normalize=normalize))
    n, m = q.shape[0], g.shape[0]
    if g_ids is None and labels is None:
        g_ids = q_ids
    y = labels if labels is not None else q_ids[:, None] == g_ids[None, :]
    q_keep = q_mask if q_mask is not None else torch.ones(n, dtype=torch.bool, device=q.device)
    g_keep = g_mask if g_mask is not None else torch.ones(m, dtype=torch.bool, device=q.device)
    s = logit_scale if logit_scale is not None else 1.0 / temperature
    if isinstance(s, torch.Tensor):
        s = s.to(q.device)
    _, sides = _evaluate(q, g, y, q_keep, g_keep, s, opts, compute_dtype(q.dtype))
    if opts["reduction"] == "none":
        get = (lambda name, field: getattr(sides[name], field) if name in sides else None)
        return SDMRowLosses(get("q2g", "loss"), get("g2q", "loss"), get("q2g", "valid"), get("g2q", "valid"))
    weights = reduction_weights(sides, opts)
    return sum((weights[name] * side.loss).sum() for name, side in sides.items())


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


def grad_outputs(problem, options, seed):
    """grad_output != 1: a scalar for reduced losses, random per-row weights for "none"."""
    gen = torch.Generator().manual_seed(seed)
    if full_options(options)["reduction"] != "none":
        return float(torch.empty(()).uniform_(0.25, 3.0, generator=gen)) * (1 if seed % 2 else -1)
    return {name: torch.randn(size, generator=gen, dtype=F64)
            for name, size in (("q2g", problem.n), ("g2q", problem.m))}


def run(fn, problem, options, grad_output=1.0, q=None, g=None, upcast=None):
    """Call ``fn`` on fresh leaves of the problem and differentiate <grad_output, output>.

    ``options`` (a dict) are passed as they are; ``upcast``: convert the leaves to this dtype
    before the call (gradients still flow to the leaves).
    """
    opts = full_options(options)
    lq, lg, ls = problem.leaves(q, g)
    args = (lq, lg, ls) if upcast is None else tuple(None if t is None else t.to(upcast) for t in (lq, lg, ls))
    out = problem.call(fn, *args, **options)
    if opts["reduction"] == "none":
        if not all(hasattr(out, f) for f in ("q2g", "g2q", "q2g_valid", "g2q_valid")):
            raise AssertionError(f"reduction='none' must return per-row losses (SDMRowLosses: q2g, g2q, "
                                 f"q2g_valid, g2q_valid), got {type(out).__name__}")
        rows, valid, objective = {}, {}, 0
        for name in DIRECTIONS:
            loss, ok = getattr(out, name), getattr(out, name + "_valid")
            if name not in directions(opts):
                assert loss is None and ok is None, f"{name} was not asked for but returned"
                continue
            size = problem.n if name == "q2g" else problem.m
            assert loss is not None and ok is not None, f"{name} was asked for but not returned"
            assert loss.shape == ok.shape == (size,), \
                f"{name} row losses / validity: shapes {tuple(loss.shape)} / {tuple(ok.shape)}, expected ({size},)"
            assert ok.dtype == torch.bool, f"{name}_valid: dtype {ok.dtype}, expected torch.bool"
            rows[name], valid[name] = loss, ok
            objective = objective + (grad_output[name].to(loss.device, loss.dtype) * loss).sum()
        value = objective.detach()
    else:
        assert isinstance(out, torch.Tensor) and out.dim() == 0, \
            f"reduction={opts['reduction']!r} must return a 0-dim tensor, got {getattr(out, 'shape', type(out))}"
        rows, valid, value = {}, {}, out.detach()
        objective = grad_output * out
    return Result(value, rows, valid, _grads(objective, (lq, lg, ls)))


@dataclasses.dataclass
class Truth:
    """The float64 evaluation of a problem: values, gradients and the error floors of fp32."""

    result: Result
    baseline: Result                    # the oracle computing the problem in the compute dtype
    loss_floor: float                   # per row loss
    total_weight: float                 # sum of |weights| of the rows in the objective
    value_floor: float                  # the scalar (weighted sum of rows)
    grad_floors: dict                   # "q": [N], "g": [M], "scale": scalar
    compute_dtype: torch.dtype


def _oracle(reference):
    if reference is not None:
        return reference
    from sdm_triton import reference as package_reference
    return package_reference.sdm_loss


def truth_for(problem, options, grad_output=1.0, reference: Optional[Callable] = None) -> Truth:
    """The oracle's float64 result and compute-dtype baseline, and the floors of the error model.

    ``reference``: the oracle, a function with ``sdm_loss``'s signature (default
    ``sdm_triton.reference.sdm_loss``).
    """
    opts = full_options(options)
    oracle = _oracle(reference)
    result = run(oracle, problem, options, grad_output, upcast=F64)
    ct = compute_dtype(problem.dtype)
    baseline = run(oracle, problem, options, grad_output)

    lq, lg, ls = problem.leaves()
    with torch.no_grad():
        S, sides = evaluate(problem, lq, lg, ls, opts, F64)
    if opts["reduction"] == "none":
        weights = {name: grad_output[name].to(side.loss.device, F64) for name, side in sides.items()}
    else:
        weights = {name: grad_output * w for name, w in reduction_weights(sides, opts).items()}
    u = UNIT_ROUNDOFF[ct]
    q_keep, g_keep = problem.keep()
    pairs = q_keep[:, None] & g_keep[None, :]
    s_max = float(S.abs().masked_fill(~pairs, 0).max()) if bool(pairs.any()) else 0.0
    terms = 1 + s_max + math.log(max(problem.n, problem.m))
    if opts["kl"] == "reverse":
        terms += abs(math.log(opts["eps"]))
    # Contributions of a unit error in every logit, weighted as the objective weighs rows.
    unit = FLOOR_ULPS * u * terms
    A = torch.zeros_like(S)
    for name, side in sides.items():
        contrib = weights[name].abs().to(F64)[:, None] * side.magnitude
        A = A + (contrib if name == "q2g" else contrib.T)
    s = problem.scale_value()
    # (an absent sample's norm may be NaN: it holds anything)
    qn, gn = (torch.nan_to_num(x.detach().double().norm(dim=1), 1.0, 1.0) for x in (lq, lg))
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
    if problem.dtype in HALF_DTYPES:
        info = torch.finfo(problem.dtype)
        out_tiny = 2 * info.smallest_normal * info.eps * math.sqrt(problem.q.shape[1])
    grad_floors = {
        "q": (s * (E @ g_in) / q_div + out_tiny).cpu(),
        "g": (s * (E.T @ q_in) / g_div + out_tiny).cpu(),
        "scale": torch.tensor(float((E * S.abs()).sum()) / s),
    }
    total_weight = sum(float(w.abs().sum()) for w in weights.values())
    return Truth(result, baseline, unit + tiny, total_weight, unit * total_weight + tiny, grad_floors, ct)


# --------------------------------------------------------------------------- comparisons

def _g(x):
    return f"{float(x):.9g}"


def _report(what, actual, truth, err, tol, context, row_wise):
    ratio = err / tol
    if ratio.dim() == 0:
        return (f"{what}: got {_g(actual)}, expected {_g(truth)}: error {float(err):.3e} > tolerance "
                f"{float(tol):.3e} ({float(ratio):.3g}x){context}")
    worst = int(ratio.argmax())
    index = worst
    if row_wise:      # the worst row; in it, the element farthest from the truth
        index = (worst, int((actual[worst] - truth[worst]).abs().argmax()))
    where = f"[{', '.join(map(str, index))}]" if isinstance(index, tuple) else f"[{index}]"
    kind = f"row {worst} (2-norm of the difference)" if row_wise else f"element [{worst}]"
    return (f"{what}: {kind} off by {float(err[worst]):.3e} > tolerance {float(tol[worst]):.3e} "
            f"({float(ratio[worst]):.3g}x); at {where}: got {_g(actual[index])}, expected {_g(truth[index])}"
            f"{context}")


def _context(context):
    if context is None:
        return ""
    return context if isinstance(context, str) else describe(context)


def assert_close(what, actual, truth, baseline, floor, rtol, context=None, row_wise=False, extra_rtol=0.0):
    """|actual - truth| <= (rtol + extra_rtol) |truth| + max(floor, BASELINE_FACTOR * |baseline - truth|).

    ``row_wise``: rows of a matrix compared by their 2-norm (gradients of q and g).
    ``context``: an ``SDMProblem`` (its repro is printed on failure) or a string.
    """
    actual = actual.detach().to(F64).cpu()
    truth = truth.detach().to(F64).cpu()
    baseline = baseline.detach().to(F64).cpu()
    floor = torch.as_tensor(floor, dtype=F64).cpu()
    where = _context(context)

    def size(x):
        return x.norm(dim=1) if row_wise else x.abs()

    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(truth.shape)}{where}"
    if not bool(torch.isfinite(actual).all()):
        bad = tuple(int(i) for i in (~torch.isfinite(actual)).nonzero()[0]) if actual.dim() else ()
        at = f" at [{', '.join(map(str, bad))}]" if bad else ""
        raise AssertionError(f"{what}: not finite{at}: got {_g(actual[bad])}, expected {_g(truth[bad])}{where}")
    err = size(actual - truth)
    tol = (rtol + extra_rtol) * size(truth) + torch.maximum(floor, BASELINE_FACTOR * size(baseline - truth))
    if not bool((err <= tol).all()):
        raise AssertionError(_report(what, actual, truth, err, tol, where, row_wise))


def assume_gradients_fit(problem, truth):
    """Skip an fp16 example whose exact gradient is beyond fp16's range (it cannot be returned)."""
    if problem.dtype == torch.float16:
        top = torch.finfo(torch.float16).max / 2
        assume(all(bool((truth.result.grads[n].abs() < top).all()) for n in ("q", "g")))


def assert_matches_truth(result, truth, context=None, grad_extra_rtol=0.0):
    """Values, per-row losses, validity and gradients of ``result`` against the float64 truth."""
    rtol = RTOL[truth.compute_dtype]
    t, b = truth.result, truth.baseline
    where = _context(context)
    assert_close("loss", result.value, t.value, b.value, truth.value_floor, rtol, where)
    for name in t.rows:
        got, want = result.valid[name].cpu(), t.valid[name].cpu()
        if not torch.equal(got, want):
            i = int((got != want).nonzero()[0])
            raise AssertionError(f"{name}_valid: element [{i}] is {bool(got[i])}, expected {bool(want[i])}{where}")
        assert_close(f"{name} row losses", result.rows[name], t.rows[name], b.rows[name], truth.loss_floor,
                     rtol, where)
    for name in ("q", "g", "scale"):
        if t.grads[name] is None:
            continue
        assert result.grads[name] is not None, f"no gradient for {name}{where}"
        assert_close(f"d/d{name}", result.grads[name], t.grads[name], b.grads[name], truth.grad_floors[name],
                     rtol, where, row_wise=name != "scale", extra_rtol=grad_extra_rtol)


def assert_close_to_reference(fn, problem, options=None, *, grad_output=None, reference=None,
                              grad_extra_rtol=None):
    """Run ``fn`` and the reference (in float64) on ``problem``; compare the loss (or per-row
    losses and validity), and the gradients of q, g and of a grad-requiring logit scale.

    ``fn``: a function with ``sdm_loss``'s signature (see ``sdm_triton.testing``);
    ``options``: a dict of its keyword options, passed as given (an omitted one means
    ``sdm_loss``'s default); ``grad_output``: the weight of the output in the differentiated
    objective (default: a seeded random scalar, or random per-row weights for
    ``reduction="none"``); ``reference``: the oracle (default ``sdm_triton.reference.sdm_loss``);
    ``grad_extra_rtol``: the relative rounding allowed on gradients returned in the input
    dtype (default 2 units of roundoff of bf16 / fp16, 0 otherwise).

    SPEC's rule: ``|got - truth| <= rtol |truth| + max(floor, 4 |baseline - truth|)`` with
    rtol 1e-5 (fp32 compute) or 1e-12 (float64), the floor of fp32's own error model and the
    baseline the oracle in the compute dtype (the module's docstring). An fp16 problem whose
    exact gradient overflows fp16 is rejected with ``hypothesis.assume``. On failure an
    AssertionError names the quantity, the worst element, both values, the tolerance and the
    repro; an exception raised by ``fn`` on the (valid) problem becomes one that says so.
    """
    options = dict(options or {})
    if grad_output is None:
        grad_output = grad_outputs(problem, options, 0)
    truth = truth_for(problem, options, grad_output, reference)
    assume_gradients_fit(problem, truth)
    if grad_extra_rtol is None:
        grad_extra_rtol = 2 * UNIT_ROUNDOFF[problem.dtype] if problem.dtype in HALF_DTYPES else 0.0
    try:
        result = run(fn, problem, options, grad_output)
    except (AssertionError, HypothesisException):   # its own checks, or its assume() / reject()
        raise
    except Exception as exc:   # the function under test failed on a valid problem: say so, with the repro
        name = getattr(fn, "__name__", type(fn).__name__)
        raise AssertionError(f"loss: raised {type(exc).__name__} in {name}: {exc}"
                             f"{describe(problem, options)}") from exc
    assert_matches_truth(result, truth, describe(problem, options), grad_extra_rtol)
