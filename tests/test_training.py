"""Training integration: torch.compile without graph breaks, autocast, the custom ops' registration."""

import pytest
import torch

from sdm_triton import reference
import sdm_triton
from sdm_triton import ops
from sdm_triton.options import SDMOptions

CUDA = torch.cuda.is_available()


def _case(n=20, m=24, d=16, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    g = torch.randn(m, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    qi = torch.randint(0, 5, (n,), generator=gen).to(device)
    gi = torch.randint(0, 5, (m,), generator=gen).to(device)
    qm = (torch.rand(n, generator=gen) > 0.2).to(device)
    ls = torch.tensor(10.0, device=device, requires_grad=True)
    return q, g, qi, gi, qm, ls


def _grads(fn, q, g, qi, gi, qm, ls):
    for t in (q, g, ls):
        t.grad = None
    loss = fn(q, g, qi, gi, ls, qm)
    loss.backward()
    return loss.detach(), q.grad.clone(), g.grad.clone(), ls.grad.clone()


def _compiled_equals_eager(backend, device, galleries=False):
    def step(q, g, qi, gi, ls, qm):
        if galleries:   # three galleries against the anchor: g, its reverse, its negation
            gs = [g, g.flip(0), -g]
            return sdm_triton.sdm_loss_multi(q, gs, qi, gi, logit_scale=ls, q_mask=qm, kl="reverse",
                                             backend=backend).sum()
        return sdm_triton.sdm_loss(q, g, qi, gi, logit_scale=ls, q_mask=qm, kl="reverse", backend=backend)

    case = _case(device=device)
    eager = _grads(step, *case)
    torch._dynamo.reset()
    compiled = _grads(torch.compile(step, fullgraph=True), *case)   # fullgraph: a graph break raises
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compile_fullgraph_torch_backend_cpu():
    _compiled_equals_eager("torch", "cpu")


def test_compile_fullgraph_galleries_torch_backend_cpu():
    _compiled_equals_eager("torch", "cpu", galleries=True)


@pytest.mark.gpu
def test_compile_fullgraph_triton_backend_gpu():
    _compiled_equals_eager("triton", "cuda")


@pytest.mark.gpu
def test_compile_fullgraph_galleries_triton_backend_gpu():
    _compiled_equals_eager("triton", "cuda", galleries=True)


def test_custom_ops_pass_opcheck():
    """The torch backend's operators: schema, fake (meta) implementation and autograd
    registration agree with the real op (the Triton backend's are triton_ops, traced by the
    compiler instead; the GPU compile tests run them)."""
    q, g, qi, gi, qm, ls = _case(n=6, m=7, d=5)
    opts = (10.0, SDMOptions().name(), "auto", 1 << 26)
    torch.library.opcheck(ops.sdm_forward_torch_op, (q, g, qi, gi, None, qm, None, None, *opts, 1, True, False))
    torch.library.opcheck(ops.sdm_forward_torch_op, (q, g, qi, gi, None, qm, None, ls, *opts, 1, True, True))
    # two galleries of 7 (sdm_loss_multi): the value is [2]
    g2 = torch.stack([g.detach(), g.detach().flip(0)]).requires_grad_()
    rev = (0.0, SDMOptions(kl="reverse", combine="sum").name(), "auto", 1 << 26)
    torch.library.opcheck(ops.sdm_forward_torch_op, (q, g2, qi, torch.stack([gi, gi]), None, qm, None, ls, *rev, 2,
                                                     False, False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_computes_in_fp32(dtype):
    """Under autocast the loss is still computed in fp32 from the given features: the same
    value as outside autocast on the same (half-valued) inputs, fp32 output, no NaN."""
    q, g, qi, gi, qm, ls = _case(n=24, m=30, d=12, dtype=dtype)
    # features whose fp16 products would underflow / lose the logits if S were computed in half
    with torch.no_grad():
        q.mul_(1e-3)
    plain = sdm_triton.sdm_loss(q, g, qi, gi, temperature=0.005, q_mask=qm)
    with torch.autocast("cpu", dtype=dtype):
        under = sdm_triton.sdm_loss(q, g, qi, gi, temperature=0.005, q_mask=qm)
        ref_under = reference.sdm_loss(q, g, qi, gi, temperature=0.005, q_mask=qm)
    truth = reference.sdm_loss(q.double(), g.double(), qi, gi, temperature=0.005, q_mask=qm)
    assert under.dtype == torch.float32 and ref_under.dtype == torch.float32
    assert torch.isfinite(under)
    assert torch.equal(under, plain)
    assert abs(under.double() - truth) <= 1e-5 * truth.abs()
    assert abs(ref_under.double() - truth) <= 1e-5 * truth.abs()


def test_autocast_fp32_features_from_a_half_model():
    """fp32 features inside an autocast region (a matmul there would run in bf16): unchanged loss."""
    q, g, qi, gi, qm, ls = _case(n=16, m=16, d=32)
    plain = sdm_triton.sdm_loss(q, g, qi, gi, temperature=0.02)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = sdm_triton.sdm_loss(q, g, qi, gi, temperature=0.02)
        under.backward()
    assert torch.equal(under, plain)
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


def test_the_constant_mark_is_torch_compilers():
    """dispatch marks Triton's presence as a constant for torch.compile the way
    torch.compiler.assume_constant_result does, without importing torch._dynamo at import time
    (1 s). If a PyTorch release marks functions differently, this fails."""
    import subprocess
    import sys

    from sdm_triton import dispatch

    def probe():
        return True

    marked = torch.compiler.assume_constant_result(probe)
    added = {k: v for k, v in vars(marked).items()}
    assert added == {"_dynamo_marked_constant": True}, added
    assert dispatch._triton_importable._dynamo_marked_constant is True
    out = subprocess.run([sys.executable, "-c", "import sys, sdm_triton; print('torch._dynamo' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
