"""Which backend runs a call: the one place that decides.

``backend="auto"``: the Triton kernels for CUDA tensors of a dtype they take (fp32, bf16,
fp16) when Triton is importable, the torch backend otherwise (CPU, float64, no Triton).
``"triton"`` asks for the kernels explicitly (CUDA tensors, or CPU ones under the
interpreter, ``TRITON_INTERPRET=1`` set before Triton is imported); ``"torch"`` for plain
PyTorch. Within the Triton backend, `launch.backward_path` picks the fused or the chunked
backward by size.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .options import check_choice

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def _triton_backend():
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


def triton_available() -> bool:
    return not isinstance(_triton_backend(), BaseException)


def check_backend_name(backend) -> None:
    check_choice("backend", backend, BACKENDS)


def resolve_name(backend: str, q: torch.Tensor) -> str:
    """"triton" or "torch": the backend ``pick_backend`` would return (no cached calls: it runs
    while torch.compile traces)."""
    if backend == "torch" or (backend == "auto" and (not q.is_cuda or q.dtype == torch.float64)):
        return "torch"
    if backend == "auto" and not _TRITON_INSTALLED:
        return "torch"
    return "triton"


#: Whether a triton package is installed (found without importing it).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def pick_backend(backend: str, q: torch.Tensor):
    """The backend object (`backend.Backend`) for ``backend`` and features ``q``; raises for a
    backend that cannot take them, naming the way out."""
    check_backend_name(backend)
    if backend == "torch" or (backend == "auto" and (not q.is_cuda or q.dtype == torch.float64)):
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
