"""Property-test your own SDM implementation the way this project tests its own.

    from hypothesis import given, settings
    from sdm_triton import testing

    @settings(max_examples=50, deadline=None)
    @given(problem=testing.problems(), options=testing.sdm_options())
    def test_my_loss(problem, options):
        testing.assert_close_to_reference(my_sdm_loss, problem, options)
        testing.check_properties(my_sdm_loss, problem, options)

* ``problems(...)``: a Hypothesis strategy for SDM problems (features, ids or dense labels,
  masks, temperature or logit scale, dtype, device, memory layouts, and the adversarial
  regimes: near-perfect fits, anti-aligned features, logit scales 0.05 to 200, norms 1e-3 to
  1e3, zero rows, duplicate ids, rows with no positive, whole sides absent, NaN in absent rows).
  A ``Problem`` prints as ``sdm_triton.testing.problem(...)``, the call that rebuilds it.
* ``sdm_options(...)``: a strategy for the keyword options (kl, eps, direction, combine,
  reduction, normalize) as a dict.
* ``assert_close_to_reference(fn, problem, options)``: ``fn`` against
  ``sdm_triton.reference`` run in float64 on the same problem: the loss (or per-row losses and
  validity) and the gradients of q, g and of a grad-requiring logit scale, by SPEC's
  dtype-aware rule (the one this project's tests use; ``_compare``'s docstring states it).
* ``check_properties(fn, problem, options)``: SPEC's properties, each reported by name
  (``PROPERTIES``): finite loss and gradients, forward KL >= 0 (reverse: its lower bound),
  a mask equals the subset, permutation equivariance, scale invariance (normalize=True), the
  reduction of the per-row losses, and (one direction) invalid rows get nothing.

What ``fn`` must be: a function with ``sdm_loss``'s signature, called as
``fn(q, g, q_ids=..., g_ids=..., q_mask=..., g_mask=..., temperature=... | logit_scale=...,
**options)`` or with ``labels=...`` instead of the ids (``q_mask`` / ``g_mask`` may be None:
no mask; ``logit_scale`` is a 0-dim tensor that requires grad). ``options`` are passed as
you give them; an option you leave out means ``sdm_loss``'s default, so ``fn``'s defaults
must be those. ``check_properties`` also calls ``fn`` with ``reduction="none"``, which must
return per-row losses: an object with ``q2g``, ``g2q`` ([N], [M], or None for a direction not
asked for) and the bool validity masks ``q2g_valid``, ``g2q_valid`` (``sdm_triton.SDMRowLosses``);
``reduction="mean"`` / ``"sum"`` return a 0-dim tensor. Gradients flow by autograd.

Lower-level pieces (``truth_for``, ``run``, ``assert_close``, ``evaluate``,
``dense_reference``...) are what this project's own tests are built from.

Needs Hypothesis: ``pip install 'sdm_triton[testing]'``.
"""

try:
    import hypothesis  # noqa: F401
except ModuleNotFoundError as exc:
    raise ModuleNotFoundError("sdm_triton.testing needs hypothesis: pip install 'sdm_triton[testing]'",
                              name="hypothesis") from exc

from ._compare import (
    BASELINE_FACTOR,
    DEFAULT_OPTIONS,
    DIRECTIONS,
    FLOOR_ULPS,
    NORM_EPS,
    RTOL,
    UNIT_ROUNDOFF,
    Result,
    Side,
    Truth,
    assert_close,
    assert_close_to_reference,
    assert_matches_truth,
    assume_gradients_fit,
    compute_dtype,
    dense_reference,
    describe,
    directions,
    evaluate,
    full_options,
    grad_outputs,
    reduction_weights,
    run,
    truth_for,
)
from ._problems import (
    ANTI_SIGNALS,
    ARG_LAYOUTS,
    DTYPES,
    FAST_DTYPES,
    FEATURE_LAYOUTS,
    HALF_DTYPES,
    LABEL_KINDS,
    LABEL_LAYOUTS,
    LABEL_PATTERNS,
    LOG10_NORM_RANGE,
    LOG10_NORMS,
    MASK_KINDS,
    MASK_RATES,
    SCALE_TEMPERATURES,
    SIGNALS,
    TEMPERATURE_RANGE,
    VECTOR_LAYOUTS,
    Problem,
    eps_values,
    log_uniform,
    problem,
    problems,
    sdm_options,
)
from ._properties import (
    PROPERTIES,
    applicable_properties,
    check_properties,
    default_scale_factor,
    finite_loss_and_gradients,
    forward_kl_nonnegative,
    invalid_rows_get_nothing,
    mask_equals_subset,
    permutation_equivariance,
    reduction_consistency,
    reverse_kl_lower_bound,
    scale_invariance,
)

__all__ = [
    # strategies and problems
    "problems", "sdm_options", "problem", "Problem", "eps_values", "log_uniform",
    # comparison with the reference
    "assert_close_to_reference", "truth_for", "run", "assert_close", "assert_matches_truth", "assume_gradients_fit",
    "grad_outputs", "evaluate", "dense_reference", "reduction_weights", "full_options", "directions", "describe",
    "compute_dtype", "Result", "Truth", "Side",
    # properties
    "check_properties", "applicable_properties", "PROPERTIES", "finite_loss_and_gradients", "forward_kl_nonnegative",
    "reverse_kl_lower_bound", "mask_equals_subset", "invalid_rows_get_nothing", "permutation_equivariance",
    "scale_invariance", "reduction_consistency", "default_scale_factor",
    # constants
    "RTOL", "FLOOR_ULPS", "BASELINE_FACTOR", "UNIT_ROUNDOFF", "NORM_EPS", "DEFAULT_OPTIONS", "DIRECTIONS",
    "HALF_DTYPES", "FAST_DTYPES", "DTYPES", "TEMPERATURE_RANGE", "LOG10_NORM_RANGE", "SCALE_TEMPERATURES",
    "LOG10_NORMS", "SIGNALS", "ANTI_SIGNALS", "LABEL_KINDS", "MASK_KINDS", "MASK_RATES", "FEATURE_LAYOUTS",
    "VECTOR_LAYOUTS", "LABEL_LAYOUTS", "ARG_LAYOUTS", "LABEL_PATTERNS",
]
