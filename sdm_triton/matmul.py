"""Matrix products with fp32 accumulation and fp32 results for half-precision operands.

A product of two bf16 / fp16 values is exact in fp32, so cuBLAS with fp32 accumulation and
an fp32 result loses nothing on exact operands (the backward's W halves and the features
scaled by powers of two, kernels/grad.py). fp32 operands follow
``torch.get_float32_matmul_precision()``. Without ``out_dtype`` support (older PyTorch, or
the CPU, where the interpreter runs), the half operands are upcast first: the same exact
products, more memory.
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
