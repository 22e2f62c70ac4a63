"""Which backend runs a call: the one place that decides.

``backend="auto"``: the Triton kernels for CUDA tensors of a dtype they take (fp32, bf16,
fp16) when Triton is importable, the torch backend otherwise (CPU, float64, no Triton).
``"triton"`` asks for the kernels explicitly (CUDA tensors, or CPU ones under the
interpreter, ``TRITON_INTERPRET=1`` set before Triton is imported); ``"torch"`` for plain
PyTorch. Only the backend is chosen here: within the Triton backend, the choices by size
(backward path, tile shapes, column segments) are `sdm_triton.launch.policy`'s.
"""

from __future__ import annotations

import functools

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
    """`_triton_backend`'s test. While torch.compile traces `resolve_name`, a constant (called,
    not traced): ops.py, which only a compiling call imports (before it resolves the name),
    marks it with torch.compiler.assume_constant_result. That call imports torch._dynamo:
    here it would make ``import sdm_triton`` take 1 s instead of 0.02 s (CPU, torch 2.13)."""
    return not isinstance(_triton_backend(), BaseException)


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
