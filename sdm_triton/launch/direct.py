"""Eager launches of compiled kernels without Triton's per-launch Python beyond argument binding
(issue 28).

``kernel[grid](**kw)`` costs 50-88 us of host time per launch on an H100 host, of which Triton's
argument binder (the specialisation key: dtypes, 16-byte alignment, None-ness, constexprs) is
9-22 us and the compiled launcher 10-14 us (`tools/host_profile.py`, bench/NOTES.md 33). The
rest is `JITFunction.run`'s bookkeeping: the kwargs copies, pre-run hooks, the check that no
global the kernel read has changed (a `tl.constexpr` comparison per global), launch metadata
for profiling hooks. At training batch sizes a step is four such launches and tens of
microseconds of GPU work, so that bookkeeping is a visible part of the step.

`launcher(kernel)[grid](**kw)` does what `run` does for a kernel already compiled for this
specialisation: the same binder, the same cache key, the same cache, then the compiled launcher.
Anything else goes through ``kernel[grid](**kw)`` unchanged: the first launch of a
specialisation (which compiles it and loads its module), a registered pre-run or launch hook
(profilers such as proton), a Triton whose internals differ from the ones read here (3.6 and 3.8
are the versions checked), and the interpreter. Skipped: the check of changed globals (this
package's kernels read module constants that nothing assigns).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict

try:   # Triton's own pieces of JITFunction.run (3.x); absent or different: plain launches
    from triton import knobs as _knobs
    from triton.runtime.driver import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction
    from triton.runtime.jit import compute_cache_key as _cache_key
except ImportError:   # pragma: no cover - other Triton versions
    _knobs = _driver = _JITFunction = _cache_key = None

__all__ = ["launcher", "ENABLED"]

#: Whether launches go the direct way: on unless ``SDM_TRITON_DIRECT_LAUNCH=0`` (an H100 host, N = 64,
#: bf16: a step's host time 0.84-1.13 ms against 1.19-1.37 ms through ``kernel[grid]``,
#: bench/NOTES.md 38). False also where this Triton lacks what the direct path reads: then every
#: launch is ``kernel[grid](**kw)``.
ENABLED = (os.environ.get("SDM_TRITON_DIRECT_LAUNCH", "1") != "0" and _cache_key is not None
           and all(hasattr(_knobs, n) for n in ("runtime", "compilation")))


class _Direct:
    """``launcher(kernel)[grid](**kw)``: a compiled kernel's launch through its binder and
    launcher only (see the module's docstring)."""

    __slots__ = ("kernel",)

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid) -> Callable[..., Any]:
        kernel = self.kernel

        def launch(**kw):
            return _launch(kernel, grid, kw)
        return launch


def _registered(hook) -> bool:
    """Whether a launch hook is registered. Triton 3.6 and 3.8 hold the launch hooks in a
    `HookChain` that is never None (its ``calls`` list is empty when none is registered); older
    ones hold a function or None."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return True if calls is None else len(calls) > 0


def _hooked(kernel) -> bool:
    runtime = _knobs.runtime
    return bool(kernel.pre_run_hooks or _registered(runtime.launch_enter_hook)
                or _registered(runtime.launch_exit_hook)
                or _registered(getattr(runtime, "add_stages_inspection_hook", None)))


def _launch(kernel, grid, kw: Dict[str, Any]):
    if _hooked(kernel):
        return kernel[grid](**kw)
    kw["debug"] = kw.get("debug", kernel.debug) or _knobs.runtime.debug
    kw["instrumentation_mode"] = _knobs.compilation.instrumentation_mode
    device = _driver.active.get_current_device()
    kernel_cache, key_cache, _target, _backend, binder = kernel.device_caches[device]
    bound, specialization, options = binder(**kw)
    compiled = kernel_cache.get(_cache_key(key_cache, specialization, options))
    if compiled is None or hasattr(compiled, "result") or getattr(compiled, "module", None) is None:
        # not compiled for this specialisation yet, compiling asynchronously, or never launched
        # (its module not loaded): Triton's own path compiles, loads and launches it
        return kernel[grid](**kw)
    stream = _driver.active.get_current_stream(device)
    n = len(grid)
    run = compiled.run
    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, compiled.function,
        compiled.packed_metadata, None, None, None, *bound.values())
    return compiled


_LAUNCHERS: Dict[int, Any] = {}


def launcher(kernel):
    """``launcher(kernel)[grid](**kw)`` launches as ``kernel[grid](**kw)`` does, with less host
    time once the specialisation is compiled. Kernels that are not compiled JIT functions (the
    interpreter's) come back as they are."""
    found = _LAUNCHERS.get(id(kernel))
    if found is None or found[0] is not kernel:
        direct = (ENABLED and isinstance(kernel, _JITFunction) and hasattr(kernel, "device_caches"))
        found = _LAUNCHERS[id(kernel)] = (kernel, _Direct(kernel) if direct else kernel)
    return found[1]
