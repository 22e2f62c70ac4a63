"""Tests specific to the Triton kernels and their launch layer (the shared properties live in
test_properties.py). Under the CPU interpreter the cases are small; on a GPU (``-m gpu``)
larger shapes, every dtype, 64-bit offsets and the absence of host synchronisation.
"""

import math

import pytest
import torch

from sdm_triton import reference
import sdm_triton
from sdm_triton import launch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Both dot paths: the fused tl.dot variant (default) and the cuBLAS-chunk variant.
VARIANTS = (["default", "twopass_m64n32k0w4s2", "onepass_m128n64w4", "cublas_m64n64w4"] if CUDA
            else ["interpreter", "interpreter_onek", "interpreter_onepass", "interpreter_cublas"])


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _problem(n, m, d, dtype, seed, dense=False, masks=False, device=DEVICE):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n, d, generator=gen) * torch.exp(torch.rand(n, 1, generator=gen) * 4 - 2)
    g = torch.randn(m, d, generator=gen)
    kw = {}
    if dense:
        lab = torch.rand(n, m, generator=gen)
        kw["labels"] = torch.where(lab > 0.8, lab, torch.zeros_like(lab)).to(device)
    else:
        kw["q_ids"] = torch.randint(0, max(1, n // 3), (n,), generator=gen).to(device)
        kw["g_ids"] = torch.randint(0, max(1, m // 3), (m,), generator=gen).to(device)
    if masks:
        kw["q_mask"] = (torch.rand(n, generator=gen) > 0.25).to(device)
        kw["g_mask"] = (torch.rand(m, generator=gen) > 0.25).to(device)
    return q.to(device=device, dtype=dtype), g.to(device=device, dtype=dtype), kw


def _weighted(out, wq, wg):
    return (out.q2g.double() * wq).sum() + (out.g2q.double() * wg).sum()


def _errors_vs_float64(q, g, kw, kl, fn):
    """Relative errors of loss / dq / dg / dscale of ``fn`` against float64 on the same inputs."""
    n, m = q.shape[0], g.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(n * 7 + m)
    wq = torch.rand(n, generator=gen, dtype=torch.float64).to(q.device)
    wg = torch.rand(m, generator=gen, dtype=torch.float64).to(q.device)
    qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()
    ls = torch.tensor(20.0, device=q.device, requires_grad=True)
    tot = _weighted(fn(qa, ga, kl=kl, logit_scale=ls, reduction="none", **kw), wq, wg)
    tot.backward()
    q64, g64 = q.double().requires_grad_(), g.double().requires_grad_()
    ls64 = torch.tensor(20.0, device=q.device, dtype=torch.float64, requires_grad=True)
    kw64 = {k: (v.double() if k == "labels" else v) for k, v in kw.items()}
    ref = _weighted(reference.sdm_loss(q64, g64, kl=kl, logit_scale=ls64, reduction="none", **kw64), wq, wg)
    ref.backward()
    return dict(loss=_rel(tot.detach(), ref.detach()), dq=_rel(qa.grad, q64.grad),
                dg=_rel(ga.grad, g64.grad), ds=_rel(ls.grad, ls64.grad))


def _triton(config):
    def fn(*args, **kwargs):
        return sdm_triton.sdm_loss(*args, backend="triton", tile_config=config, **kwargs)
    return fn


def _torch_same_dtype(*args, **kwargs):
    """PyTorch computing the same formula from inputs in the same dtype (the reference, fp32 math)."""
    return reference.sdm_loss(*args, **kwargs)


SMALL = [(13, 29, 19), (40, 7, 33), (1, 5, 3), (24, 24, 64)]
LARGE = [(300, 457, 512), (1031, 700, 768), (129, 1, 77)]


def _dtypes():
    return [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("dense,masks", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("dtype", _dtypes(), ids=lambda t: str(t).replace("torch.", ""))
def test_kernels_match_float64_no_worse_than_pytorch(variant, kl, dense, masks, dtype):
    """Error vs float64 on the same (half-valued) inputs is at most 4x PyTorch's own error
    computing the same formula from the same dtype, plus a stated slack: fp32 accuracy for the
    loss, and for half-precision gradients 4 units of roundoff of their dtype (SPEC: gradients
    come back in the input dtype, so their error may be that of rounding, times a small factor;
    the kernels round dS and the normalised features to that dtype before the products)."""
    shapes = LARGE if CUDA else SMALL
    for i, (n, m, d) in enumerate(shapes):
        q, g, kw = _problem(n, m, d, dtype, seed=i, dense=dense, masks=masks)
        ours = _errors_vs_float64(q, g, kw, kl, _triton(variant))
        base = _errors_vs_float64(q, g, kw, kl, _torch_same_dtype)
        for key in ours:
            # ds is one scalar summing N*M terms: hold it to fp32 accuracy rather than to
            # PyTorch's (sometimes luckily tiny) error on the same sum.
            slack = 1e-5 if key == "ds" else 2e-6
            if key in ("dq", "dg") and dtype != torch.float32:
                slack = 4 * torch.finfo(dtype).eps / 2
            assert ours[key] <= 4 * base[key] + slack, (n, m, d, key, ours, base)


@pytest.mark.parametrize("variant", VARIANTS[:2])
@pytest.mark.parametrize("d", [4096, 4099])
def test_large_feature_dims(variant, d):
    """D up to (and past) 4096, a power of two and not: the K loop, and the fallback of the
    ONE_K variants when the rows' features would not fit on chip. Same criterion as above."""
    n, m = (300, 200) if CUDA else (5, 7)
    for dtype in (torch.bfloat16, torch.float32):
        q, g, kw = _problem(n, m, d, dtype, seed=d, masks=True)
        ours = _errors_vs_float64(q, g, kw, "reverse", _triton(variant))
        base = _errors_vs_float64(q, g, kw, "reverse", _torch_same_dtype)
        for key in ours:
            slack = 1e-5 if key == "ds" else 2e-6
            if key in ("dq", "dg") and dtype != torch.float32:
                slack = 4 * torch.finfo(dtype).eps / 2
            assert ours[key] <= 4 * base[key] + slack, (n, m, d, dtype, key, ours, base)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_output_element_is_written(variant, monkeypatch):
    """Poison every buffer the launcher allocates with NaN: an element left unwritten by a
    kernel would reach the loss or the gradients."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
        return t

    monkeypatch.setattr(launch.torch, "empty", poisoned_empty)
    for kl in ("forward", "reverse"):
        q, g, kw = _problem(37, 45, 21, torch.float32, seed=3, dense=kl == "reverse", masks=True)
        errs = _errors_vs_float64(q, g, kw, kl, _triton(variant))
        assert all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.parametrize("variant", VARIANTS)
def test_non_contiguous_inputs(variant):
    q_full, g_full, kw = _problem(26, 31, 40, torch.float32, seed=5)
    q = q_full[:, ::2]              # column stride 2
    g = g_full.T.contiguous().T[:, 1::2]   # column-major storage, then strided
    assert not q.is_contiguous() and not g.is_contiguous()
    ours = sdm_triton.sdm_loss(q, g, **kw, backend="triton", tile_config=variant)
    ref = reference.sdm_loss(q.double(), g.double(), **kw)
    assert _rel(ours, ref) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunking_does_not_change_the_result(variant):
    """A workspace small enough to force many column chunks gives the same loss and gradients."""
    q, g, kw = _problem(33, 70, 24, torch.float32, seed=11, masks=True)
    results = []
    for workspace in (1 << 30, 1):          # one chunk vs the smallest chunks the tiles allow
        qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()
        loss = sdm_triton.sdm_loss(qa, ga, **kw, backend="triton", tile_config=variant,
                                   workspace_bytes=workspace, kl="reverse")
        loss.backward()
        results.append((loss.detach(), qa.grad, ga.grad))
    for a, b in zip(*results):
        assert _rel(a, b) < 1e-6


def test_triton_backend_errors():
    q = torch.randn(4, 8, dtype=torch.float64)
    ids = torch.arange(4)
    with pytest.raises(TypeError, match="float64"):
        sdm_triton.sdm_loss(q, q, ids, ids, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        sdm_triton.sdm_loss(q, q, ids, ids, backend="cuda")
    with pytest.raises(ValueError, match="tile config"):
        sdm_triton.sdm_loss(q.float(), q.float(), ids, ids, backend="triton", tile_config="nope")


@pytest.mark.gpu
def test_no_host_synchronisation_in_forward_and_backward():
    q, g, kw = _problem(512, 640, 128, torch.bfloat16, seed=1, masks=True)
    q.requires_grad_()
    g.requires_grad_()
    ls = torch.tensor(30.0, device="cuda", requires_grad=True)
    sdm_triton.sdm_loss(q, g, logit_scale=ls, **kw).backward()   # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = sdm_triton.sdm_loss(q, g, logit_scale=ls, **kw)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_64bit_offsets_beyond_2_pow_31():
    """N * M > 2^31 (and the dS chunk offsets) with the torch backend as the comparison."""
    n = m = 47000                       # 2.2e9 similarity entries
    q, g, kw = _problem(n, m, 32, torch.bfloat16, seed=2)
    losses = []
    for backend in ("triton", "torch"):
        qa = q.clone().requires_grad_()
        loss = sdm_triton.sdm_loss(qa, g, **kw, backend=backend, workspace_bytes=2**30)
        loss.backward()
        losses.append((loss.detach(), qa.grad.float()))
    assert _rel(losses[0][0], losses[1][0]) < 1e-5
    assert _rel(losses[0][1], losses[1][1]) < 2e-2   # bf16 gradients, dS rounded to bf16
