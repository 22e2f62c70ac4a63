"""Matrix products with fp32 accumulation and fp32 results for half-precision operands.

A product of two bf16 / fp16 values is exact in fp32, so cuBLAS with fp32 accumulation and
an fp32 result loses nothing on exact operands (the backward's W halves and the features
scaled by powers of two, kernels/grad.py). fp32 operands follow
``torch.get_float32_matmul_precision()``. Without ``out_dtype`` support (older PyTorch, or
the CPU, where the interpreter runs), the half operands are upcast first: the same exact
products, more memory.

While torch.compile traces the Triton backend (``sdm_triton.launch``), the products run as the
opaque operators ``sdm_triton::mm_f32`` / ``sdm_triton::addmm_f32`` (`traced_products`):
Inductor's decomposition of ``addmm(..., out_dtype=)`` is broken in torch 2.11 (issue 26: every
compiled step from N = 4096, where the chunked backward's products start, crashed).
"""

from __future__ import annotations

import torch


def _native_out_dtype(a: torch.Tensor, want: torch.dtype) -> bool:
    return a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and want == torch.float32 and _OUT_DTYPE


def _probe_out_dtype() -> bool:
    """Whether this PyTorch has ``mm`` / ``addmm`` with ``out_dtype`` (2.8 and later), read from
    the operator schemas once. A failing call is never taken as the answer: an out-of-memory
    error must surface, not switch every later product to the upcast path."""
    schemas = [str(s) for op in ("aten::mm", "aten::addmm") for s in torch._C._jit_get_schemas_for_operator(op)]
    return sum("ScalarType out_dtype" in s for s in schemas) >= 2


_OUT_DTYPE = _probe_out_dtype()


def mm_f32(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b in ``out_dtype``, accumulated in at least fp32."""
    if a.dtype == out_dtype:
        return a @ b
    if _native_out_dtype(a, out_dtype):
        return torch.mm(a, b, out_dtype=out_dtype)
    return a.to(out_dtype) @ b.to(out_dtype)


def addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, accumulating in acc's dtype (fp32 accumulator, half operands)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _native_out_dtype(a, acc.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


@torch.library.custom_op("sdm_triton::mm_f32", mutates_args=())
def _mm_f32_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return mm_f32(a, b)


@_mm_f32_op.register_fake
def _mm_f32_fake(a, b):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)


@torch.library.custom_op("sdm_triton::addmm_f32", mutates_args=("acc",))
def _addmm_f32_op(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    addmm_f32(acc, a, b)


@_addmm_f32_op.register_fake
def _addmm_f32_fake(acc, a, b):
    return None


def traced_products():
    """(mm_f32, addmm_f32) as operators the compiler keeps whole (fp32 results)."""
    return _mm_f32_op, _addmm_f32_op
