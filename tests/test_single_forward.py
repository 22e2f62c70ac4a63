"""The forward in one launch (kernels/single.py, ``KernelConfig.forward="single"``, issue 28).

It must be the staged forward (prep -> statistics -> finish) in one launch: the same per-row
losses, validity, saved state and prepared buffer (the backward reads those, so the gradients
agree), the value and the reduction up to the order in which the rows' losses are summed, and
its ticket counter back at 0 after every launch. Under the interpreter every buffer is compared
bit for bit against the staged forward with one column segment (the same per-row math); on a
GPU to a tolerance, since the two paths are different kernels."""

from __future__ import annotations

import itertools

import pytest
import torch

import sdm_triton
from sdm_triton import reference
from sdm_triton.launch import forward as launch_forward

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
#: (N, M): odd sizes, one row block and several (the interpreter's blocks are 16 rows)
SIZES = [(5, 7), (16, 16), (37, 33)] if not CUDA else [(5, 7), (64, 64), (200, 131), (1000, 1024)]


def _inputs(n, m, labels, masks, seed, dtype=torch.float32, k=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 24, generator=gen)
    g = torch.randn(*((k,) if k else ()), m, 24, generator=gen)
    kw = {}
    if labels == "ids":
        kw["q_ids"] = torch.randint(0, 5, (n,), generator=gen)
        kw["g_ids"] = torch.randint(0, 5, (*((k,) if k else ()), m), generator=gen)
    else:
        kw["labels"] = (torch.rand(n, m, generator=gen) < 0.3).float() * torch.rand(n, m, generator=gen)
    if masks:
        kw["q_mask"] = torch.rand(n, generator=gen) < 0.8
        kw["g_mask"] = torch.rand(m, generator=gen) < 0.8
    kw = {key: v.to(DEV) for key, v in kw.items()}
    return q.to(DEV, dtype), g.to(DEV, dtype), kw


def _run(config, q, g, kw, multi=False, **options):
    """(value, row losses of both directions, dq, dg, stats) of one forward + backward."""
    q, g = q.clone().requires_grad_(), g.clone().requires_grad_()
    fn = sdm_triton.sdm_loss_multi if multi else sdm_triton.sdm_loss
    value, stats = fn(q, g, backend="triton", kernel_config=config, return_stats=True, **kw, **options)
    rows = fn(q.detach(), g.detach(), backend="triton", kernel_config=config, **kw,
              **dict(options, reduction="none"))
    (value * torch.arange(1, value.numel() + 1, device=DEV).view_as(value)).sum().backward()
    rows = torch.cat([x.flatten() for x in (rows.q2g, rows.g2q) if x is not None])
    return value.detach(), rows, q.grad, g.grad, stats


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _assert_agree(single, staged, exact):
    value, rows, dq, dg, stats = single
    value_s, rows_s, dq_s, dg_s, stats_s = staged
    # the value sums the rows' losses in another order (per program, then the programs)
    assert _rel(value, value_s) < 1e-6
    for name, a, b in (("rows", rows, rows_s), ("dq", dq, dq_s), ("dg", dg, dg_s)):
        if exact:
            assert torch.equal(a, b), (name, _rel(a, b))
        else:   # two kernels: a half gradient may round the other way (one unit of its last place)
            assert _rel(a, b) < max(1e-5, 2 * torch.finfo(a.dtype).eps), (name, _rel(a, b))
    for field in ("valid_q2g", "valid_g2q", "q_norm_max", "g_norm_max"):
        assert torch.equal(getattr(stats, field), getattr(stats_s, field)), field
    for field in ("pos_prob_q2g", "pos_prob_g2q", "q_norm_mean", "g_norm_mean"):
        assert _rel(getattr(stats, field), getattr(stats_s, field)) < 1e-6, field


def _tickets_at_zero():
    return all(int(c) == 0 for c in launch_forward._TICKETS.values())


@pytest.mark.parametrize("n, m", SIZES)
@pytest.mark.parametrize("kl, labels, masks", [("forward", "ids", False), ("reverse", "ids", True),
                                               ("forward", "dense", True), ("reverse", "dense", False)])
def test_the_single_forward_is_the_staged_one(n, m, kl, labels, masks):
    q, g, kw = _inputs(n, m, labels, masks, seed=n * 31 + m)
    single = _run("single", q, g, kw, kl=kl, logit_scale=20.0)
    staged = _run("staged_seg1", q, g, kw, kl=kl, logit_scale=20.0)
    _assert_agree(single, staged, exact=not CUDA)
    assert _tickets_at_zero()
    ref = reference.sdm_loss(q.double(), g.double(), kl=kl, logit_scale=20.0, **kw)
    assert abs(single[0].double() - ref).item() <= 1e-5 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize("k, dtype, options", [
    (3, torch.float32, dict(kl="reverse", combine="sum")),
    (2, torch.bfloat16, dict(direction="g2q", reduction="sum")),
    (1, torch.float16, dict(direction="q2g", normalize=False, temperature=0.5)),
])
def test_the_single_forward_of_several_galleries_and_options(k, dtype, options):
    q, g, kw = _inputs(21, 18, "ids", True, seed=k, dtype=dtype, k=k)
    kw.pop("g_mask")                  # a [M] mask shared by the galleries, and [K, M] ids
    kw["g_mask"] = (torch.arange(18, device=DEV) % 5) != 3
    single = _run("single", q, g, kw, multi=True, **options)
    staged = _run("staged_seg1", q, g, kw, multi=True, **options)
    _assert_agree(single, staged, exact=not CUDA)
    assert _tickets_at_zero()


def test_the_single_forward_leaves_the_ticket_at_zero_call_after_call():
    """The last program of a launch sets the counter back: a second call (and one of another
    shape) finds it at 0, and its value is right."""
    q, g, kw = _inputs(37, 33, "ids", False, seed=5)
    first = _run("single", q, g, kw)[0]
    again = _run("single", q, g, kw)[0]
    assert torch.equal(first, again)
    q2, g2, kw2 = _inputs(16, 5, "ids", False, seed=6)
    _run("single", q2, g2, kw2)
    assert _tickets_at_zero() and launch_forward._TICKETS


@pytest.mark.parametrize("config, path", [("single", "single"), ("staged", "staged"),
                                          ("auto", "single" if CUDA else "staged"), ("seg2", "staged"),
                                          ("single_centroids", "staged")])
def test_the_forward_path_is_the_callers_or_by_size(config, path):
    """"single" where asked, except with the identity centroids (the single launch sums the
    positives' terms in its loop); "auto": single for a small problem on a GPU
    (`policy.SINGLE_MAX_LOGITS`), staged under the interpreter and where the caller fixes the
    column segments."""
    q, g, kw = _inputs(8, 8, "ids", False, seed=0)
    described = sdm_triton.describe_path(q, g, kw["q_ids"], kw["g_ids"], backend="triton", kernel_config=config)
    assert f"forward {path}," in described


def test_the_forward_config_parses_and_is_checked():
    from sdm_triton.options import KernelConfig
    assert KernelConfig.parse("single").forward == "single"
    assert KernelConfig.parse("staged_fused").name() == "staged_fused"
    with pytest.raises(ValueError, match="forward"):
        KernelConfig(forward="one")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_the_single_forward_replays_from_a_cuda_graph():
    """A step captured in a CUDA graph (its ticket counter created during the capture, on the
    capture's stream) gives the eager step's loss and gradients at every replay, bit for bit:
    each replay's last program sets the counter back for the next."""
    q, g, kw = _inputs(200, 131, "ids", True, seed=3, dtype=torch.bfloat16)
    q.requires_grad_()
    g.requires_grad_()

    def step():
        loss = sdm_triton.sdm_loss(q, g, backend="triton", kernel_config="single", logit_scale=20.0, **kw)
        loss.backward()
        return loss

    eager = step().detach().clone()
    dq, dg = q.grad.clone(), g.grad.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    for _ in range(3):
        q.grad.zero_()
        g.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(loss, eager)
        assert torch.equal(q.grad, dq) and torch.equal(g.grad, dg)
    assert _tickets_at_zero()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_the_single_forward_under_torch_compile():
    """torch.compile traces the staged forward (the single launch's counter is state kept across
    calls, outside the graph): a compiled step with kernel_config="single" gives the eager
    (single) step's loss and gradients to the summation order's rounding."""
    q, g, kw = _inputs(64, 64, "ids", False, seed=4, dtype=torch.bfloat16)

    def step(q, g):
        return sdm_triton.sdm_loss(q, g, backend="triton", kernel_config="single", logit_scale=20.0, **kw)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        qq, gg = q.clone().requires_grad_(), g.clone().requires_grad_()
        loss = fn(qq, gg)
        loss.backward()
        results.append((loss.detach(), qq.grad, gg.grad))
    for a, b in zip(*results):
        assert _rel(b, a) < 1e-5, _rel(b, a)
