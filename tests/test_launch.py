"""The launch layer's host side.

The direct launcher (`sdm_triton/launch/direct.py`, issue 28): a compiled specialisation is
launched through Triton's binder and compiled launcher alone, everything else through
``kernel[grid](**kw)``. On the CPU the routing is checked against a stand-in for Triton's
JITFunction (its binder, cache and compiled kernel recorded); on a GPU, a training step's
outputs through the direct launcher equal those through ``kernel[grid](**kw)`` bit for bit,
and the direct path is the one taken.

The prepared buffer's layout: its label masses aligned whatever the sizes."""

from __future__ import annotations

import os
import types

import pytest
import torch

from sdm_triton.launch import direct


class _Compiled:
    def __init__(self, loaded=True):
        self.module = object() if loaded else None
        self.function = "fn"
        self.packed_metadata = "meta"
        self.calls = []

    @property
    def run(self):
        return lambda *a: self.calls.append(a)


class _Kernel:
    """Stand-in for a JITFunction: ``device_caches[device]`` = (cache, key cache, target, backend,
    binder), ``kernel[grid](**kw)`` recorded as Triton's own path."""

    def __init__(self, compiled=None):
        self.debug = False
        self.pre_run_hooks = []
        self.cache = {}
        if compiled is not None:
            self.cache["key"] = compiled
        self.bound = []
        self.plain = []

        def binder(**kw):
            self.bound.append(kw)
            return dict(a=kw["a"], b=kw["b"]), ["spec"], "options"
        self.device_caches = {0: (self.cache, {}, None, None, binder)}

    def __getitem__(self, grid):
        return lambda **kw: self.plain.append((grid, kw)) or "plain"


@pytest.fixture
def fake_triton(monkeypatch):
    """The direct path's view of Triton, faked: device 0, stream 7, no hooks, cache key "key"."""
    runtime = types.SimpleNamespace(debug=False, launch_enter_hook=None, launch_exit_hook=None)
    knobs = types.SimpleNamespace(runtime=runtime, compilation=types.SimpleNamespace(instrumentation_mode=""))
    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda d: 7)
    monkeypatch.setattr(direct, "_knobs", knobs)
    monkeypatch.setattr(direct, "_driver", types.SimpleNamespace(active=active))
    monkeypatch.setattr(direct, "_cache_key", lambda key_cache, spec, options: "key")
    return runtime


def test_a_compiled_specialisation_launches_through_its_launcher(fake_triton):
    compiled = _Compiled()
    kernel = _Kernel(compiled)
    assert direct._Direct(kernel)[(3, 2)](a=1, b=None) is compiled
    assert kernel.plain == []
    # the grid padded to three dimensions, no launch metadata or hooks, the bound arguments in order
    assert compiled.calls == [(3, 2, 1, 7, "fn", "meta", None, None, None, 1, None)]
    assert kernel.bound[0]["debug"] is False and "instrumentation_mode" in kernel.bound[0]


@pytest.mark.parametrize("why", ["not compiled", "not loaded", "compiling", "pre-run hook", "launch hook"])
def test_everything_else_goes_through_tritons_own_launch(fake_triton, why):
    compiled = None if why == "not compiled" else _Compiled(loaded=why != "not loaded")
    if why == "compiling":
        compiled.result = lambda: None     # an asynchronous compile's future
    kernel = _Kernel(compiled)
    if why == "pre-run hook":
        kernel.pre_run_hooks.append(lambda *a, **k: None)
    if why == "launch hook":
        fake_triton.launch_enter_hook = lambda *a: None
    assert direct._Direct(kernel)[(5,)](a=1, b=2) == "plain"
    assert [grid for grid, _ in kernel.plain] == [(5,)]
    assert compiled is None or compiled.calls == []


@pytest.mark.skipif(direct._knobs is None, reason="this Triton has no knobs module")
@pytest.mark.parametrize("hook", ["launch_enter_hook", "launch_exit_hook"])
def test_no_hook_is_seen_until_one_is_registered(hook):
    """Triton's own knobs, not a stand-in: Triton 3.6 and 3.8 keep each launch hook in a chain
    that is never None, empty when nothing is registered. Reading "not None" as "hooked" sent
    every launch the plain way on the GPU (bench/NOTES.md 36)."""
    kernel = _Kernel()
    assert not direct._hooked(kernel)
    chain = getattr(direct._knobs.runtime, hook)
    if not hasattr(chain, "add"):
        pytest.skip("this Triton holds a launch hook as a function or None, not in a chain")

    def f(*a, **k):
        return None
    chain.add(f)
    try:
        assert direct._hooked(kernel)
    finally:
        chain.remove(f)
    assert not direct._hooked(kernel)


def test_direct_launches_are_on_unless_turned_off():
    """On by default (where this Triton has what the direct path reads: 3.6 and 3.8 do), off with
    SDM_TRITON_DIRECT_LAUNCH=0: read once, when the module is imported (a fresh interpreter)."""
    import subprocess
    import sys

    def enabled(value):
        env = {k: v for k, v in os.environ.items() if k != "SDM_TRITON_DIRECT_LAUNCH"}
        if value is not None:
            env["SDM_TRITON_DIRECT_LAUNCH"] = value
        out = subprocess.run([sys.executable, "-c", "from sdm_triton.launch import direct; print(direct.ENABLED)"],
                             env=env, capture_output=True, text=True, check=True)
        return out.stdout.strip()

    assert enabled(None) == "True" and enabled("1") == "True" and enabled("0") == "False"


def test_only_compiled_kernels_are_wrapped_and_only_when_enabled(monkeypatch):
    """Enabled, a compiled JIT function is wrapped (once, the same launcher every call); the
    interpreter's kernels come back as they are. Disabled (SDM_TRITON_DIRECT_LAUNCH=0), every
    kernel comes back as it is."""
    from sdm_triton.kernels import stats
    from sdm_triton.launch.policy import interpreting

    kernel = stats._stats_kernel
    monkeypatch.setattr(direct, "ENABLED", True)
    monkeypatch.setattr(direct, "_LAUNCHERS", {})
    got = direct.launcher(kernel)
    if interpreting():
        assert got is kernel
    else:
        assert isinstance(got, direct._Direct) and got.kernel is kernel
    assert direct.launcher(kernel) is got
    monkeypatch.setattr(direct, "ENABLED", False)
    monkeypatch.setattr(direct, "_LAUNCHERS", {})
    assert direct.launcher(kernel) is kernel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n, dtype, kl", [(64, torch.bfloat16, "forward"), (200, torch.float32, "reverse"),
                                          (3000, torch.bfloat16, "reverse")])
def test_direct_launches_give_the_plain_launches_bits(monkeypatch, n, dtype, kl):
    import sdm_triton

    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(n, 96, device="cuda", generator=gen).to(dtype).requires_grad_()
    g = torch.randn(n + 5, 96, device="cuda", generator=gen).to(dtype).requires_grad_()
    qi = torch.randint(0, n // 4 + 1, (n,), device="cuda", generator=gen)
    gi = torch.randint(0, n // 4 + 1, (n + 5,), device="cuda", generator=gen)

    def step():
        q.grad = g.grad = None
        loss = sdm_triton.sdm_loss(q, g, qi, gi, kl=kl)
        loss.backward()
        return loss.detach().clone(), q.grad.clone(), g.grad.clone()

    monkeypatch.setattr(direct, "ENABLED", True)      # as by default (unless SDM_TRITON_DIRECT_LAUNCH=0)
    monkeypatch.setattr(direct, "_LAUNCHERS", {})
    step()                                    # compiles and loads every kernel of the step
    from triton.runtime.jit import JITFunction

    through_run = []
    run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **kw: through_run.append(self.fn.__name__)
                        or run(self, *a, **kw))
    fast = step()
    assert through_run == [], f"launched through JITFunction.run, not directly: {through_run}"
    monkeypatch.setattr(direct, "ENABLED", False)
    monkeypatch.setattr(direct, "_LAUNCHERS", {})
    plain = step()
    assert through_run, "the plain launches did not go through JITFunction.run"
    for a, b in zip(fast, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n, m, k", [(1, 1, 1), (3, 5, 1), (7, 2, 3), (64, 64, 1), (5, 6, 2)])
def test_the_label_masses_are_aligned_whatever_the_sizes(n, m, k):
    """prepare's buffer starts the label masses at a multiple of 32 floats: Triton specialises a
    pointer on its 16-byte alignment, and at 3 NR floats the masses' pointer was aligned for
    NR % 4 == 0 only (prep, stats and finish compiled twice over: bench/NOTES.md 34). The
    per-sample slots and the masses do not overlap, and the masses hold 2 NDR floats."""
    from sdm_triton.launch.forward import LABEL_MASS_FIELDS, PREPARED_FIELDS, _label_offset, _parts
    from sdm_triton.options import KernelConfig, SDMOptions
    from sdm_triton.problem import Problem

    q = torch.randn(n, 4)
    g = torch.randn(m, 4) if k == 1 else torch.randn(k, m, 4)
    p = Problem(q=q, g=g, q_ids=torch.arange(n), g_ids=torch.arange(m).expand(k, m) if k > 1 else torch.arange(m),
                labels=None, q_mask=None, g_mask=None, scale=None, scale_value=1.0, options=SDMOptions(),
                config=KernelConfig(), workspace_bytes=0, galleries=k, scalar_value=True, return_stats=False)
    buf = torch.empty(_label_offset(p) + len(LABEL_MASS_FIELDS) * p.num_rows)
    pre, lab = _parts(p, buf)
    assert pre.numel() == len(PREPARED_FIELDS) * p.num_samples and pre.data_ptr() == buf.data_ptr()
    assert lab.numel() == len(LABEL_MASS_FIELDS) * p.num_rows
    assert (lab.data_ptr() - buf.data_ptr()) % 128 == 0
    assert lab.data_ptr() >= pre.data_ptr() + pre.numel() * 4


def _problem(q, g, ids, **kw):
    from sdm_triton.options import KernelConfig, SDMOptions
    from sdm_triton.problem import Problem
    fields = dict(q=q, g=g, q_ids=ids, g_ids=ids, labels=None, q_mask=None, g_mask=None, scale=None, scale_value=50.0,
                  options=SDMOptions(), config=KernelConfig(), workspace_bytes=2**26, galleries=1, scalar_value=True,
                  return_stats=False)
    fields.update(kw)
    return Problem(**fields)


def test_what_a_shape_derives_is_kept_across_calls_by_signature(monkeypatch):
    """`tiles._per_shape` (issue 28): two calls with the same signature share the derived values
    (computed once); new data, ids or a new logit-scale value keep the signature; a new shape,
    stride, dtype, option or fp32 matmul precision makes a new one."""
    from sdm_triton.launch import tiles
    from sdm_triton.options import SDMOptions

    monkeypatch.setattr(tiles, "_SHAPES", {})
    monkeypatch.setattr(tiles, "CHECK_SHAPE_CACHE", False)      # (the check recomputes every value)
    calls = []

    @tiles._per_shape
    def probe(p):
        calls.append(1)
        return (p.n, p.m, p.d)

    q, g, ids = torch.randn(6, 4), torch.randn(6, 4), torch.arange(6)
    assert probe(_problem(q, g, ids)) == (6, 6, 4)
    same = [_problem(torch.randn(6, 4), torch.randn(6, 4), torch.arange(6) // 2),
            _problem(q, g, ids, scale_value=7.0)]
    for p in same:
        assert probe(p) == (6, 6, 4)
    assert len(calls) == 1
    other = [_problem(torch.randn(7, 4), g, torch.arange(7), g_ids=ids),
             _problem(q, torch.randn(4, 6).T, ids),                                 # strides
             _problem(q.double(), g.double(), ids),
             _problem(q, g, ids, options=SDMOptions(kl="reverse")),
             _problem(q, g, ids, workspace_bytes=2**20)]
    keys = {(p.signature(), torch.get_float32_matmul_precision()) for p in other}
    assert len(keys) == len(other) and not keys & set(tiles._SHAPES)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high" if before == "highest" else "highest")
        probe(_problem(q, g, ids))
    finally:
        torch.set_float32_matmul_precision(before)
    assert len(calls) == 2
    tiles._SHAPES.clear()
    for _ in range(tiles._MAX_SHAPES + 5):                  # bounded: the oldest go first
        probe(_problem(torch.randn(len(tiles._SHAPES) + 1, 4), g, torch.arange(len(tiles._SHAPES) + 1), g_ids=ids))
    assert len(tiles._SHAPES) == tiles._MAX_SHAPES


def test_a_derivation_that_reads_past_the_signature_fails_under_the_check(monkeypatch):
    """SDM_TRITON_CHECK_SHAPE_CACHE (the suite sets it, tests/conftest.py): a `_per_shape`
    value is recomputed and compared, so one that reads what the signature lacks (here the
    logit scale's value, a kernel argument that changes between calls) raises instead of
    handing a later call an earlier call's value."""
    from sdm_triton.launch import tiles

    assert tiles.CHECK_SHAPE_CACHE, "the suite runs with SDM_TRITON_CHECK_SHAPE_CACHE=1"
    monkeypatch.setattr(tiles, "_SHAPES", {})

    @tiles._per_shape
    def reads_the_scale(p):
        return p.scale_value

    q, g, ids = torch.randn(6, 4), torch.randn(6, 4), torch.arange(6)
    assert reads_the_scale(_problem(q, g, ids, scale_value=50.0)) == 50.0
    assert reads_the_scale(_problem(q, g, ids, scale_value=50.0)) == 50.0
    with pytest.raises(AssertionError, match="reads_the_scale"):
        reads_the_scale(_problem(q, g, ids, scale_value=10.0))


def test_traced_launches_keep_nothing_across_calls(monkeypatch):
    """While torch.compile traces the launches (ops.py, `traceable_launches`), sizes may be
    symbols of that trace: the per-shape values are then kept for the problem alone, never in
    the cache that later calls read."""
    from sdm_triton.launch import tiles

    monkeypatch.setattr(tiles, "_SHAPES", {})

    @tiles._per_shape
    def probe(p):
        return p.n

    q, g, ids = torch.randn(6, 4), torch.randn(6, 4), torch.arange(6)
    with tiles.traceable_launches():
        p = _problem(q, g, ids)
        assert probe(p) == 6 and probe(p) == 6
    assert tiles._SHAPES == {}
    assert probe(_problem(q, g, ids)) == 6 and len(tiles._SHAPES) == 1
