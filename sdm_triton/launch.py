"""Launchers for the Triton tile kernels: block sizes, workspaces, grids.

`TritonTiles` implements the two primitives the autograd layer drives, for the
columns [c0, c1) of one chunk:

    stats(...) -> (row statistics [5, N] over the chunk, column statistics [5, c1 - c0])
    grad(...)  -> (workspace W [N, P * (c1 - c0)] of P parts, P, per-row sum dS * cos or None)

Statistics come from one of two kernels (`TileConfig.two_pass`): the two-pass kernel
(`kernels/direction_stats.py`, one direction per launch, online statistics over all
columns, no partials: the chunk is every column) or the one-pass tile kernel
(`kernels/tile_stats.py`, both directions per tile, partials merged per chunk). Unless
the variant fuses the dot product into the kernels, the one-pass and grad kernels
read the chunk's raw dot products from a cuBLAS product (fp32, `matmul.mm_f32`).

Galleries: when the row side's label vectors have a leading dimension K
(``a.inv_ysum`` [K, N], `prepare.prepare_sides(galleries=K)`), the columns are K
galleries of equal width, each with its own row softmax: row statistics come back
[5, K, N]. The two-pass statistics kernel and the grad kernel handle that
themselves (one launch for all K); the one-pass kernel does not.

`sdm_triton/torch_backend.py` implements the same two in plain torch.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton

from .kernels.direction_stats import _sdm_direction_stats_kernel
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
    block_k: int = 64       # only used when fused_dot; 0: one tl.dot over all of D, the rows'
                            # features loaded once per program (two-pass stats and grad kernels)
    num_warps: int = 4
    num_stages: int = 1
    fused_dot: bool = False  # True: tl.dot in the kernels; False: read a cuBLAS fp32 dot chunk
    two_pass: bool = False   # statistics: one launch per direction (implies tl.dot in that kernel)
    loop_flatten: bool = False     # two-pass statistics: tl.range(flatten=True) over the column loop
    warp_specialize: bool = False  # two-pass statistics: tl.range(warp_specialize=True)


#: Named variants; "default" is what the library uses. bench/NOTES.md has the measurements
#: behind the choice (H100, D = 512, bf16, N = M = 32768, fwd + bwd): two-pass 64x64 K-loop
#: 44.0 ms; one-pass 128x64 57.4; two-pass 128x64 72.4; ONE_K m128n32 44.2, m64n32 55.4;
#: loop-flattened 55.5; warp-specialised m128n64w8 50.7 (m64n64w4 does not compile with
#: Triton 3.6); the cuBLAS-chunk variants were launch-bound on an H200 (NOTES §2).
TILE_CONFIGS = {
    "default": TileConfig(64, 64, 64, 4, 3, fused_dot=True, two_pass=True),
    "twopass_m64n32k0w4s2": TileConfig(64, 32, 0, 4, 2, fused_dot=True, two_pass=True),
    "twopass_m128n32k0w8s1": TileConfig(128, 32, 0, 8, 1, fused_dot=True, two_pass=True),
    "twopass_m64n64w4_flat": TileConfig(64, 64, 64, 4, 3, fused_dot=True, two_pass=True, loop_flatten=True),
    "twopass_m128n64w8_ws": TileConfig(128, 64, 64, 8, 3, fused_dot=True, two_pass=True, warp_specialize=True),
    "twopass_m128n64w4": TileConfig(128, 64, 64, 4, 3, fused_dot=True, two_pass=True),
    "onepass_m128n64w4": TileConfig(128, 64, 64, 4, 3, fused_dot=True),
    "onepass_m64n64w4": TileConfig(64, 64, 64, 4, 3, fused_dot=True),
    "cublas_m64n64w4": TileConfig(),
    "cublas_m32n128w4": TileConfig(32, 128, 64, 4, 1),
    # small tiles for the CPU interpreter, one per statistics kernel / dot path
    "interpreter": TileConfig(16, 16, 16, 1, 1, fused_dot=True, two_pass=True),
    "interpreter_onek": TileConfig(16, 16, 0, 1, 1, fused_dot=True, two_pass=True),
    "interpreter_onepass": TileConfig(16, 16, 16, 1, 1, fused_dot=True),
    "interpreter_cublas": TileConfig(16, 16, 16, 1, 1),
}


#: On-chip bytes the ONE_K kernels may plan for the rows' features and the pipelined column
#: tiles (an H100 / H200 block may use 227 KiB of shared memory; the rest is the epilogue's
#: layout conversions, which needed ~64 KiB at 64x64 tiles, D = 512).
ONE_K_SMEM_BYTES = 160 * 1024


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


class TritonTiles:
    name = "triton"

    def __init__(self, config: TileConfig | None = None, config_name: str | None = None):
        if config is None:
            config_name = "interpreter" if interpreting() else "default"
            config = TILE_CONFIGS[config_name]
        self.config = config
        self.config_name = config_name or "custom"

    @staticmethod
    def check_supported(q: torch.Tensor):
        if q.dtype == torch.float64:
            raise TypeError("backend='triton' supports float32, bfloat16 and float16 features; "
                            "use backend='torch' (or 'auto') for float64")
        if q.device.type != "cuda" and not interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (got {q.device}); use backend='torch' "
                             "on CPU, or set TRITON_INTERPRET=1 before importing triton to interpret the kernels")

    def gemm_dtype(self, dtype: torch.dtype):
        """dtype of the backward products: the input dtype (W split hi + lo in it, the features
        exact in it after a power-of-two row scaling; kernels/tile_grad.py); None for fp32."""
        return dtype if dtype in (torch.float16, torch.bfloat16) else None

    def chunk_columns(self, kind: str, n_rows: int, n_cols: int, dtype: torch.dtype, budget_bytes: int) -> int:
        """Columns per chunk so that the chunk's workspace stays within ``budget_bytes``."""
        cfg = self.config
        if kind == "stats" and cfg.two_pass:
            return n_cols           # O(N + M) statistics: one chunk
        per_col = 0 if cfg.fused_dot else 4 * n_rows                 # fp32 dot chunk [N, C]
        if kind == "grad":            # + the workspace W [N, C]: fp32, or hi + lo halves
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
                a.present.view(torch.uint8), b.present.view(torch.uint8), a.inv_ysum.contiguous(), b.inv_ysum)
        strides = (a.feats.stride(0), a.feats.stride(1), b.feats.stride(0), b.feats.stride(1),
                   dot.stride(0) if not cfg.fused_dot else 0, dot.stride(1) if not cfg.fused_dot else 0,
                   lab.stride(0) if dense else 0, lab.stride(1) if dense else 0)
        flags = dict(DENSE=dense, FUSED_DOT=cfg.fused_dot, IS_FP32=fp32 or upcast,
                     DOT_PRECISION=_dot_precision(a.feats.dtype), UPCAST=upcast,
                     BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k or 64,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return grid, args, strides, flags

    def stats(self, a, b, labels, scale_t, c0, c1, reverse, eps):
        if a.galleries > 1 and not self.config.two_pass:
            raise ValueError(f"tile config {self.config_name!r} (one-pass statistics) does not support several "
                             "galleries; use a two-pass config such as 'default'")
        if self.config.two_pass:
            n = a.feats.shape[0]
            rows = self._direction_stats(a, b, labels, False, scale_t, (0, n), (c0, c1), reverse, eps)
            cols = self._direction_stats(b, a, labels, True, scale_t, (c0, c1), (0, n), reverse, eps)
            return rows, cols
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

    def _direction_stats(self, a, b, labels, transposed, scale_t, rows, cols, reverse, eps):
        """Statistics [5, r1 - r0] of rows [r0, r1) of side ``a`` over columns [c0, c1) of side ``b``.

        ``transposed``: ``a`` is the gallery side, so dense labels are read as labels.T.
        The columns are cut into segments (merged afterwards) only when the row blocks
        alone would leave SMs idle.
        """
        cfg = self.config
        (r0, r1), (c0, c1) = rows, cols
        n_rows = r1 - r0
        dev = a.feats.device
        row_blocks = triton.cdiv(n_rows, cfg.block_m)
        gals = a.galleries
        gal_cols = (c1 - c0) // gals
        segs, seg_cols = self._groups(n_rows, gal_cols, gals, dev)
        dense = labels is not None
        lab = labels if dense else a.inv_norm
        if lab.dtype == torch.bool:
            lab = lab.view(torch.uint8)
        stride_lm, stride_ln = (0, 0) if not dense else (
            (lab.stride(1), lab.stride(0)) if transposed else (lab.stride(0), lab.stride(1)))
        upcast = interpreting() and a.feats.dtype == torch.bfloat16
        inv_ysum = a.inv_ysum.contiguous()
        out = torch.empty((NUM_STATS, segs, gals, n_rows), dtype=torch.float32, device=dev)
        _sdm_direction_stats_kernel[(row_blocks, gals * segs)](
            a.feats, b.feats, a.inv_norm, b.inv_norm, scale_t,
            a.ids if not dense else a.inv_norm, b.ids if not dense else b.inv_norm, lab,
            a.present.view(torch.uint8), b.present.view(torch.uint8), inv_ysum,
            out,
            r0, r1, c0, c1, max(1, gal_cols), seg_cols, segs, a.feats.shape[1],
            a.feats.stride(0), a.feats.stride(1), b.feats.stride(0), b.feats.stride(1),
            stride_lm, stride_ln, inv_ysum.stride(0) if gals > 1 else 0,
            out.stride(0), out.stride(1), out.stride(2),
            float(eps),
            DENSE=dense, REVERSE=reverse, ONE_K=self._one_k(a.feats), LOOP_FLATTEN=cfg.loop_flatten,
            WARP_SPECIALIZE=cfg.warp_specialize, IS_FP32=a.feats.dtype == torch.float32 or upcast,
            DOT_PRECISION=_dot_precision(a.feats.dtype), UPCAST=upcast,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=self._block_k(a.feats),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        merged = out[:, 0] if segs == 1 else self.merge(out.view(NUM_STATS, segs, gals * n_rows), reverse)
        return merged.view(NUM_STATS, gals, n_rows) if gals > 1 else merged.view(NUM_STATS, n_rows)

    def _one_k(self, feats: torch.Tensor) -> bool:
        """Whether the rows' features over all of D fit on chip beside the pipelined column tiles
        (block_k = 0 asks for it; fp32 inputs and large D fall back to the K loop)."""
        cfg = self.config
        if not (cfg.fused_dot and cfg.block_k == 0):
            return False
        size = 4 if feats.dtype == torch.float32 or interpreting() else feats.element_size()
        d_pad = max(16, triton.next_power_of_2(feats.shape[1]))
        return (cfg.block_m + max(1, cfg.num_stages) * cfg.block_n) * d_pad * size <= ONE_K_SMEM_BYTES

    def _block_k(self, feats: torch.Tensor) -> int:
        """BLOCK_K of the two-pass and grad kernels: all of D (a power of two >= 16) when ONE_K."""
        if self._one_k(feats):
            return max(16, triton.next_power_of_2(feats.shape[1]))
        return self.config.block_k or 64

    def _groups(self, n_rows: int, n_cols: int, n_segments: int, device) -> tuple:
        """(programs per segment, columns per program) for rows x ``n_segments`` segments of
        ``n_cols`` columns (galleries): enough programs to fill the GPU, each looping over
        its share of one segment's column tiles."""
        cfg = self.config
        row_blocks = triton.cdiv(n_rows, cfg.block_m)
        col_tiles = max(1, triton.cdiv(n_cols, cfg.block_n))
        groups = min(col_tiles, triton.cdiv(self._target_programs(device), row_blocks * n_segments))
        group_cols = triton.cdiv(col_tiles, groups) * cfg.block_n
        return max(1, triton.cdiv(n_cols, group_cols)), group_cols

    @staticmethod
    def _target_programs(device: torch.device) -> int:
        """Programs that fill the GPU (two per SM); a few under the interpreter, so tests
        exercise the segment merge."""
        if device.type != "cuda":
            return 4
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())

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

    def grad(self, a, b, labels, scale_t, c0, c1, reverse, eps, lse_a, lse_b, loss_a, loss_b, ga, gb, pa, pb,
             want_dscale):
        cfg = self.config
        grid, args, strides, flags = self._common(a, b, labels, scale_t, c0, c1)
        args = args[:6] + (pa, pb) + args[6:]
        n, w = a.feats.shape[0], c1 - c0
        dev = a.feats.device
        # Galleries (see the module doc): the chunk [c0, c1) touches galleries c0 // gal_cols
        # to (c1 - 1) // gal_cols; each program stays inside one of them.
        gals = a.galleries
        gal_cols = max(1, b.feats.shape[0] // gals)
        touched = (c1 - 1) // gal_cols - c0 // gal_cols + 1
        seg = min(gal_cols, w)
        # ONE_K programs loop over a group of column tiles with the rows' features on chip;
        # the K-loop variants keep one tile per program.
        one_k = self._one_k(a.feats)
        subs, group_cols = (self._groups(n, seg, touched, dev) if one_k
                            else (triton.cdiv(seg, cfg.block_n), cfg.block_n))
        groups = touched * subs
        grid = (grid[0], groups)
        flags["BLOCK_K"] = self._block_k(a.feats)
        gemm = self.gemm_dtype(a.feats.dtype)
        n_parts = 1 if gemm is None else 2
        ws = torch.empty((n, n_parts * w), dtype=gemm or torch.float32, device=dev)
        hi = ws[:, :w]
        lo = ws[:, w:] if n_parts == 2 else hi
        dscale_part = torch.empty((groups, n) if want_dscale else (1, 1), dtype=torch.float32, device=dev)
        # the row side's per-gallery vectors share one layout: [K, n] contiguous (or [n])
        (lse_a_hi, lse_a_lo), (lse_b_hi, lse_b_lo) = lse_a, lse_b
        lse_a_hi, lse_a_lo, loss_a, ga = (x.contiguous() for x in (lse_a_hi, lse_a_lo, loss_a, ga))
        _sdm_tile_grad_kernel[grid](
            *args, lse_a_hi, lse_a_lo, lse_b_hi, lse_b_lo, loss_a, loss_b, ga, gb, hi, lo, dscale_part,
            n, c0, c1, gal_cols, group_cols, subs, a.feats.shape[1], *strides, n if gals > 1 else 0,
            ws.stride(0), ws.stride(1), dscale_part.stride(0),
            float(eps), REVERSE=reverse, ONE_K=one_k, WANT_DSCALE=want_dscale, SPLIT=n_parts == 2,
            **flags)
        return ws, n_parts, (dscale_part.sum(0) if want_dscale else None)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
