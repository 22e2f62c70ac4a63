"""The Triton backend: tile shapes, grids and allocations around the kernels of `kernels/`,
one module per role as there:

    tiles.py     what every launch shares: tile shapes (`_stats_tiles`, `_fused_tiles`,
                 `_chunk_tiles`), index dtypes, the problem's tensors as the kernels name
                 them (`_side_args`), eager or traced launches (`traceable_launches`), and the
                 two caches: `_per_problem` (one call's forward and backward) and `_per_shape`
                 (what the shapes alone decide, kept across calls by the problem's signature).
    forward.py   "staged": prep (norms, label masses) -> stats (online softmax statistics, both
                 directions, column segments when the row blocks alone would leave the GPU
                 idle) -> finish (merge, per-row losses, reduction): 3 launches; "single": all
                 of it in one launch (kernels/single.py); `forward_path` picks one.
    backward.py  "fused": 1 launch (u accumulated in registers over all of D; small problems),
                 "chunked": weights, operands, then per column chunk a W kernel, cuBLAS products
                 and the input-gradient kernel (large problems; workspace bounded by
                 ``workspace_bytes``); `backward_path` picks one.

    policy.py    what is chosen by size: the forward and backward paths (`forward_path`,
                 `backward_path`), every tile shape
                 (``TILES``), the forward's column segments; `KernelConfig` fields given by the
                 caller win over its tiles.
"""

from __future__ import annotations

import torch

from ..problem import Problem
from . import backward as _backward
from . import forward as _forward
from .policy import backward_path, forward_path, interpreting, w_dtype_path
from .tiles import _stats_tiles, traceable_launches


class TritonBackend:
    """`backend.Backend` with the Triton kernels (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""

    name = "triton"

    @staticmethod
    def check_supported(q: torch.Tensor) -> None:
        if q.dtype == torch.float64:
            raise TypeError("backend='triton' supports float32, bfloat16 and float16 features; "
                            "use backend='torch' (or 'auto') for float64")
        if q.device.type != "cuda" and not interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (got {q.device}); use backend='torch' "
                             "on CPU, or set TRITON_INTERPRET=1 before importing triton to interpret the kernels")

    # ----------------------------------------------------------------------------- forward (forward.py)
    #: prepare() needs no label masses for identity labels: the statistics pass counts the positives
    needs_id_masses = False

    forward = staticmethod(_forward.forward)      # one launch, or prepare -> statistics -> finish; one allocation

    prepare = staticmethod(_forward.prepare)
    statistics = staticmethod(_forward.statistics)
    finish = staticmethod(_forward.finish)

    # ----------------------------------------------------------------------------- per-row state
    row_state = staticmethod(_forward.row_state)
    state_from_rows = staticmethod(_forward.state_from_rows)

    # ----------------------------------------------------------------------------- backward (backward.py)
    backward = staticmethod(_backward.backward)


def describe_path(p: Problem) -> str:
    """Which kernels a call runs, for benchmark notes (W: the backward products' form,
    `policy.w_dtype_path`)."""
    t = _stats_tiles(p)
    return (f"triton: forward {forward_path(p)}, stats m{t.block_m}n{t.block_n}k{t.block_k}w{t.num_warps}"
            f"s{t.num_stages}, backward {backward_path(p)}, W {w_dtype_path(p)}")


__all__ = ["TritonBackend", "describe_path", "traceable_launches"]
