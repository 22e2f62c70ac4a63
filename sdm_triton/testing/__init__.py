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
  A problem (an ``SDMProblem``) prints as ``sdm_triton.testing.problem(...)``, the call that
  rebuilds it.
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

The lower-level pieces this project's own tests are built from (the float64 truth, the
comparison rule, each property on its own, the strategies' ranges) live in the private
modules ``_problems``, ``_compare`` and ``_properties``, and may change without notice.

Needs Hypothesis: ``pip install 'sdm_triton[testing]'``.
"""

try:
    import hypothesis  # noqa: F401
except ModuleNotFoundError as exc:
    raise ModuleNotFoundError("sdm_triton.testing needs hypothesis: pip install 'sdm_triton[testing]'",
                              name="hypothesis") from exc

from ._compare import assert_close_to_reference
from ._problems import SDMProblem, problem, problems, sdm_options
from ._properties import PROPERTIES, check_properties

__all__ = ["problems", "sdm_options", "problem", "SDMProblem", "assert_close_to_reference", "check_properties",
           "PROPERTIES"]
