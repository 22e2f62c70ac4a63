"""sdm_triton.testing, the property-test kit users test their own SDM code with (issue 21).

examples/test_my_sdm.py tests a user-style implementation with the kit and passes; the same
file with one deliberate bug (eps dropped from the reverse KL, a mask ignored, the two
directions swapped) fails with a message that names the property or the element. Problems
print as repros, failures name the worst element, and this package's torch backend passes
the kit at its defaults (stride-0 features, anti-aligned positives, NaN in absent rows), which
the project's own property tests, at SPEC's ranges, do not draw. Torch only, no Triton
interpreter: a few seconds.
"""

import contextlib
import pathlib
import re
import types

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis.errors import UnsatisfiedAssumption

import sdm_triton
from sdm_triton import testing
from sdm_triton.testing._problems import DTYPES, FAST_DTYPES

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "test_my_sdm.py"
EXAMPLE_TESTS = ("test_my_sdm_loss_matches_the_reference", "test_my_sdm_loss_has_the_properties")

# One line of the example changed: (the line as written, the bug, the property that must fail).
BUGS = {
    "eps_dropped": ("torch.log(Y + eps)", "torch.log(Y)", "finite_loss_and_gradients"),
    "mask_ignored": ("g_keep = torch.ones(m, dtype=torch.bool, device=q.device) if g_mask is None else g_mask",
                     "g_keep = torch.ones(m, dtype=torch.bool, device=q.device)", "mask_equals_subset"),
    "directions_swapped": ('rows["q2g"] = kl_rows(S, y)\n    if direction in ("both", "g2q"):\n'
                           '        rows["g2q"] = kl_rows(S.T, y.T)',
                           'rows["q2g"] = kl_rows(S.T, y.T)\n    if direction in ("both", "g2q"):\n'
                           '        rows["g2q"] = kl_rows(S, y)', None),
}
# A comparison's failure names the quantity and the element: "loss: got 4.02, expected 0: ...",
# "d/dq: not finite at [1, 0]: ...", "q2g row losses: element [3] off by ...", "d/dg: row 2 ...".
# (or that the function raised on a valid problem: directions_swapped's masked_scatter does where
# the two sides' present counts differ, as the GPU run's first example had them, issue 26)
NAMES_THE_ELEMENT = re.compile(r"^(loss|q2g|g2q|d/d\w+)[^\n]*: (not finite|got|element|row|shapes|raised)", re.M)


@contextlib.contextmanager
def _profile(**changes):
    """The active Hypothesis profile with ``changes``, for settings objects created inside
    (a settings object takes its defaults from the profile active when it is created)."""
    previous = settings.get_current_profile_name()
    settings.register_profile("sdm-testing-kit", settings.get_profile(previous), **changes)
    settings.load_profile("sdm-testing-kit")
    try:
        yield
    finally:
        settings.load_profile(previous)


def _example_module(source, name):
    module = types.ModuleType(name)
    module.__file__ = str(EXAMPLE)
    exec(compile(source, str(EXAMPLE), "exec"), module.__dict__)
    return module


def _messages(exc):
    """The text of a failure: the message and notes, of every exception of a group."""
    parts = [str(exc), *getattr(exc, "__notes__", [])]
    for inner in getattr(exc, "exceptions", ()):
        parts.append(_messages(inner))
    return "\n".join(parts)


def test_the_example_passes():
    module = _example_module(EXAMPLE.read_text(), "test_my_sdm")
    for name in EXAMPLE_TESTS:
        getattr(module, name)()


@pytest.mark.parametrize("bug", list(BUGS))
def test_the_example_fails_on_a_bug_naming_the_property_or_element(bug):
    line, buggy, failing_property = BUGS[bug]
    source = EXAMPLE.read_text()
    assert source.count(line) == 1, f"the example no longer holds {line!r}"
    # The first failing example as found (shrinking it would take a minute of CI).
    with _profile(phases=[Phase.explicit, Phase.reuse, Phase.generate]):
        module = _example_module(source.replace(line, buggy), f"test_my_sdm_{bug}")
    names_the_property = re.compile(rf"property '{failing_property}'" if failing_property else r"property '\w+'")
    for name, expected in zip(EXAMPLE_TESTS, (NAMES_THE_ELEMENT, names_the_property)):
        with pytest.raises(Exception) as failure:
            getattr(module, name)()
        text = _messages(failure.value)
        assert expected.search(text), f"{name} on {bug}: {expected.pattern!r} not in\n{text[:3000]}"
        assert "sdm_triton.testing.problem(" in text, f"{name} on {bug}: no repro in\n{text[:3000]}"


def test_a_failure_names_the_worst_element_both_values_and_the_tolerance():
    """A gradient wrong in one element only: the message points at it."""
    problem = testing.problem(N=5, M=4, D=3, q_ids=[0, 1, 1, 2, 3], g_ids=[1, 0, 2, 3], seed=3,
                              temperature=0.1, log10_norms=(0.0, 0.5))

    def off_at_2_1(q, g, **kwargs):                       # the loss is right, d/dq[2, 1] is 0.5 too large
        return sdm_triton.sdm_loss(q, g, backend="torch", **kwargs) + 0.5 * (q[2, 1] - q[2, 1].detach())

    with pytest.raises(AssertionError) as failure:
        testing.assert_close_to_reference(off_at_2_1, problem, grad_output=1.0)
    text = str(failure.value)
    assert re.match(r"d/dq: row 2 \(2-norm of the difference\) off by \S+ > tolerance \S+ \(\S+x\); "
                    r"at \[2, 1\]: got \S+, expected \S+", text), text
    assert repr(problem) in text and "options = {}" in text, text


def test_a_function_that_raises_on_a_valid_problem_is_named_with_the_error_and_the_repro():
    """An implementation that crashes (here as directions_swapped's example does on the GPU's first
    example: per-row losses of the wrong side scattered into the other's mask) fails with what it
    raised, where, and the repro."""
    problem = testing.problem(N=5, M=3, D=3, q_ids=[0, 1, 1, 2, 3], g_ids=[1, 0, 2], seed=3)

    def scatters_the_wrong_side(q, g, **kwargs):
        rows = sdm_triton.sdm_loss(q, g, backend="torch", **{**kwargs, "reduction": "none"})
        return torch.zeros(5).masked_scatter(torch.ones(5, dtype=torch.bool), rows.g2q).sum()

    with pytest.raises(AssertionError) as failure:
        testing.assert_close_to_reference(scatters_the_wrong_side, problem, grad_output=1.0)
    text = str(failure.value)
    assert text.startswith("loss: raised RuntimeError in scatters_the_wrong_side: "), text
    assert NAMES_THE_ELEMENT.search(text) and repr(problem) in text, text
    assert isinstance(failure.value.__cause__, RuntimeError)

    # hypothesis's own exceptions pass through: a function's assume(False) rejects the example
    def rejects(q, g, **kwargs):
        assume(False)

    with pytest.raises(UnsatisfiedAssumption):
        testing.assert_close_to_reference(rejects, problem, grad_output=1.0)


def test_a_problem_prints_as_the_call_that_rebuilds_it():
    seen = []

    @settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(testing.problems(max_rows=10, max_dim=8, dtypes=DTYPES))
    def rebuilds(problem):
        again = eval(repr(problem), {"sdm_triton": sdm_triton})
        for name in ("q", "g", "q_ids", "g_ids", "labels", "q_mask", "g_mask"):
            a, b = getattr(problem, name), getattr(again, name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert a.dtype == b.dtype and a.stride() == b.stride(), name
                assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(
                    a.nan_to_num(), b.nan_to_num()), name
        assert (again.temperature, again.use_logit_scale, again.recipe) == \
            (problem.temperature, problem.use_logit_scale, problem.recipe)
        for a, b in zip(problem.leaves(), again.leaves()):
            assert a is None and b is None or a.stride() == b.stride()
        seen.append(problem.recipe)

    rebuilds()
    assert len(seen) >= 30


def _torch_backend(*args, **kwargs):
    return sdm_triton.sdm_loss(*args, backend="torch", **kwargs)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=testing.problems(max_rows=10, max_dim=12, dtypes=FAST_DTYPES),
       options=testing.sdm_options(normalize=(True, False)))
def test_the_torch_backend_passes_the_kit_at_its_defaults(problem, options):
    testing.assert_close_to_reference(_torch_backend, problem, options)
    testing.check_properties(_torch_backend, problem, options)
