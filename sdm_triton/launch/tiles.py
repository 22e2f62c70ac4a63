"""What every launch of the Triton backend shares: tile shapes, index helpers, the problem's
tensors as the kernels name them, and how a launch is routed (eager or traced).

The launch-side counterpart of `kernels/tiles.py`. Tile shapes: `KernelConfig` fields given
by the caller win; otherwise `_stats_tiles` / `_fused_tiles` / `_chunk_tiles` pick by size
(measured on an H200, bench/NOTES.md), and fixed small tiles under the CPU interpreter.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from typing import Tuple

import torch
import triton

from ..backend import NUM_STATS
from ..problem import Problem

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


def _traceable(kernel):
    return _wrap_triton(kernel) if (_wrap_triton is not None and _TRACING.get()) else kernel


#: The fused backward keeps u [BLOCK_M, D] in registers: used up to this padded D.
FUSED_MAX_D = 512
#: ... and while the problem is small: the fused kernel runs each side's rows against all
#: columns with small tiles; above this many logits (N * K * M) the chunked path is faster.
FUSED_MAX_LOGITS = 2**23


#: Read once, as Triton reads it when the kernels are decorated (an import-time choice).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    return _INTERPRETING


def _per_problem(fn):
    """``fn(p)`` computed once per problem and kept in `Problem.derived` (for what depends on
    the problem alone: the forward and the backward of a call share it)."""
    key = fn.__name__

    @functools.wraps(fn)
    def cached(p: Problem):
        value = p.derived.get(key)
        if value is None:
            value = p.derived[key] = fn(p)
        return value
    return cached


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision: TF32 only when the caller allowed it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host integers (triton.cdiv is a ConstexprFunction in Triton 3.8: ~10 us a
    call from Python, ~15 calls a step)."""
    return -(-a // b)


def _pow2_at_least(x: int) -> int:
    """The smallest power of two >= x (x >= 1), for host integers (see _cdiv)."""
    return 1 << (x - 1).bit_length()


def _merge(cfg, default: Tiles, backward: bool = False) -> Tiles:
    """The caller's KernelConfig fields (forward's, or the bwd_* ones) over ``default``."""
    fields = ("block_m", "block_n", "block_k", "num_warps", "num_stages")
    given = [getattr(cfg, ("bwd_" if backward else "") + f) for f in fields]
    return Tiles(*(g or getattr(default, f) for g, f in zip(given, fields)))


@_per_problem
def _stats_tiles(p: Problem) -> Tiles:
    if interpreting():
        return _merge(p.config, Tiles(16, 16, 16, 1, 1))
    logits = p.n * p.galleries * p.m
    if logits >= 2**24 and p.q.dtype != torch.float32:
        # H200, bf16, N = 16384 / 32768: 1.36x / 1.49x faster than 128 x 128 (bench/NOTES.md 20)
        default = Tiles(128, 256, 64, 8, 3)
    elif logits >= 2**24:
        default = Tiles(128, 128, 64, 8, 3)      # fp32 at 128 x 256: 196 KiB of shared memory, unmeasured
    elif logits >= 2**20:
        default = Tiles(64, 64, 64, 4, 3)
    else:
        default = Tiles(32, 32, 64, 4, 2)
    return _merge(p.config, default)


def _fused_tiles(p: Problem, block_d: int) -> Tiles:
    if interpreting():
        return _merge(p.config, Tiles(16, 16, block_d, 1, 1), backward=True)
    block_m = 16 if block_d >= 256 else 32
    return _merge(p.config, Tiles(block_m, 32, block_d, 4, 1), backward=True)


@_per_problem
def _chunk_tiles(p: Problem) -> Tiles:
    if interpreting():
        return _merge(p.config, Tiles(16, 16, 16, 1, 1), backward=True)
    return _merge(p.config, Tiles(128, 64, 64, 8, 3), backward=True)


def backward_path(p: Problem) -> str:
    """"fused" or "chunked" (`sdm_triton.launch`): the caller's KernelConfig.backward, else by
    size. The fused kernel keeps a row block's gradient over all of D on chip, so above
    FUSED_MAX_D it hands over to the chunked one whatever was asked (at D = 4096 it would need
    256 KiB of shared memory, more than a Hopper SM has)."""
    block_d = max(16, _pow2_at_least(p.d))
    if block_d > FUSED_MAX_D:
        return "chunked"
    if p.config.backward != "auto":
        return p.config.backward
    return "fused" if p.n * p.galleries * p.m <= FUSED_MAX_LOGITS else "chunked"


def _span(t) -> int:
    """Elements between a tensor's first and last addressed element (+1): its offsets' range."""
    if t is None or t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _index_dtype(*extents: int):
    """tl.int32 offsets unless some tensor's offsets can pass 2^31 (then tl.int64): 64-bit
    address arithmetic on every tile costs the statistics pass dearly (bench/NOTES.md)."""
    return triton.language.int64 if max(extents) >= 2**31 else triton.language.int32


@_per_problem
def _index_extents(p: Problem) -> Tuple[int, ...]:
    """The offset ranges of the problem's own tensors and of the statistics partials."""
    return _span(p.q), _span(p.g), _span(p.labels), p.num_rows * NUM_STATS * 64


def _problem_index(p: Problem, *more: int):
    return _index_dtype(*_index_extents(p), *more)


@_per_problem
def _side_args(p: Problem) -> dict:
    """The tensors of the problem and their strides, as every kernel names them."""
    sg_gal, sg_row, sg_d = p.g_strides()
    s_gid_gal, s_gid = p.g_ids_strides()
    s_gmsk_gal, s_gmsk = p.g_mask_strides()
    sl_q, sl_gal, sl_g = p.label_strides()
    return dict(
        q_ptr=p.q, sq_row=p.q.stride(0), sq_d=p.q.stride(1), g_ptr=p.g, sg_gal=sg_gal, sg_row=sg_row, sg_d=sg_d,
        q_msk=p.q_mask, s_qmsk=p.q_mask.stride(0) if p.q_mask is not None else 0,
        g_msk=p.g_mask, s_gmsk_gal=s_gmsk_gal, s_gmsk=s_gmsk,
        q_ids=p.q_ids, s_qid=p.q_ids.stride(0) if p.q_ids is not None else 0,
        g_ids=p.g_ids, s_gid_gal=s_gid_gal, s_gid=s_gid,
        lab=p.labels, sl_q=sl_q, sl_gal=sl_gal, sl_g=sl_g)
