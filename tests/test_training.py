"""Training integration: torch.compile without graph breaks, autocast, the custom ops' registration."""

import contextlib
import logging

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


def _compiled_equals_eager(backend, device, galleries=False, config="auto", workspace_bytes=1 << 26, kl="reverse",
                           **case_kwargs):
    """A compiled step gives eager's loss and gradients; compiling it logs no warning (issue 26:
    torch 2.11 logged 23 tracebacks a compile from its analysis of the kernels). ``galleries``
    True: g, its reverse and its negation as three galleries (the gradients of flip and neg are
    the user's autograd ops, summed in fp32 by a compiled graph: equal in fp32 only); "stacked":
    a [3, M, D] leaf tensor of galleries (the package's gradients alone, any dtype)."""
    def step(q, g, qi, gi, ls, qm):
        kw = dict(logit_scale=ls, q_mask=qm, kl=kl, backend=backend, kernel_config=config,
                  workspace_bytes=workspace_bytes)
        if galleries:
            gs = g if galleries == "stacked" else [g, g.flip(0), -g]
            return sdm_triton.sdm_loss_multi(q, gs, qi, gi, **kw).sum()
        return sdm_triton.sdm_loss(q, g, qi, gi, **kw)

    case = _case(device=device, **case_kwargs)
    if galleries == "stacked":
        q, g, *rest = case
        case = (q, torch.stack([g, g.flip(0), -g]).detach().requires_grad_(), *rest)
    eager = _grads(step, *case)
    torch._dynamo.reset()
    with _warnings_logged() as logged:
        compiled = _grads(torch.compile(step, fullgraph=True), *case)   # fullgraph: a graph break raises
    for a, b in zip(eager, compiled):
        assert _rel(b, a) <= 1e-6, (a, b)
    assert not logged, "\n".join(logged)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def _warnings_logged():
    """The warnings (logging records of torch's loggers at WARNING and above) while the block runs."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(f"{record.name}: {record.getMessage()}")

    handler, logger = Keep(level=logging.WARNING), logging.getLogger("torch")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


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


@pytest.mark.gpu
@pytest.mark.parametrize("galleries", [False, "stacked"])
def test_compile_fullgraph_forward_kl_centroids_gpu(galleries):
    """Forward KL with ids: the positives' terms from identity centroids (torch ops beside the
    kernels, launch/positives.py: issue 27) traced into the compiled graph."""
    _compiled_equals_eager("triton", "cuda", galleries=galleries, kl="forward", config="centroids")


@pytest.mark.gpu
@pytest.mark.parametrize("config,workspace_bytes", [("fused", 1 << 26), ("chunked", 1 << 26), ("chunked", 1)],
                         ids=["fused", "chunked", "chunked-many-chunks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_compile_every_backward_path_gpu(config, workspace_bytes, dtype):
    """Each backward path and chunk layout under torch.compile (issue 26: the chunked backward's
    products crashed Inductor), three galleries so that the chunks also step over galleries."""
    _compiled_equals_eager("triton", "cuda", galleries="stacked", config=config, workspace_bytes=workspace_bytes,
                           n=300, m=333, d=96, dtype=dtype)


@pytest.mark.gpu
def test_compile_with_dynamic_shapes_gpu():
    """A step compiled with symbolic sizes (``dynamic=True``, as torch.compile recompiles a
    training loop whose last batch is smaller) gives eager's numbers at two batch sizes: the
    launch layer keeps per-shape values across calls (launch/tiles.py `_per_shape`) but never
    those of a trace, whose sizes may be symbols."""
    def step(q, g, qi, gi, ls, qm):
        return sdm_triton.sdm_loss(q, g, qi, gi, logit_scale=ls, q_mask=qm, kl="reverse", backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for n, m in ((96, 80), (64, 72)):
        case = _case(device="cuda", n=n, m=m)
        eager = _grads(step, *case)
        for a, b in zip(eager, _grads(compiled, *case)):
            assert _rel(b, a) <= 1e-6, (n, m, a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 8192])
def test_compile_large_batches_gpu(n):
    """A CLIP-scale bf16 step under torch.compile, where the default backward is the chunked one."""
    _compiled_equals_eager("triton", "cuda", n=n, m=n, d=512, dtype=torch.bfloat16)


def test_the_chunked_backward_products_compile():
    """The chunked backward's products as it runs them while torch.compile traces
    (`matmul.traced_products`): compiled, they give eager's numbers, for bf16 operands and an fp32
    accumulator over several chunks. (CI has no GPU, and the Triton backend's launches cannot be
    traced under the interpreter: this is the part of the traced backward that runs on the CPU.)"""
    from sdm_triton import matmul

    mm_f32, addmm_f32 = matmul.traced_products()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=gen).bfloat16()
    x = torch.randn(40, 16, generator=gen).bfloat16()
    y = torch.randn(24, 16, generator=gen).bfloat16()

    def products(w, x, y):
        acc = torch.zeros(24, 16)
        for c0 in range(0, 40, 16):                # three chunks of columns, the last one short
            addmm_f32(acc, w[:, c0:c0 + 16], x[c0:c0 + 16])
        return acc, mm_f32(w.T, y)

    eager = products(w, x, y)
    torch._dynamo.reset()
    compiled = torch.compile(products, fullgraph=True)(w, x, y)
    exact = (w.double() @ x.double(), w.double().T @ y.double())
    for a, b, e in zip(eager, compiled, exact):
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b)
        assert _rel(a, e) < 1e-6
    torch.library.opcheck(mm_f32, (w.T, y))
    torch.library.opcheck(addmm_f32, (torch.zeros(24, 16), w, x))


@pytest.mark.parametrize("entry", ["sdm_loss", "sdm_loss_multi", "SDMLoss"])
def test_check_values_under_compile_checks_or_refuses(entry):
    """check_values=True under torch.compile (issue 26.4: it was skipped, a NaN feature passed
    unchecked): compiled without fullgraph the check runs at a graph break and raises eager's
    ValueError, good values give eager's loss; with fullgraph=True tracing refuses the call,
    naming check_values (the torch backend: the Triton one cannot be compiled on the CPU; the
    check sits before the backend's operator, the same for both)."""
    q, g, qi, gi, qm, ls = _case(n=6, m=7, d=5)
    q, g = q.detach(), g.detach()
    module = sdm_triton.SDMLoss(backend="torch", check_values=True)

    def step(q, g):
        if entry == "sdm_loss":
            return sdm_triton.sdm_loss(q, g, qi, gi, q_mask=qm, backend="torch", check_values=True)
        if entry == "SDMLoss":
            return module(q, g, qi, gi, q_mask=qm)
        return sdm_triton.sdm_loss_multi(q, [g, g.flip(0)], qi, gi, q_mask=qm, backend="torch",
                                         check_values=True).sum()

    bad = q.clone()
    bad[int(qm.nonzero()[0])] = float("nan")        # a present row
    torch._dynamo.reset()
    compiled = torch.compile(step)
    with pytest.raises(ValueError, match="q contains NaN or Inf in a present row"):
        compiled(bad, g)
    assert torch.equal(compiled(q, g), step(q, g))
    absent = q.clone()
    absent[int((~qm).nonzero()[0])] = float("nan")  # an absent row may hold anything
    assert torch.equal(compiled(absent, g), step(q, g))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="check_values=True") as err:
        torch.compile(step, fullgraph=True)(q, g)
    assert "fullgraph=True" in str(err.value) and "check_finite" in str(err.value)


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


_CONSTANT_UNDER_COMPILE = '''
import sys, torch, sdm_triton
from sdm_triton import dispatch
print("dynamo at import:", "torch._dynamo" in sys.modules)

def step(x):
    from sdm_triton import ops   # as sdm_loss does while compiling, before it resolves the backend
    return x + 1 if dispatch._triton_importable() else x - 1

before = dispatch._triton_backend.cache_info()
torch.compile(step, fullgraph=True, backend="eager")(torch.zeros(2))
after = dispatch._triton_backend.cache_info()
print("called:", after.hits + after.misses - before.hits - before.misses)
'''


def test_triton_presence_is_a_constant_under_compile_without_importing_dynamo():
    """Triton's presence is a constant while torch.compile traces the backend's choice: the
    compiler calls the test (its cache counts the call) instead of tracing it (through the
    lru_cache, past it), and ``import sdm_triton`` leaves torch._dynamo unimported (1 s)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CONSTANT_UNDER_COMPILE], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.splitlines() == ["dynamo at import: False", "called: 1"], out.stdout + out.stderr[-3000:]


@pytest.mark.parametrize("config", ["chunked", "chunked_centroids"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_the_traced_launches_compute_what_eager_launches_do(dtype, config):
    """The chunked backward with the launch layer in its traced mode (as inside the compiled
    operators: the products through `matmul.traced_products`) gives eager's numbers; several
    column chunks; the centroids path's kernels too. On the CPU the kernels themselves still
    run interpreted."""
    from sdm_triton import launch

    case = _case(n=20, m=37, d=24, dtype=dtype, device="cuda" if CUDA else "cpu")

    def step(q, g, qi, gi, ls, qm):
        return sdm_triton.sdm_loss(q, g, qi, gi, logit_scale=ls, q_mask=qm, backend="triton",
                                   kernel_config=config, workspace_bytes=1)

    eager = _grads(step, *case)
    with launch.traceable_launches():
        traced = _grads(step, *case)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)
