"""Which backend runs a call: the one place that decides.

``backend="auto"``: the Triton kernels for CUDA tensors of a dtype they take (fp32, bf16,
fp16) when Triton is importable, the torch backend otherwise (CPU, float64, no Triton).
``"triton"`` asks for the kernels explicitly (CUDA tensors, or CPU ones under the
interpreter, ``TRITON_INTERPRET=1`` set before Triton is imported); ``"torch"`` for plain
PyTorch. Within the Triton backend, every choice made by size is here too (end of this
module): `backward_path` picks the fused or the chunked backward, and `TILES` holds the tile
shape of every launch; `sdm_triton.launch` looks them up and decides nothing by size itself.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch

from .options import check_choice

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def _triton_backend():
    """The Triton backend, or the ImportError that importing triton raised: the one test of
    Triton's presence (importable, not merely installed), tried once."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return exc
    from .launch import TritonBackend
    return TritonBackend()


@functools.lru_cache(maxsize=None)
def _torch_backend():
    from .torch_backend import TorchBackend
    return TorchBackend()


def _triton_importable() -> bool:
    """`_triton_backend`'s test as a constant while torch.compile traces (called, not traced)."""
    return not isinstance(_triton_backend(), BaseException)


# torch.compiler.assume_constant_result's mark, set without its call: the call imports
# torch._dynamo, which made `import sdm_triton` take 1 s instead of 0.02 s (CPU, torch 2.13).
# tests/test_training.py checks that the decorator still sets exactly this mark.
_triton_importable._dynamo_marked_constant = True


def check_backend_name(backend) -> None:
    check_choice("backend", backend, BACKENDS)


def _wants_torch(backend: str, q: torch.Tensor) -> bool:
    return backend == "torch" or (backend == "auto" and (not q.is_cuda or q.dtype == torch.float64))


def resolve_name(backend: str, q: torch.Tensor) -> str:
    """"triton" or "torch": the backend ``pick_backend`` would return (it runs while
    torch.compile traces: Triton's presence is the same test, taken as a constant)."""
    if _wants_torch(backend, q) or (backend == "auto" and not _triton_importable()):
        return "torch"
    return "triton"


def pick_backend(backend: str, q: torch.Tensor):
    """The backend object (`backend.Backend`) for ``backend`` and features ``q``; raises for a
    backend that cannot take them, naming the way out."""
    check_backend_name(backend)
    if _wants_torch(backend, q):
        return _torch_backend()
    tb = _triton_backend()
    if isinstance(tb, BaseException):
        if backend == "auto":
            return _torch_backend()
        raise ModuleNotFoundError(
            f"backend='triton' needs the triton package, which is not importable ({tb}); install it "
            "(pip install triton, Linux only) or use backend='torch' (or 'auto')") from tb
    tb.check_supported(q)
    return tb


# ---------------------------------------------------------------------------------------------
# Within the Triton backend: the backward path and the tile shapes, by size (issue 22). The
# launch layer (sdm_triton/launch/) reads them here; KernelConfig fields a caller gives win
# over the tiles (launch/tiles.py merges them).

#: Read once, as Triton reads it when the kernels are decorated (an import-time choice): the
#: CPU interpreter runs the kernels, with the small tiles of the "interpreter" size class.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    return _INTERPRETING


#: The fused backward keeps u [BLOCK_M, D] in registers: used up to this padded D.
FUSED_MAX_D = 512
#: ... and while the problem is small: the fused kernel runs each side's rows against all
#: columns with small tiles; above this many logits (N * K * M) the chunked path is faster.
FUSED_MAX_LOGITS = 2**23
#: Logits (N * K * M) from which a problem is "medium", and "large" (the statistics pass's
#: tiles grow with the problem: bench/NOTES.md).
MEDIUM_LOGITS = 2**20
LARGE_LOGITS = 2**24
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
#: pass: "stats" (the forward's statistics; the preparation pass takes its block_m / block_n
#: and a block_k no larger than padded_d), "fused" and "chunked" (the backwards' main
#: kernels), "finish" and "weights" (one row per lane, block_m rows at a time), "operand"
#: (the chunked backward's operand and input-gradient kernels: block_m rows, block_k features
#: at a time).
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
    ("fused", "interpreter", "any"): Tiles(16, 16, None, 1, 1),
    ("fused", "narrow", "any"): Tiles(32, 32, None, 4, 1),
    ("fused", "wide", "any"): Tiles(16, 32, None, 4, 1),
    ("chunked", "interpreter", "any"): Tiles(16, 16, None, 1, 1),
    ("chunked", "small", "any"): Tiles(128, 64, None, 8, 3),
    ("chunked", "medium", "any"): Tiles(128, 64, None, 8, 3),
    ("chunked", "large", "any"): Tiles(128, 64, None, 8, 3),
    ("finish", "interpreter", "any"): Tiles(16, None, None, 4, None),
    ("finish", "any", "any"): Tiles(1024, None, None, 4, None),
    ("weights", "interpreter", "any"): Tiles(16, None, None, None, None),
    ("weights", "any", "any"): Tiles(1024, None, None, None, None),
    ("operand", "interpreter", "any"): Tiles(16, None, 16, 4, None),
    ("operand", "any", "any"): Tiles(32, None, 128, 4, None),
}


def size_class(kind: str, p=None) -> str:
    """The size class of problem ``p`` for pass ``kind`` (`TILES`)."""
    if interpreting():
        return "interpreter"
    if kind == "fused":
        return "wide" if padded_d(p.d) >= WIDE_D else "narrow"
    if kind in ("stats", "chunked"):
        n = logits(p)
        return "large" if n >= LARGE_LOGITS else "medium" if n >= MEDIUM_LOGITS else "small"
    return "any"


def table_tiles(kind: str, p=None) -> Tiles:
    """`TILES`' entry for pass ``kind`` of problem ``p`` (None for the passes of size class
    "any"), its dtype's entry before the "any" one."""
    size = size_class(kind, p)
    if p is not None:
        tiles = TILES.get((kind, size, "fp32" if p.q.dtype == torch.float32 else "half"))
        if tiles is not None:
            return tiles
    return TILES[(kind, size, "any")]
