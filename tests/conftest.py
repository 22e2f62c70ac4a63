"""Test setup shared by every test module: backend registry, Hypothesis profiles, GPU marker.

Backends. Every test that takes the ``sdm_impl`` fixture runs once per registered
backend. "reference" (``reference.sdm_loss``) is always there; "torch" and "triton"
(``functools.partial(sdm_triton.sdm_loss, backend=NAME)``) join automatically once
``import sdm_triton`` works and the package has ``sdm_loss``. Environment:

* ``SDM_BACKENDS=reference,torch``   run only these backends;
* ``SDM_REQUIRE_BACKENDS=torch,triton``  fail at start-up when one of them cannot be
  registered (.ci/run sets it, so a broken ``import sdm_triton`` cannot pass silently);
* ``SDM_HYPOTHESIS_PROFILE=ci|thorough|gpu``  (default ``ci``, see below);
* ``SDM_HYPOTHESIS_NO_SHRINK=1``  report failing examples unshrunk (slow kernels).

Without CUDA, Triton runs in its interpreter (``TRITON_INTERPRET=1``, set here before
anything imports triton). That is slow, so the fixture tells tests how large a case
may be (``sdm_impl.max_rows``, ``sdm_impl.max_dim``) and how many examples to draw
(``sdm_impl.examples()``).
"""

import os

import torch

# every value the Triton backend keeps per problem signature is recomputed and compared
# (launch/tiles.py `_per_shape`): a derivation that reads what the signature lacks fails a test
os.environ.setdefault("SDM_TRITON_CHECK_SHAPE_CACHE", "1")

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must happen before the first `import triton` anywhere (sdm_triton imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import zlib  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

from sdm_triton import reference  # noqa: E402

# --------------------------------------------------------------------------- profiles
# ci:       reproducible (derandomized), few examples; the whole suite with all three
#           backends, Triton interpreted, stays within a few minutes on 2 CPU cores.
# thorough: random seeds, many examples, CPU sizes: for exploring or mutation checks.
# gpu:      many examples and larger cases, for a machine with CUDA.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# SDM_HYPOTHESIS_NO_SHRINK=1: report a failing example as found. Shrinking a failure of an
# interpreted or freshly compiling kernel can take many minutes (tools/gpu_suite.sh sets it).
if os.environ.get("SDM_HYPOTHESIS_NO_SHRINK") == "1":
    _COMMON["phases"] = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
settings.register_profile("ci", max_examples=25, derandomize=True, database=None, **_COMMON)
settings.register_profile("thorough", max_examples=300, **_COMMON)
# gpu: 200 examples per property is ~10 min of one H100 for test_properties.py alone (57
# properties x 3 backends, each new shape compiling); SDM_HYPOTHESIS_MAX_EXAMPLES=N overrides
# the active profile's count (tools/gpu_suite.sh passes it through) to fit a shorter run.
settings.register_profile("gpu", max_examples=200, **_COMMON)
PROFILE = os.environ.get("SDM_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
if os.environ.get("SDM_HYPOTHESIS_MAX_EXAMPLES"):
    settings.register_profile(PROFILE + "-capped", settings.get_profile(PROFILE),
                              max_examples=int(os.environ["SDM_HYPOTHESIS_MAX_EXAMPLES"]))
    settings.load_profile(PROFILE + "-capped")

# Case sizes: rows per side and feature dim. The interpreter executes every Triton op
# in numpy, so interpreted Triton gets small cases and half the examples.
_SIZES = {"ci": (70, 80), "thorough": (70, 80), "gpu": (300, 300)}
_INTERPRETED_ROWS = 24
_INTERPRETED_EXAMPLE_SHARE = 2


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the shared ``sdm_loss`` signature, with what tests need to know.

    ``value_check_kwargs``: keyword arguments that make the backend check values that
    need a device read (labels >= 0, finite features, logit_scale > 0): ``{}`` for the
    reference (it always checks), ``{"check_values": True}`` for a backend whose
    ``sdm_loss`` has that parameter, ``None`` when it cannot check (those tests skip).
    ``dtypes``: the feature dtypes it accepts (Triton has no float64); a property drawn
    over dtypes the backend lacks skips (see ``strategies.cases``).
    """

    name: str
    fn: Callable
    device: str
    interpreted: bool
    max_rows: int
    max_dim: int
    value_check_kwargs: Optional[dict]
    dtypes: tuple

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def examples(self, factor: float = 1.0) -> int:
        """Hypothesis examples for one property on this backend under the active profile."""
        n = settings.default.max_examples * factor
        if self.interpreted:
            n /= _INTERPRETED_EXAMPLE_SHARE
        return max(3, round(n))

    def __repr__(self):
        return f"Backend({self.name})"


def _accepts(fn, dtype, device):
    """Whether ``fn`` takes features of ``dtype`` (an unsupported dtype is a TypeError)."""
    x = torch.ones(1, 1, dtype=dtype, device=device)
    ids = torch.zeros(1, dtype=torch.int64, device=device)
    try:
        fn(x, x, ids, ids)
    except TypeError:
        return False
    return True


def _backend(name, fn, value_check_kwargs):
    interpreted = name == "triton" and not CUDA
    device = "cuda" if CUDA else "cpu"
    rows, dim = _SIZES.get(PROFILE, _SIZES["ci"])
    dtypes = tuple(t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64) if _accepts(fn, t, device))
    return Backend(name=name, fn=fn, device=device, interpreted=interpreted,
                   max_rows=_INTERPRETED_ROWS if interpreted else rows, max_dim=dim,
                   value_check_kwargs=value_check_kwargs, dtypes=dtypes)


def _names(variable):
    return [name for name in os.environ.get(variable, "").split(",") if name]


_SELECTED = _names("SDM_BACKENDS")


def _wanted(name):
    return not _SELECTED or name in _SELECTED


def _registry():
    backends = {}
    if _wanted("reference"):
        backends["reference"] = _backend("reference", reference.sdm_loss, {})
    try:
        import sdm_triton
    except ImportError as exc:
        return backends, f"sdm_triton not importable ({exc})"
    fn = getattr(sdm_triton, "sdm_loss", None)
    if fn is None:
        return backends, "sdm_triton has no sdm_loss"
    checks = {"check_values": True} if "check_values" in inspect.signature(fn).parameters else None
    for name in ("torch", "triton"):
        if _wanted(name):
            backends[name] = _backend(name, functools.partial(fn, backend=name), checks)
    return backends, None


BACKENDS, MISSING_REASON = _registry()
_absent = [name for name in _names("SDM_REQUIRE_BACKENDS") if name not in BACKENDS]
if _absent:
    raise RuntimeError(f"SDM_REQUIRE_BACKENDS asks for {_absent}, not registered: {MISSING_REASON}")


@pytest.fixture(scope="session", params=list(BACKENDS), ids=str)
def sdm_impl(request) -> Backend:
    """The backend under test (callable with the ``sdm_loss`` signature)."""
    return BACKENDS[request.param]


def pytest_report_header(config):
    names = [b.name + (" (Triton interpreter)" if b.interpreted else "")
             + f" [{', '.join(str(t).replace('torch.', '') for t in b.dtypes)}]" for b in BACKENDS.values()]
    lines = [f"sdm backends: {', '.join(names)}; hypothesis profile: {PROFILE}; cuda: {CUDA}"]
    if MISSING_REASON:
        lines.append(f"sdm backends missing: {MISSING_REASON}")
    return lines


def pytest_collection_modifyitems(config, items):
    _select_part(config, items)
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _select_part(config, items):
    """``SDM_TEST_PART=K/N``: keep part K of N, each test by a hash of its id (the same split on
    every machine and in every xdist worker), so that N runs together run every test once
    (tools/gpu_suite.sh --part K/N: the whole GPU suite does not fit one device call)."""
    part = os.environ.get("SDM_TEST_PART")
    if not part:
        return
    k, n = (int(x) for x in part.split("/"))
    if not 1 <= k <= n:
        raise pytest.UsageError(f"SDM_TEST_PART={part}: want K/N with 1 <= K <= N")
    keep, drop = [], []
    for item in items:
        (keep if zlib.crc32(item.nodeid.encode()) % n == k - 1 else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


_FAILURE_LOG = os.environ.get("SDM_FAILURE_LOG")


def pytest_runtest_logreport(report):
    """With SDM_FAILURE_LOG=path, append each failure's report as it happens (also under
    pytest-xdist, where this runs in the controller): a run cut off by a time limit
    still leaves its failures readable (tools/gpu_suite.sh sets it)."""
    if _FAILURE_LOG and report.failed:
        with open(_FAILURE_LOG, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n\n")


_COMPILE_LOG = os.environ.get("SDM_COMPILE_LOG")


def _log_compiles(path: str) -> None:
    """With SDM_COMPILE_LOG=path (tools/gpu_suite.sh sets it on a GPU), append one line per
    Triton compilation: the test, the kernel, its constexpr values and the seconds it took
    (a hit of Triton's on-disk cache, filled by another worker, takes milliseconds). A bare
    machine's suite is bound by these compiles (bench/NOTES.md 29): the log says which
    kernels and which specialisations cost the time. `tools/compile_log.py` sums it up."""
    import json
    import time

    from triton.runtime.jit import JITFunction

    compile_once = JITFunction._do_compile

    def timed(self, key, signature, device, constexprs, options, attrs, warmup):
        t0 = time.perf_counter()
        kernel = compile_once(self, key, signature, device, constexprs, options, attrs, warmup)
        if hasattr(kernel, "result"):          # an asynchronous compile: the time is the wait
            kernel.result()
        line = {"test": os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0],
                "kernel": self.fn.__name__, "s": round(time.perf_counter() - t0, 3),
                "constexprs": {_arg_name(self, k): repr(v) for k, v in constexprs.items()},
                "types": ",".join(str(v) for v in signature.values() if v != "constexpr"),
                "attrs": repr(sorted((_arg_name(self, k), repr(v)) for k, v in (attrs or {}).items())),
                "options": {k: getattr(options, k, None) for k in ("num_warps", "num_stages")}}
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
        return kernel

    JITFunction._do_compile = timed


def _arg_name(fn, path) -> str:
    """A jit function's argument named by Triton's path (a tuple of indices) into its arguments."""
    if isinstance(path, tuple) and path and isinstance(path[0], int) and path[0] < len(fn.arg_names):
        return fn.arg_names[path[0]] + "".join(f"[{i}]" for i in path[1:])
    return str(path)


if _COMPILE_LOG and os.environ.get("TRITON_INTERPRET") != "1":
    _log_compiles(_COMPILE_LOG)
