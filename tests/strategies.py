"""This project's layer over ``sdm_triton.testing``: its problems at SPEC's ranges, sized for a
backend, and the decorator that runs a Hypothesis property once per backend.

The strategies, the float64 comparison and the tolerance rule are ``sdm_triton.testing``'s,
the same ones users get. This project's property tests draw with SPEC's ranges
(``PROJECT_PROBLEMS``: temperatures in [0.005, 10], norms in [1e-4, 1e4]); the kit's defaults
add anti-aligned features, stride-0 features, mask rates and NaN in absent rows, which
``test_testing_kit.py`` draws for the torch backend.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from sdm_triton.testing import problems
from sdm_triton.testing._problems import LOG10_NORM_RANGE, SIGNALS, TEMPERATURE_RANGE

# problems() at SPEC's ranges, the project's own tests' draws
PROJECT_PROBLEMS = dict(log10_norms=LOG10_NORM_RANGE, temperatures=TEMPERATURE_RANGE, signals=SIGNALS,
                        layouts=("contiguous", "transposed", "strided"), mask_rates=None, nan_absent=False)


def backend_property(examples: float = 1.0):
    """Decorator: run ``body(sdm_impl, data)`` as a Hypothesis property, once per backend.

    Hypothesis fixes ``max_examples`` per test function, but the interpreted Triton
    backend must draw fewer examples than the others, so the ``@given`` function is
    built inside the test with ``sdm_impl.examples(examples)`` (``examples`` scales the
    profile's count for properties that need more or fewer). ``data`` is
    ``st.data()``: the body draws its case and options with ``data.draw``, sized by
    ``sdm_impl.max_rows`` / ``sdm_impl.max_dim``. Under a derandomized profile each
    (test, backend) pair gets its own fixed seed.
    """
    def decorate(body):
        def test(sdm_impl):
            def run(data):
                body(sdm_impl, data)

            run = given(data=st.data())(run)
            run = settings(settings.default, max_examples=sdm_impl.examples(examples))(run)
            if settings.default.derandomize:
                run = seed(zlib.crc32(f"{body.__module__}.{body.__qualname__}/{sdm_impl.name}".encode()))(run)
            run()

        for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
            setattr(test, attr, getattr(body, attr))
        if hasattr(body, "pytestmark"):
            test.pytestmark = body.pytestmark
        return test

    return decorate


def cases(sdm_impl, dtypes=(torch.float32,), **kwargs):
    """``problems`` at SPEC's ranges (``PROJECT_PROBLEMS``, overridden by ``kwargs``), sized
    for the backend, on its device, over the ``dtypes`` it supports (skips the test when it
    supports none of them)."""
    supported = tuple(t for t in dtypes if t in sdm_impl.dtypes)
    if not supported:
        pytest.skip(f"backend {sdm_impl.name} supports none of {dtypes}")
    return problems(sdm_impl.max_rows, sdm_impl.max_dim, dtypes=supported, device=sdm_impl.device,
                    **{**PROJECT_PROBLEMS, **kwargs})
