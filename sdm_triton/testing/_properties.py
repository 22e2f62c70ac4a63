"""SPEC's properties as checks on one problem, each a function named after the property.

Each takes ``(fn, problem, options, ...)``, raises an AssertionError naming what broke, and
returns whether it applied (False: the problem cannot show the property, e.g. no invalid row).
The parameters a Hypothesis test may want to draw (permutations, the scale factor,
``grad_output``) default to values derived from the problem. ``check_properties`` runs them all.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ._compare import (
    DIRECTIONS,
    RTOL,
    UNIT_ROUNDOFF,
    assert_close,
    assume_gradients_fit,
    describe,
    directions,
    full_options,
    grad_outputs,
    run,
    truth_for,
)
from ._problems import HALF_DTYPES


def forward_kl_nonnegative(fn, problem, options, reference=None):
    """forward: every row loss and the reduced loss are >= 0, exactly; invalid rows hold 0."""
    opts = full_options(options)
    where = describe(problem, options)
    q, g, _ = problem.leaves()
    rows = problem.call(fn, q, g, **{**options, "reduction": "none"})
    for name in directions(opts):
        loss, valid = getattr(rows, name).detach(), getattr(rows, name + "_valid")
        if not bool((loss >= 0).all()):
            i = int(loss.argmin())
            raise AssertionError(f"{name}: row [{i}] has a negative loss {float(loss[i]):.9g}{where}")
        if not bool((loss[~valid] == 0).all()):
            i = int(((loss != 0) & ~valid).nonzero()[0])
            raise AssertionError(f"{name}: invalid row [{i}] holds {float(loss[i]):.9g}, not 0{where}")
    if opts["reduction"] != "none":
        out = problem.call(fn, q, g, **options).detach()
        assert float(out) >= 0, f"negative loss {float(out):.9g}{where}"
    return True


def reverse_kl_lower_bound(fn, problem, options, reference=None):
    """reverse: each row loss is >= -log(1 + M_valid * eps), up to float rounding."""
    options = {**options, "reduction": "none"}
    opts = full_options(options)
    out = problem.call(fn, *problem.leaves()[:2], **options)
    truth = truth_for(problem, options, grad_outputs(problem, options, 0), reference)
    q_keep, g_keep = problem.keep()
    for name in directions(opts):
        cols = int((g_keep if name == "q2g" else q_keep).sum())
        bound = -math.log1p(cols * opts["eps"])
        rows = getattr(out, name).detach().double().cpu()
        slack = truth.loss_floor
        if not bool((rows >= bound - slack).all()):
            i = int(rows.argmin())
            raise AssertionError(f"{name}: row [{i}] loss {float(rows[i]):.3e} below -log(1 + M eps) = {bound:.3e} "
                                 f"(slack {slack:.1e}){describe(problem, options)}")
    return True


def finite_loss_and_gradients(fn, problem, options, grad_output=None, reference=None):
    """Finite inputs (absent samples aside) give a finite loss and finite gradients for q, g
    and a tensor logit_scale; fp16 gradients where the exact gradient fits fp16."""
    grad_output = grad_outputs(problem, options, 0) if grad_output is None else grad_output
    where = describe(problem, options)
    result = run(fn, problem, options, grad_output)
    assert bool(torch.isfinite(result.value)), f"loss not finite: {float(result.value)}{where}"
    for name, rows in result.rows.items():
        if not bool(torch.isfinite(rows).all()):
            i = int((~torch.isfinite(rows)).nonzero()[0])
            raise AssertionError(f"{name} row losses not finite: row [{i}] is {float(rows[i])}{where}")
    fits = {}
    if problem.dtype == torch.float16:
        exact = truth_for(problem, options, grad_output, reference).result.grads
        fits = {name: exact[name].abs() < torch.finfo(torch.float16).max for name in ("q", "g")}
    for name, grad in result.grads.items():
        if grad is None:
            continue
        finite = torch.isfinite(grad)
        if name in fits:
            finite = finite | ~fits[name].to(grad.device)
        if not bool(finite.all()):
            at = tuple(int(i) for i in (~finite).nonzero()[0]) if grad.dim() else ()
            raise AssertionError(f"d/d{name} not finite at {list(at)}: {float(grad[at])}{where}")
    return True


def default_scale_factor(problem) -> float:
    """A factor c for ``scale_invariance``: a power of two for half inputs (exact; fp16 upwards
    only, since scaling down rounds subnormal elements), 37.5 or 1/37.5 otherwise."""
    if problem.dtype == torch.float16:
        return 4.0
    if problem.dtype == torch.bfloat16:
        return 2.0 ** (3 if problem.recipe.get("seed", 0) % 2 else -3)
    return 37.5 if problem.recipe.get("seed", 0) % 2 else 1 / 37.5


def scale_invariance(fn, problem, options, c=None, grad_output=None, reference=None):
    """normalize=True: L(c q, g) = L(q, c g) = L(q, g) for c > 0, the loss (and the per-row
    losses with reduction="none"). Does not apply (returns False) with normalize=False."""
    if not full_options(options)["normalize"]:
        return False
    c = default_scale_factor(problem) if c is None else c
    grad_output = grad_outputs(problem, options, 1) if grad_output is None else grad_output
    where = describe(problem, options) + f"\n  c = {c!r}"
    truth = truth_for(problem, options, grad_output, reference)
    base = run(fn, problem, options, grad_output)
    rtol = RTOL[truth.compute_dtype]
    for side, scaled in (("q", dict(q=problem.q * c)), ("g", dict(g=problem.g * c))):
        got = run(fn, problem, options, grad_output, **scaled)
        # Twice the error budget: both calls may err by the floor in opposite directions.
        assert_close(f"loss with c * {side}", got.value, base.value, base.value, 2 * truth.value_floor, 2 * rtol,
                     where)
        for name in base.rows:
            assert_close(f"{name} rows with c * {side}", got.rows[name], base.rows[name], base.rows[name],
                         2 * truth.loss_floor, 2 * rtol, where)
    return True


def mask_equals_subset(fn, problem, options, grad_output=None, reference=None):
    """A masked call equals the call on the kept samples (loss, per-row losses, gradients of
    kept samples); masked samples get exactly zero gradient and are invalid rows."""
    opts = full_options(options)
    grad_output = grad_outputs(problem, options, 0) if grad_output is None else grad_output
    where = describe(problem, options)
    q_keep, g_keep = problem.keep()
    masked = run(fn, problem, options, grad_output)
    truth = truth_for(problem, options, grad_output, reference)
    assume_gradients_fit(problem, truth)
    for name, keep in (("q", q_keep), ("g", g_keep)):
        dropped = masked.grads[name][~keep]
        if not bool((dropped == 0).all()):
            i = int((~keep).nonzero()[(dropped != 0).any(dim=1).nonzero()[0]])
            raise AssertionError(f"masked {name} row [{i}] got gradient {float(dropped.abs().max()):.3e}, "
                                 f"not 0{where}")
    for name, keep in zip(DIRECTIONS, (q_keep, g_keep)):
        if name in masked.rows:
            assert bool((masked.rows[name][~keep] == 0).all()) and not bool(masked.valid[name][~keep].any()), \
                f"masked {name} rows must be invalid with loss 0{where}"

    if not bool(q_keep.any()) or not bool(g_keep.any()):
        # The subset is empty on one side: no row is valid, the loss is 0, no gradient.
        assert float(masked.value) == 0, f"loss {float(masked.value)} with an empty side, not 0{where}"
        for name in ("q", "g", "scale"):
            if masked.grads[name] is not None:
                assert bool((masked.grads[name] == 0).all()), f"d/d{name} nonzero with an empty side{where}"
        return True
    sub = dataclasses.replace(
        problem, q=problem.q[q_keep], g=problem.g[g_keep], q_mask=None, g_mask=None,
        q_ids=None if problem.q_ids is None else problem.q_ids[q_keep],
        g_ids=None if problem.g_ids is None else problem.g_ids[g_keep],
        labels=None if problem.labels is None else problem.labels[q_keep][:, g_keep])
    sub_gout = grad_output if opts["reduction"] != "none" else {"q2g": grad_output["q2g"][q_keep.cpu()],
                                                                "g2q": grad_output["g2q"][g_keep.cpu()]}
    subset = run(fn, sub, options, sub_gout)
    rtol = RTOL[truth.compute_dtype]
    where = where + "\n  compared with the call on the kept samples"
    assert_close("loss vs subset", masked.value, subset.value, subset.value, 2 * truth.value_floor, 2 * rtol, where)
    for name, keep in zip(DIRECTIONS, (q_keep, g_keep)):
        if name in masked.rows:
            assert torch.equal(masked.valid[name][keep], subset.valid[name]), f"{name}_valid vs subset{where}"
            assert_close(f"{name} rows vs subset", masked.rows[name][keep], subset.rows[name], subset.rows[name],
                         2 * truth.loss_floor, 2 * rtol, where)
    extra = 2 * UNIT_ROUNDOFF[problem.dtype] if problem.dtype in HALF_DTYPES else 0.0
    for name, keep in (("q", q_keep), ("g", g_keep)):
        assert_close(f"d/d{name} vs subset", masked.grads[name][keep], subset.grads[name], subset.grads[name],
                     2 * truth.grad_floors[name][keep.cpu()], 2 * rtol, where, row_wise=True, extra_rtol=extra)
    if masked.grads["scale"] is not None:
        assert_close("d/dscale vs subset", masked.grads["scale"], subset.grads["scale"], subset.grads["scale"],
                     2 * truth.grad_floors["scale"], 2 * rtol, where)
    return True


def invalid_rows_get_nothing(fn, problem, options, grad_output=None, reference=None):
    """One direction only: a row with no positive among the kept columns (or a masked row)
    holds 0 and its own features get exactly zero gradient. Applies (returns True) where some
    row is invalid."""
    opts = full_options(options)
    direction = opts["direction"]
    if direction == "both":
        raise ValueError("invalid_rows_get_nothing needs direction 'q2g' or 'g2q'")
    options = {**options, "reduction": "none"}
    grad_output = grad_outputs(problem, options, 7) if grad_output is None else grad_output
    where = describe(problem, options)
    result = run(fn, problem, options, grad_output)
    valid = result.valid[direction]
    truth_valid = truth_for(problem, options, grad_output, reference).result.valid[direction]
    assert torch.equal(valid.cpu(), truth_valid.cpu()), f"{direction}_valid wrong{where}"
    if bool(valid.all()):
        return False
    own = result.grads["q" if direction == "q2g" else "g"]
    assert bool((result.rows[direction][~valid] == 0).all()), f"invalid {direction} rows hold a loss{where}"
    assert bool((own[~valid] == 0).all()), f"invalid {direction} rows got gradient{where}"
    return True


def permutation_equivariance(fn, problem, options, pq=None, pg=None, grad_output=None, reference=None):
    """Permuting the rows of q (with q_ids / label rows / q_mask) and of g jointly permutes
    the gradients the same way, and the per-row losses (reduction="none"), or leaves the
    reduced loss as it is."""
    gen = torch.Generator().manual_seed(problem.recipe.get("seed", 0))
    pq = torch.randperm(problem.n, generator=gen) if pq is None else torch.as_tensor(pq)
    pg = torch.randperm(problem.m, generator=gen) if pg is None else torch.as_tensor(pg)
    pq, pg = pq.to(problem.q.device), pg.to(problem.q.device)
    grad_output = grad_outputs(problem, options, 3) if grad_output is None else grad_output
    where = describe(problem, options) + f"\n  rows of q permuted by {pq.tolist()}, of g by {pg.tolist()}"
    truth = truth_for(problem, options, grad_output, reference)
    assume_gradients_fit(problem, truth)
    base = run(fn, problem, options, grad_output)

    def take(t, p):
        return None if t is None else t[p]

    perm = dataclasses.replace(
        problem, q=problem.q[pq], g=problem.g[pg], q_ids=take(problem.q_ids, pq), g_ids=take(problem.g_ids, pg),
        q_mask=take(problem.q_mask, pq), g_mask=take(problem.g_mask, pg),
        labels=None if problem.labels is None else problem.labels[pq][:, pg])
    reduced = full_options(options)["reduction"] != "none"
    permuted = run(fn, perm, options, grad_output if reduced else {"q2g": grad_output["q2g"][pq.cpu()],
                                                                    "g2q": grad_output["g2q"][pg.cpu()]})
    rtol = RTOL[truth.compute_dtype]
    extra = 2 * UNIT_ROUNDOFF[problem.dtype] if problem.dtype in HALF_DTYPES else 0.0
    if reduced:
        assert_close("permuted loss", permuted.value, base.value, base.value, 2 * truth.value_floor, 2 * rtol, where)
    for name, p in zip(DIRECTIONS, (pq, pg)):
        if name in base.rows:
            assert torch.equal(permuted.valid[name], base.valid[name][p]), f"{name}_valid not permuted{where}"
            assert_close(f"permuted {name} rows", permuted.rows[name], base.rows[name][p], base.rows[name][p],
                         2 * truth.loss_floor, 2 * rtol, where)
    for name, p in (("q", pq), ("g", pg)):
        assert_close(f"permuted d/d{name}", permuted.grads[name], base.grads[name][p], base.grads[name][p],
                     2 * truth.grad_floors[name][p.cpu()], 2 * rtol, where, row_wise=True, extra_rtol=extra)
    return True


def reduction_consistency(fn, problem, options, reference=None):
    """The reduced loss is the reduction of the per-row losses (SPEC step 6): each direction
    the mean of its valid rows (0 without one) or their sum, two directions averaged
    (combine="mean") or added; checked for reduction "mean" and "sum"."""
    opts = full_options(options)
    q, g, _ = problem.leaves()
    rows = problem.call(fn, q, g, **{**options, "reduction": "none"})
    for reduction in ("mean", "sum"):
        truth = truth_for(problem, {**options, "reduction": reduction}, 1.0, reference)
        rtol = RTOL[truth.compute_dtype]
        parts = []
        for name in directions(opts):
            loss, valid = getattr(rows, name).detach().double(), getattr(rows, name + "_valid")
            total = loss[valid].sum()
            parts.append(total / max(1, int(valid.sum())) if reduction == "mean" else total)
        expected = sum(parts) / (2 if len(parts) == 2 and opts["combine"] == "mean" else 1)
        got = problem.call(fn, q, g, **{**options, "reduction": reduction})
        assert_close(f"reduction={reduction!r} vs its per-row losses", got, expected, expected,
                     2 * truth.value_floor, 2 * rtol, describe(problem, {**options, "reduction": reduction}))
    return True


PROPERTIES = {
    "finite_loss_and_gradients": finite_loss_and_gradients,
    "forward_kl_nonnegative": forward_kl_nonnegative,
    "reverse_kl_lower_bound": reverse_kl_lower_bound,
    "mask_equals_subset": mask_equals_subset,
    "invalid_rows_get_nothing": invalid_rows_get_nothing,
    "permutation_equivariance": permutation_equivariance,
    "scale_invariance": scale_invariance,
    "reduction_consistency": reduction_consistency,
}


def applicable_properties(options=None):
    """The names of the properties that apply to a loss with these options."""
    opts = full_options(options)
    names = ["finite_loss_and_gradients",
             "forward_kl_nonnegative" if opts["kl"] == "forward" else "reverse_kl_lower_bound",
             "mask_equals_subset", "permutation_equivariance"]
    if opts["direction"] != "both":
        names.append("invalid_rows_get_nothing")
    if opts["normalize"]:
        names.append("scale_invariance")
    names.append("reduction_consistency")
    return names


def check_properties(fn, problem, options=None, *, properties=None, reference=None):
    """Check SPEC's properties of ``fn`` on ``problem``: every one that applies to the options
    (``applicable_properties``), or the names in ``properties`` (keys of ``PROPERTIES``).

    ``fn`` is called with the options given, and ``forward_kl_nonnegative``,
    ``reverse_kl_lower_bound``, ``reduction_consistency`` and ``invalid_rows_get_nothing``
    also call it with ``reduction="none"`` (per-row losses); the others need nothing more.
    Every property runs; an AssertionError lists each one that failed, by name, with what broke
    and the repro. Returns the names of the properties that applied to this problem.
    """
    options = dict(options or {})
    names = applicable_properties(options) if properties is None else list(properties)
    unknown = [name for name in names if name not in PROPERTIES]
    if unknown:
        raise ValueError(f"unknown properties {unknown}; known: {sorted(PROPERTIES)}")
    failures, applied = [], []
    for name in names:
        try:
            if PROPERTIES[name](fn, problem, options, reference=reference):
                applied.append(name)
        except AssertionError as exc:
            failures.append(f"property {name!r} failed: {exc}")
        except Exception as exc:
            if hasattr(exc, "add_note"):                      # Python >= 3.11
                exc.add_note(f"while checking the SDM property {name!r}{describe(problem, options)}")
            raise
    if failures:
        raise AssertionError(f"{len(failures)} of {len(names)} SDM properties failed:\n" + "\n".join(failures))
    return applied
