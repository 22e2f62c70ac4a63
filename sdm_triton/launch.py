"""Launchers for the Triton tile kernels: block sizes, workspaces, grids.

`TritonTiles` implements the two primitives the autograd layer drives, for the
columns [c0, c1) of one chunk. Unless the variant fuses the dot product into the
kernels, each primitive first computes the chunk's raw dot products with cuBLAS
(fp32 result, `matmul.mm_f32`), which the kernel then reads:

    stats(...) -> (row statistics [5, N] over the chunk, column statistics [5, c1 - c0])
    grad(...)  -> (dS workspace [N, c1 - c0], per-row sum dS * cos or None)

`sdm_triton/torch_backend.py` implements the same two in plain torch.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton

from .kernels.tile_grad import _sdm_tile_grad_kernel
from .kernels.merge_stats import _sdm_merge_stats_kernel
from .kernels.tile_stats import _sdm_tile_stats_kernel
from .matmul import mm_f32
from .stats import NUM_STATS


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """A kernel variant: tile shape and launch parameters (selectable by name in bench/)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64       # only used when fused_dot
    num_warps: int = 4
    num_stages: int = 1
    fused_dot: bool = False  # True: tl.dot in the kernels; False: read a cuBLAS fp32 dot chunk


#: Named variants; "default" is what the library uses. On an H200 at D = 512 (bench/NOTES.md)
#: the fused variant was 3.3x faster end to end than reading a cuBLAS dot chunk with the
#: default 64 MiB workspace, whose many small chunks are launch-bound.
TILE_CONFIGS = {
    "default": TileConfig(128, 64, 64, 4, 3, fused_dot=True),
    "cublas_m64n64w4": TileConfig(),
    "cublas_m32n128w4": TileConfig(32, 128, 64, 4, 1),
    # tl.dot inside the kernels: no dot chunk in memory, but at D = 512 the epilogue of
    # both softmax directions leaves the tensor cores idle (bench/NOTES.md).
    "fused_m64n64k64w4": TileConfig(64, 64, 64, 4, 3, fused_dot=True),
    # small tiles for the CPU interpreter, one per dot path (the first mirrors "default")
    "interpreter": TileConfig(16, 16, 16, 1, 1, fused_dot=True),
    "interpreter_cublas": TileConfig(16, 16, 16, 1, 1),
}


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


class TritonTiles:
    name = "triton"

    def __init__(self, config: TileConfig | None = None):
        if config is None:
            config = TILE_CONFIGS["interpreter" if interpreting() else "default"]
        self.config = config

    @staticmethod
    def check_supported(q: torch.Tensor):
        if q.dtype == torch.float64:
            raise TypeError("backend='triton' supports float32, bfloat16 and float16 features; "
                            "use backend='torch' (or 'auto') for float64")
        if q.device.type != "cuda" and not interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (got {q.device}); use backend='torch' "
                             "on CPU, or set TRITON_INTERPRET=1 before importing triton to interpret the kernels")

    def split_dtype(self, dtype: torch.dtype):
        """Half dtype in which dS and the features are split hi + lo for the products (None: fp32)."""
        return dtype if dtype in (torch.float16, torch.bfloat16) else None

    def chunk_columns(self, kind: str, n_rows: int, n_cols: int, dtype: torch.dtype, budget_bytes: int) -> int:
        """Columns per chunk so that the chunk's workspace stays within ``budget_bytes``."""
        cfg = self.config
        per_col = 0 if cfg.fused_dot else 4 * n_rows                 # fp32 dot chunk [N, C]
        if kind == "grad":            # + the dS workspace [N, C]: fp32, or hi + lo of a half dtype
            per_col += 4 * n_rows
        else:                # + row and column partials (fp32) and their merge temporaries
            per_col += 3 * NUM_STATS * 4 * (triton.cdiv(n_rows, cfg.block_n) + triton.cdiv(n_rows, cfg.block_m))
        cols = max(cfg.block_n, (budget_bytes // max(1, per_col)) // cfg.block_n * cfg.block_n)
        return min(cols, triton.cdiv(n_cols, cfg.block_n) * cfg.block_n)

    def _common(self, a, b, labels, scale_t, c0, c1):
        cfg = self.config
        dense = labels is not None
        fp32 = a.feats.dtype == torch.float32
        upcast = interpreting() and a.feats.dtype == torch.bfloat16
        lab = labels if dense else a.inv_norm  # any tensor: unused when not DENSE
        if lab.dtype == torch.bool:
            lab = lab.view(torch.uint8)
        ids_a = a.ids if not dense else a.inv_norm
        ids_b = b.ids if not dense else b.inv_norm
        # raw dot products of the chunk, fp32 (exact products of half inputs, fp32 accumulation)
        dot = a.inv_norm if cfg.fused_dot else mm_f32(a.feats, b.feats[c0:c1].T)
        grid = (triton.cdiv(a.feats.shape[0], cfg.block_m), triton.cdiv(c1 - c0, cfg.block_n))
        args = (a.feats, b.feats, dot, a.inv_norm, b.inv_norm, scale_t, ids_a, ids_b, lab,
                a.present.view(torch.uint8), b.present.view(torch.uint8), a.inv_ysum, b.inv_ysum)
        strides = (a.feats.stride(0), a.feats.stride(1), b.feats.stride(0), b.feats.stride(1),
                   dot.stride(0) if not cfg.fused_dot else 0, dot.stride(1) if not cfg.fused_dot else 0,
                   lab.stride(0) if dense else 0, lab.stride(1) if dense else 0)
        flags = dict(DENSE=dense, FUSED_DOT=cfg.fused_dot, IS_FP32=fp32 or upcast,
                     DOT_PRECISION=_dot_precision(a.feats.dtype), UPCAST=upcast,
                     BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return grid, args, strides, flags

    def stats(self, a, b, labels, scale_t, c0, c1, reverse, eps):
        grid, args, strides, flags = self._common(a, b, labels, scale_t, c0, c1)
        n = a.feats.shape[0]
        dev = a.feats.device
        row_part = torch.empty((NUM_STATS, grid[1], n), dtype=torch.float32, device=dev)
        col_part = torch.empty((NUM_STATS, grid[0], c1 - c0), dtype=torch.float32, device=dev)
        _sdm_tile_stats_kernel[grid](
            *args, row_part, col_part,
            n, c0, c1, a.feats.shape[1], *strides,
            row_part.stride(0), row_part.stride(1), col_part.stride(0), col_part.stride(1),
            float(eps), REVERSE=reverse, **flags)
        return self.merge(row_part, reverse), self.merge(col_part, reverse)

    def merge(self, part: torch.Tensor, reverse: bool) -> torch.Tensor:
        """[5, K, L] partial statistics -> [5, L] (stats.merge_partials in one launch)."""
        _, k, length = part.shape
        if part.stride(2) != 1:
            part = part.contiguous()
        out = torch.empty((NUM_STATS, length), dtype=torch.float32, device=part.device)
        block_l = 16 if interpreting() else 128
        _sdm_merge_stats_kernel[(triton.cdiv(length, block_l),)](
            part, out, k, length, part.stride(0), part.stride(1), out.stride(0),
            REVERSE=reverse, BLOCK_K=16 if interpreting() else 32, BLOCK_L=block_l, num_warps=4)
        return out

    def grad(self, a, b, labels, scale_t, c0, c1, reverse, eps, lse_a, lse_b, loss_a, loss_b, ga, gb,
             want_dscale):
        grid, args, strides, flags = self._common(a, b, labels, scale_t, c0, c1)
        n = a.feats.shape[0]
        dev = a.feats.device
        half = self.split_dtype(a.feats.dtype)
        ds = torch.empty((n, c1 - c0), dtype=half or torch.float32, device=dev)
        ds_lo = torch.empty_like(ds) if half is not None else ds
        dscale_part = torch.empty((grid[1], n) if want_dscale else (1, 1), dtype=torch.float32, device=dev)
        _sdm_tile_grad_kernel[grid](
            *args, lse_a, lse_b, loss_a, loss_b, ga, gb, ds, ds_lo, dscale_part,
            n, c0, c1, a.feats.shape[1], *strides,
            ds.stride(0), ds.stride(1), dscale_part.stride(0),
            float(eps), REVERSE=reverse, WANT_DSCALE=want_dscale, SPLIT=half is not None, **flags)
        return ds, (ds_lo if half is not None else None), (dscale_part.sum(0) if want_dscale else None)
