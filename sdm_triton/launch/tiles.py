"""What every launch of the Triton backend shares: tile shapes, index helpers, the problem's
tensors as the kernels name them, and how a launch is routed (eager or traced).

The launch-side counterpart of `kernels/tiles.py`. Tile shapes: `KernelConfig` fields given
by the caller win; otherwise the tile table of `policy.py` (``TILES``, by pass, size class
and dtype; small fixed tiles under the CPU interpreter), which `_stats_tiles`, `_prep_tiles`,
`_fused_tiles` and `_chunk_tiles` read once per problem.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
from typing import Dict, Tuple

import torch
import triton

from ..backend import NUM_STATS
from ..problem import Problem
from .direct import launcher
from .policy import Tiles, padded_d, positives_path, table_tiles

try:
    from torch.library import wrap_triton as _wrap_triton
except ImportError:   # PyTorch < 2.6: eager launches only
    _wrap_triton = None

#: True while ops.py's triton_op bodies run (the compiler traces them): launches go through
#: wrap_triton then. In eager mode they must not: wrap_triton is enabled outside any op too
#: and routes every launch through a higher-order op (pytree, signature binding, dispatch),
#: ~0.5 ms of host time per launch measured on an H200 host (bench/NOTES.md).
_TRACING = contextvars.ContextVar("sdm_triton_traceable_launches", default=False)


@contextlib.contextmanager
def traceable_launches():
    token = _TRACING.set(True)
    try:
        yield
    finally:
        _TRACING.reset(token)


def tracing() -> bool:
    """Whether the launches are being traced (inside ops.py's triton_op bodies)."""
    return _TRACING.get()


def _traceable(kernel):
    """How ``kernel[grid](**kw)`` runs here: through wrap_triton while traced, else directly
    (`direct.launcher`: Triton's binder and the compiled launcher, without run()'s bookkeeping)."""
    return _wrap_triton(kernel) if (_wrap_triton is not None and _TRACING.get()) else launcher(kernel)


def _per_problem(fn):
    """``fn(p)`` computed once per problem and kept in `Problem.derived` (for what depends on
    the problem's tensors themselves: the forward and the backward of a call share it)."""
    key = fn.__name__

    @functools.wraps(fn)
    def cached(p: Problem):
        value = p.derived.get(key)
        if value is None:
            value = p.derived[key] = fn(p)
        return value
    return cached


#: What `_per_shape` functions derived, by problem signature (`Problem.signature` and the fp32
#: matmul precision), oldest first: a training loop calls with the same shapes step after step,
#: and a small step's host time is made of such small pieces (issue 28). Bounded: a process that
#: sees many shapes (tests, variable batch sizes) recomputes rather than grows.
_SHAPES: Dict[tuple, dict] = {}
_SHAPES_LOCK = threading.Lock()
_MAX_SHAPES = 64
_SHAPE_KEY = "_per_shape"
#: ``SDM_TRITON_CHECK_SHAPE_CACHE=1`` (the test suite sets it): every `_per_shape` value is also
#: recomputed and must equal the kept one, so that a derivation reading something the signature
#: lacks fails a test instead of reusing another problem's value.
CHECK_SHAPE_CACHE = os.environ.get("SDM_TRITON_CHECK_SHAPE_CACHE", "0") == "1"


def _shape_values(p: Problem) -> dict:
    """The `_per_shape` values of problems with ``p``'s signature (looked up once per call)."""
    values = p.derived.get(_SHAPE_KEY)
    if values is None and _TRACING.get():
        # torch.compile traces the launches (ops.py): the sizes may be symbols of this trace
        # (a recompile for dynamic shapes), which must not outlive it; kept for this problem only
        values = p.derived[_SHAPE_KEY] = {}
    if values is None:
        sig = (p.signature(), torch.get_float32_matmul_precision())
        values = _SHAPES.get(sig)
        if values is None:
            with _SHAPES_LOCK:       # threads (DataParallel's replicas) may add signatures at once
                values = _SHAPES.get(sig)
                if values is None:
                    if len(_SHAPES) >= _MAX_SHAPES:
                        _SHAPES.pop(next(iter(_SHAPES)))
                    values = _SHAPES[sig] = {}
        p.derived[_SHAPE_KEY] = values
    return values


def _per_shape(fn):
    """``fn(p)`` for what depends only on ``p``'s signature (shapes, strides, dtypes, devices,
    options, config; no tensor, no logit-scale value): computed once per signature and kept
    across calls (`_SHAPES`)."""
    key = fn.__name__

    @functools.wraps(fn)
    def cached(p: Problem):
        values = _shape_values(p)
        value = values.get(key)
        if value is None:
            value = values[key] = fn(p)
        elif CHECK_SHAPE_CACHE:
            fresh = fn(p)
            if fresh != value:
                raise AssertionError(f"sdm_triton: {key} kept for this problem's signature is {value!r}, "
                                     f"recomputed {fresh!r}: the signature misses what it reads")
        return value
    return cached


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision: TF32 only when the caller allowed it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host integers (triton.cdiv is a ConstexprFunction in Triton 3.8: ~10 us a
    call from Python, ~15 calls a step)."""
    return -(-a // b)


def _merge(cfg, default: Tiles, backward: bool = False) -> Tiles:
    """The caller's KernelConfig fields (forward's, or the bwd_* ones) over ``default``; a
    field the table leaves None stays None (not the pass's to choose)."""
    fields = ("block_m", "block_n", "block_k", "num_warps", "num_stages")
    # (no bwd_block_k: the backwards step along D with the forward's block_k, table entry None)
    given = [getattr(cfg, ("bwd_" if backward else "") + f, None) for f in fields]
    return Tiles(*(None if getattr(default, f) is None else g or getattr(default, f) for g, f in zip(given, fields)))


@_per_shape
def _stats_tiles(p: Problem) -> Tiles:
    """The statistics pass's tiles; its block_k is also the backwards' dot step. A loop that
    sums label terms (`positives_path` "tiles") holds more registers: its own table entries."""
    return _merge(p.config, table_tiles("stats_labels" if positives_path(p) == "tiles" else "stats", p))


@_per_shape
def _prep_tiles(p: Problem) -> Tiles:
    """The preparation pass's tiles: the statistics pass's rows and columns, a feature step no
    larger than padded D, the table's warps."""
    t = _stats_tiles(p)
    return Tiles(t.block_m, t.block_n, min(t.block_k, padded_d(p.d)), table_tiles("prep").num_warps, None)


@_per_shape
def _fused_tiles(p: Problem) -> Tiles:
    """The fused backward's tiles (block_k None: it steps as `_stats_tiles`; its BLOCK_D is
    policy.padded_d)."""
    return _merge(p.config, table_tiles("fused", p), backward=True)


@_per_shape
def _chunk_tiles(p: Problem) -> Tiles:
    """The chunked backward's W kernel's tiles (block_k None: it steps as `_stats_tiles`)."""
    return _merge(p.config, table_tiles("chunked", p), backward=True)


def _span(t) -> int:
    """Elements between a tensor's first and last addressed element (+1): its offsets' range."""
    if t is None or t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _index_dtype(*extents: int):
    """tl.int32 offsets unless some tensor's offsets can pass 2^31 (then tl.int64): 64-bit
    address arithmetic on every tile costs the statistics pass dearly (bench/NOTES.md)."""
    return triton.language.int64 if max(extents) >= 2**31 else triton.language.int32


@_per_shape
def _index_extents(p: Problem) -> Tuple[int, ...]:
    """The offset ranges of the problem's own tensors and of the statistics partials."""
    return _span(p.q), _span(p.g), _span(p.labels), p.num_rows * NUM_STATS * 64


def _problem_index(p: Problem, *more: int):
    return _index_dtype(*_index_extents(p), *more)


@_per_shape
def _side_strides(p: Problem) -> dict:
    """The strides of the problem's tensors, as every kernel names them (0 for an absent one)."""
    sg_gal, sg_row, sg_d = p.g_strides()
    s_gid_gal, s_gid = p.g_ids_strides()
    s_gmsk_gal, s_gmsk = p.g_mask_strides()
    sl_q, sl_gal, sl_g = p.label_strides()
    return dict(
        sq_row=p.q.stride(0), sq_d=p.q.stride(1), sg_gal=sg_gal, sg_row=sg_row, sg_d=sg_d,
        s_qmsk=p.q_mask.stride(0) if p.q_mask is not None else 0, s_gmsk_gal=s_gmsk_gal, s_gmsk=s_gmsk,
        s_qid=p.q_ids.stride(0) if p.q_ids is not None else 0, s_gid_gal=s_gid_gal, s_gid=s_gid,
        sl_q=sl_q, sl_gal=sl_gal, sl_g=sl_g)


@_per_problem
def _side_args(p: Problem) -> dict:
    """The tensors of the problem and their strides, as every kernel names them."""
    return dict(_side_strides(p), q_ptr=p.q, g_ptr=p.g, q_msk=p.q_mask, g_msk=p.g_mask, q_ids=p.q_ids,
                g_ids=p.g_ids, lab=p.labels)
