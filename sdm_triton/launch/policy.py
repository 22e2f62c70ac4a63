"""The Triton backend's choices by size, in one place: the backward path, the tile shape of every
launch, and the forward's column segments (issue 22; moved here from dispatch.py, issue 29).
The rest of `sdm_triton.launch` looks them up; `KernelConfig` fields a caller gives win over
the tiles (launch/tiles.py merges them). The chunked backward's column chunks follow the
caller's workspace bound (``workspace_bytes``), not the size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from ..kernels.tiles import INTERPRETED


def interpreting() -> bool:
    """Whether Triton's CPU interpreter runs the kernels (``TRITON_INTERPRET=1``, read once where
    the kernels are decorated, as Triton reads it): then the small tiles of the "interpreter"
    size class."""
    return INTERPRETED.value


#: The fused backward keeps u [BLOCK_M, D] in registers: used up to this padded D.
FUSED_MAX_D = 512
#: ... and while the problem is small: the fused kernel runs each side's rows against all
#: columns with small tiles; above this many logits (N * K * M) the chunked path is faster.
FUSED_MAX_LOGITS = 2**23
#: Logits (N * K * M) from which a problem is "medium", and "large" (the statistics pass's
#: tiles grow with the problem: bench/NOTES.md).
MEDIUM_LOGITS = 2**20
LARGE_LOGITS = 2**24
#: Logits (N * K * M) from which "auto" takes the centroids (`positives_path`): N = M = 16384.
#: H100, bf16, D = 512, pk4 ids, forward KL (bench/NOTES.md 39): at 32768 the forward takes
#: 6.9 ms against the loop's 16.1 (fwd + bwd 30.2 against 39.8); at 16384 2.41 against 4.09
#: (fwd + bwd 9.11 against 8.88, though the GPU's own time is 7.1 against 8.8 ms a step); at
#: 8192 2.31 against 1.03: there the centroids' ~25 small operations (sorts, searches, the
#: counts) cost more host time than the loop's label terms cost the GPU.
CENTROIDS_LOGITS = 2**28
#: Padded D from which the fused backward is "wide" (a smaller row block: u [BLOCK_M, D] in registers).
WIDE_D = 256


def logits(p) -> int:
    """N * K * M: the size every choice below is made by."""
    return p.n * p.galleries * p.m


def padded_d(d: int) -> int:
    """D padded to a power of two, at least 16: the fused backward's BLOCK_D (a row block's
    gradient over all of D), and the bound of the preparation pass's feature step."""
    return max(16, 1 << (d - 1).bit_length())


def backward_path(p) -> str:
    """"fused" or "chunked" (sdm_triton/launch/backward.py): the caller's
    KernelConfig.backward, else by size. The fused kernel keeps a row block's gradient over
    all of D on chip, so above FUSED_MAX_D it hands over to the chunked one whatever was
    asked (at D = 4096 it would need 256 KiB of shared memory, more than a Hopper SM has)."""
    if padded_d(p.d) > FUSED_MAX_D:
        return "chunked"
    if p.config.backward != "auto":
        return p.config.backward
    return "fused" if logits(p) <= FUSED_MAX_LOGITS else "chunked"


#: Logits (N * K * M) up to which "auto" takes the single-launch forward on a GPU, by dtype.
#: H100, D = 512, fwd + bwd ms, staged / single (bench/NOTES.md 42): bf16 forward KL N = 64 0.629
#: / 0.327, 256 0.574 / 0.429, 1024 0.393 / 0.327; fp32 reverse KL N = 64 0.465 / 0.275, 256
#: 0.412 / 0.485, 512 0.583 / 0.921, 1024 1.11 / 1.79 (fp32's exact dots make the single launch's
#: few programs GPU-bound from N = 256 on).
SINGLE_MAX_LOGITS = {"half": 2**20, "fp32": 2**14}


def forward_path(p) -> str:
    """"staged" or "single" (sdm_triton/launch/forward.py): the caller's KernelConfig.forward,
    else by size on a GPU (`SINGLE_MAX_LOGITS`); staged under the interpreter (whose tests of
    the single launch name it), where the identity centroids are taken (the single launch sums
    the positives' terms in its loop, `positives_path` "tiles"), and where the caller fixes the
    column segments (only the staged statistics pass has them)."""
    if p.config.forward == "staged" or positives_path(p) != "tiles":
        return "staged"
    if p.config.forward == "single":
        return "single"
    if interpreting() or p.config.segments is not None:
        return "staged"
    limit = SINGLE_MAX_LOGITS["fp32" if p.q.dtype == torch.float32 else "half"]
    return "single" if logits(p) <= limit else "staged"


def positives_path(p) -> str:
    """How the statistics pass gets the positives' terms of identity labels: "centroids" (the
    loop sums no label terms: counts and forward KL's logit sums come from identity centroids,
    launch/positives.py: issue 27) or "tiles" (compared and summed inside the N x M loop).
    On the centroids path the negatives' softmax mass (reverse KL's loss, ``return_stats``)
    stays a compare inside the loop, of int32 ranks (`positives.ranks`), as do the chunked
    backward's labels; KernelConfig.positives forces either (dense labels always take the
    tiles). "auto" takes the centroids from CENTROIDS_LOGITS on."""
    if p.dense:
        return "tiles"
    if p.config.positives != "auto":
        return p.config.positives
    return "centroids" if logits(p) >= CENTROIDS_LOGITS else "tiles"


def w_dtype_path(p) -> str:
    """How the backward's products hold W = dS p_i p_j / gmax (kernels/grad.py): "fp32" for fp32
    inputs (one fp32 product, whatever KernelConfig.w_dtype says); for bf16 / fp16 inputs
    "split" (hi + lo halves of the input dtype, two products per side: ~16 bits of W) or "fp16"
    (W rounded once to fp16 and the operands in fp16: one product per side, issue 27).
    KernelConfig.w_dtype forces either; "auto" is "split" until a GPU bench shows fp16 W
    within the SPEC's allowance (4x the gradient's own rounding up to positive cosines of 0.99,
    no worse than the compiled formula beyond: ../shared/yardsticks/w_rounding.py emulates it)
    and faster. (Rows not normalised: fp16 W's scale carries their norms' bound,
    kernels/grad.py's `scale_product_bound`, for fp16 inputs' hi + lo and fp16 W alike.)"""
    if p.q.dtype == torch.float32:
        return "fp32"
    return "fp16" if p.config.w_dtype == "fp16" else "split"


@dataclasses.dataclass(frozen=True)
class Tiles:
    """A launch's tile shape: a program's rows (block_m) and columns (block_n), its step along
    the features (block_k), and the compiler's warps and pipeline stages. None: not this
    pass's to choose (the backwards rebuild S with the statistics pass's block_k, step for
    step: KernelConfig has no bwd_block_k; Triton's default warps)."""
    block_m: Optional[int]
    block_n: Optional[int]
    block_k: Optional[int]
    num_warps: Optional[int]
    num_stages: Optional[int]


#: The tile table: (pass, size class, dtype) -> Tiles, every launch's tile shape in one place.
#:
#: pass: "stats" (the forward's statistics), "prep" (the preparation pass: the statistics
#: pass's block_m / block_n and a block_k no larger than padded_d, its own warps), "fused" and
#: "chunked" (the backwards' main kernels), "max_weight" (the fused backward's fp16 scale:
#: every row's weight, block_m at a time, in each program), "finish" and "weights" (one row
#: per lane, block_m rows at a time), "operand" (the chunked backward's operand and
#: input-gradient kernels: block_m rows, block_k features at a time), "centroids" (the identity
#: centroids' sums and the rows' dots with them: the same), "ranks" (each id's rank, one id per
#: lane, block_m at a time).
#: size class (`size_class`): "interpreter" under the CPU interpreter, whatever the size;
#: otherwise "small" / "medium" / "large" by logits (MEDIUM_LOGITS, LARGE_LOGITS) for
#: "stats" and "chunked", "narrow" / "wide" by padded D (WIDE_D) for "fused", "any" for the
#: passes whose tiles do not depend on the size.
#: dtype: "half" (bf16, fp16) or "fp32" where they differ, else "any".
#: Measured on an H200 (bench/NOTES.md) where a comment says so.
TILES = {
    # pass       size class      dtype        block_m block_n block_k warps stages
    ("stats", "interpreter", "any"): Tiles(16, 16, 16, 1, 1),
    ("stats", "small", "any"): Tiles(32, 32, 64, 4, 2),
    ("stats", "medium", "any"): Tiles(64, 64, 64, 4, 3),
    # H200, bf16, N = 16384 / 32768: 1.36x / 1.49x faster than 128 x 128 (bench/NOTES.md 20)
    ("stats", "large", "half"): Tiles(128, 256, 64, 8, 3),
    # fp32 at 128 x 256: 196 KiB of shared memory, unmeasured
    ("stats", "large", "fp32"): Tiles(128, 128, 64, 8, 3),
    # the statistics pass with the label terms in its loop (dense labels; identity labels on the
    # "tiles" positives path), large half problems: 128 x 256 spills 2.7 KB of registers there
    # (compile_check, Triton 3.6, sm_90) and 128 x 64 none; H100, bf16, N = 32768, identity
    # labels: 16.2 / 17.5 ms against 24.2 / 35.3 (forward / reverse KL, bench/NOTES.md 38).
    # Every other class: the "stats" entry.
    ("stats_labels", "large", "half"): Tiles(128, 64, 64, 8, 3),
    ("prep", "interpreter", "any"): Tiles(None, None, None, 4, None),
    ("prep", "any", "any"): Tiles(None, None, None, 4, None),
    ("fused", "interpreter", "any"): Tiles(16, 16, None, 1, 1),
    ("fused", "narrow", "any"): Tiles(32, 32, None, 4, 1),
    ("fused", "wide", "any"): Tiles(16, 32, None, 4, 1),
    ("max_weight", "interpreter", "any"): Tiles(256, None, None, None, None),
    ("max_weight", "any", "any"): Tiles(256, None, None, None, None),
    ("chunked", "interpreter", "any"): Tiles(16, 16, None, 1, 1),
    ("chunked", "small", "any"): Tiles(128, 64, None, 8, 3),
    ("chunked", "medium", "any"): Tiles(128, 64, None, 8, 3),
    # H100, bf16, N = 16384 / 32768, W kernel ms per step (tools/w_tiles_sweep.py, bench/NOTES.md 40):
    # split 1.88 / 8.71 and fp16 W 1.55 / 7.13 against 2.55 / 12.81 and 2.26 / 10.50 at
    # 128 x 64 w8 s3; 64 x 256 w8 s3 ties, 128 x 128 spills (w8) or worse (w4), gradients bit-identical.
    # fp32 keeps 128 x 64 (unmeasured: four stages of fp32 64 x 128 operands take 192 KiB of shared memory)
    ("chunked", "large", "half"): Tiles(64, 128, None, 4, 4),
    ("chunked", "large", "any"): Tiles(128, 64, None, 8, 3),
    ("finish", "interpreter", "any"): Tiles(16, None, None, 4, None),
    ("finish", "any", "any"): Tiles(1024, None, None, 4, None),
    ("weights", "interpreter", "any"): Tiles(16, None, None, None, None),
    ("weights", "any", "any"): Tiles(1024, None, None, None, None),
    ("operand", "interpreter", "any"): Tiles(16, None, 16, 4, None),
    ("operand", "any", "any"): Tiles(32, None, 128, 4, None),
    # float64 sums and dots of rows (kernels/centroids.py): unmeasured
    ("centroids", "interpreter", "any"): Tiles(16, None, 16, 4, None),
    ("centroids", "any", "any"): Tiles(32, None, 64, 4, None),
    ("ranks", "interpreter", "any"): Tiles(16, None, None, None, None),
    ("ranks", "any", "any"): Tiles(1024, None, None, None, None),
}


def size_class(kind: str, p=None) -> str:
    """The size class of problem ``p`` for pass ``kind`` (`TILES`)."""
    if interpreting():
        return "interpreter"
    if kind == "fused":
        return "wide" if padded_d(p.d) >= WIDE_D else "narrow"
    if kind in ("stats", "stats_labels", "chunked"):
        n = logits(p)
        return "large" if n >= LARGE_LOGITS else "medium" if n >= MEDIUM_LOGITS else "small"
    return "any"


#: A pass whose table entries cover only some size classes and dtypes, and the pass whose entry
#: stands in for the rest.
TILES_FALLBACK = {"stats_labels": "stats"}


def table_tiles(kind: str, p=None) -> Tiles:
    """`TILES`' entry for pass ``kind`` of problem ``p`` (None for the passes of size class
    "any"), its dtype's entry before the "any" one, then the `TILES_FALLBACK` pass's."""
    size = size_class(kind, p)
    dtype = None if p is None else "fp32" if p.q.dtype == torch.float32 else "half"
    while True:
        for key in ((kind, size, dtype), (kind, size, "any")):
            if key in TILES:
                return TILES[key]
        kind = TILES_FALLBACK[kind]


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs that fill the GPU (two per SM); a handful under the interpreter, so that small
    test cases still cut their columns into segments."""
    if device.type != "cuda":
        return 4
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def column_segments(p, row_programs: int, block_n: int) -> int:
    """How many column segments the statistics pass cuts each side into: enough programs to fill
    the GPU with ``row_programs`` row blocks, each segment at least one column tile of
    ``block_n`` (``KernelConfig.segments`` fixes their number; 1 gives exactly one segment per
    side)."""
    wanted = p.config.segments or -(-_target_programs(p.q.device) // row_programs)
    return max(1, min(wanted, -(-max(p.n, p.m) // block_n)))
