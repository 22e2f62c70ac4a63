"""Matrix products with fp32 accumulation and fp32 results for half-precision operands.

A product of two bf16 / fp16 values is exact in fp32, so cuBLAS with fp32
accumulation and an fp32 result loses nothing on the raw inputs (SPEC.md,
"Precision"). fp32 operands follow torch.get_float32_matmul_precision(), as the
spec asks. On the CPU (tests, the interpreter) half operands are upcast first,
which gives the same exact products.
"""

from __future__ import annotations

import torch

_HAS_OUT_DTYPE = [True]  # torch.mm / addmm(..., out_dtype=) exist on CUDA in recent PyTorch


def _half_on_cuda(a: torch.Tensor, want: torch.dtype) -> bool:
    return a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and want == torch.float32


def mm_f32(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b in ``out_dtype`` (fp32, or float64 for float64 operands), accumulated in at least fp32."""
    if a.dtype == out_dtype:
        return a @ b
    if _half_on_cuda(a, out_dtype) and _HAS_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=out_dtype)
        except (TypeError, RuntimeError, NotImplementedError):
            _HAS_OUT_DTYPE[0] = False
    return a.to(out_dtype) @ b.to(out_dtype)


def addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, accumulating in acc's dtype (fp32 accumulator, half operands)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if _half_on_cuda(a, acc.dtype) and _HAS_OUT_DTYPE[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _HAS_OUT_DTYPE[0] = False
    acc.add_(mm_f32(a, b, acc.dtype))
