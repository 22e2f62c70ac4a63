"""K galleries against one anchor (``sdm_loss_multi``): every form of the per-gallery
arguments, both backends, against the reference's loop over galleries in float64.

Gallery k of ``sdm_loss_multi`` must equal ``sdm_loss(q, g_k, ...)``; the Triton kernels
compute all K in one problem whose query rows have one softmax per gallery (kernels/stats.py,
kernels/grad.py), so the cases below put M off the tile width, cut the columns into segments
and chunks, and run both backward paths (fused, chunked) with non-square tiles.
"""

import pytest
import torch

from sdm_triton import reference
import sdm_triton
from sdm_triton.options import SDMRowLosses

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# both backward paths, with non-square tiles (a swapped block_m / block_n would show); the
# interpreted chunked variant's forward cuts the columns into segments (up to three: "seg3";
# on a GPU the automatic choice cuts SHAPES[0] into three, by launch/forward.py's arithmetic)
TRITON_VARIANTS = ["fused", "chunked_m64n128"] if CUDA else ["fused_m16n32", "chunked_m32n16seg3"]
# (N, M, D, K): M not a multiple of the tile width, K = 1 as the degenerate case. The first
# spans two column tiles each way (interpreter: 16 wide), so that the chunked variant's
# statistics pass runs two segments per side with K = 2 galleries (issue 26: a gallery index
# decoded without the segment gave NaN, and no test had K > 1 with several segments; with
# K = 3 and 2 segments that mutant is a bijection of the programs, unseen: K shares a factor
# with the segment count here)
SHAPES = ([(300, 257, 512, 3), (129, 64, 77, 15), (1000, 130, 96, 1)] if CUDA
          else [(19, 21, 9, 2), (7, 5, 16, 4), (20, 17, 8, 1)])
WORKSPACES = (1 << 30, 2000)    # one chunk; chunks of a few columns, across gallery boundaries


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _problem(n, m, d, k, seed, dense=False, masks=False, shared_ids=False, as_list=False):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n, d, generator=gen) * torch.exp(torch.rand(n, 1, generator=gen) * 2 - 1)
    gs = torch.randn(k, m, d, generator=gen)
    kw = {}
    if dense:
        lab = torch.rand(k, n, m, generator=gen)
        kw["labels"] = torch.where(lab > 0.7, lab, torch.zeros_like(lab)).to(DEVICE)
    else:
        kw["q_ids"] = torch.randint(0, max(1, n // 3), (n,), generator=gen).to(DEVICE)
        shape = (m,) if shared_ids else (k, m)
        kw["g_ids"] = torch.randint(0, max(1, n // 3), shape, generator=gen).to(DEVICE)
    if masks:
        kw["q_mask"] = (torch.rand(n, generator=gen) > 0.2).to(DEVICE)
        kw["g_mask"] = (torch.rand(k, m, generator=gen) > 0.25).to(DEVICE)
        if k > 2:
            kw["g_mask"][0] = False      # a gallery with no sample at all
    gs = gs.to(DEVICE)
    if as_list:
        gs = list(gs.unbind(0))
        kw = {key: (list(v.unbind(0)) if key in ("labels", "g_mask") or (key == "g_ids" and v.dim() == 2)
                    else v) for key, v in kw.items()}
    return q.to(DEVICE), gs, kw


def _cast(gs, dtype):
    return [g.to(dtype) for g in gs] if isinstance(gs, list) else gs.to(dtype)


def _leaves(q, gs, dtype):
    qa = q.to(dtype).clone().requires_grad_()
    if isinstance(gs, list):
        ga = [g.to(dtype).clone().requires_grad_() for g in gs]
    else:
        ga = gs.to(dtype).clone().requires_grad_()
    return qa, ga


def _grads(ga):
    return torch.stack([g.grad for g in ga]) if isinstance(ga, list) else ga.grad


def _weighted_total(out, gen_seed):
    """A generic scalar of the output: random weights on each gallery's loss, or on each row."""
    gen = torch.Generator(device="cpu").manual_seed(gen_seed)
    if isinstance(out, SDMRowLosses):
        total = 0.0
        for t in (out.q2g, out.g2q):
            if t is not None:
                total = total + (t.double() * torch.rand(t.shape, generator=gen, dtype=torch.float64).to(t.device)).sum()
        return total
    return (out.double() * torch.rand(out.shape, generator=gen, dtype=torch.float64).to(out.device)).sum()


def _run(fn, q, gs, kw, dtype, **options):
    """(total, dq, dgs, d_logit_scale) of ``fn`` on copies of the inputs in ``dtype``."""
    qa, ga = _leaves(q, gs, dtype)
    ls = torch.tensor(25.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=q.device,
                      requires_grad=True)
    kw = {key: ([t.to(dtype) for t in v] if isinstance(v, list) else v.to(dtype)) if key == "labels" else v
          for key, v in kw.items()}
    total = _weighted_total(fn(qa, ga, **kw, logit_scale=ls, **options), 7)
    total.backward()
    return total.detach(), qa.grad, _grads(ga), ls.grad


OPTIONS = [dict(kl="forward"), dict(kl="reverse", reduction="sum"),
           dict(kl="forward", reduction="none"), dict(kl="reverse", direction="g2q", reduction="none"),
           dict(kl="forward", direction="q2g", combine="sum")]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
@pytest.mark.parametrize("form", ["stacked", "list", "shared_ids", "dense"])
def test_torch_backend_equals_reference_loop_float64(options, form):
    """The torch backend on the concatenated problem equals the reference's K separate losses
    to float64 rounding: values, per-row losses and gradients (q, every gallery, logit scale)."""
    for i, (n, m, d, k) in enumerate(SHAPES):
        q, gs, kw = _problem(n, m, d, k, seed=i, dense=form == "dense", masks=i != 1,
                             shared_ids=form == "shared_ids", as_list=form == "list")
        for workspace in WORKSPACES:
            ours = _run(sdm_triton.sdm_loss_multi, q, gs, kw, torch.float64, backend="torch",
                        workspace_bytes=workspace, **options)
            ref = _run(reference.sdm_loss_multi, q, gs, kw, torch.float64, **options)
            for a, b in zip(ours, ref):
                assert _rel(a, b) < 1e-10, (n, m, d, k, workspace)


@pytest.mark.parametrize("variant", TRITON_VARIANTS)
@pytest.mark.parametrize("options", OPTIONS[:3], ids=lambda o: "-".join(f"{v}" for v in o.values()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_matches_float64_no_worse_than_pytorch(variant, options, dtype):
    """Triton on all K galleries at once: error against the float64 reference at most 4x the
    error of PyTorch's own loop over the galleries (the reference in ``dtype``'s fp32 math on the
    same half-valued inputs), plus the slack of test_kernels (fp32 accuracy; for half-precision
    gradients 4 units of roundoff of their dtype).

    The logit-scale gradient is one fp32 sum of K * N * M terms dS * cos that cancel (a small
    result of large terms: relative errors ~1e-5 for every fp32 implementation, the torch
    backend's too); test_kernels holds the kernels' sum to PyTorch's on single problems, so
    here it is held to the same kernels' error on the K separate problems."""
    for i, (n, m, d, k) in enumerate(SHAPES):
        q, gs, kw = _problem(n, m, d, k, seed=10 + i, dense=i == 1, masks=True)
        q, gs = q.to(dtype).double(), _cast(_cast(gs, dtype), torch.float64)   # the same half-valued inputs
        truth = _run(reference.sdm_loss_multi, q, gs, kw, torch.float64, **options)
        base = _run(reference.sdm_loss_multi, q, gs, kw, dtype, **options)
        separate = _run(_separate_calls(variant), q, gs, kw, dtype, **options)
        for workspace in WORKSPACES:
            ours = _run(sdm_triton.sdm_loss_multi, q, gs, kw, dtype, backend="triton", kernel_config=variant,
                        workspace_bytes=workspace, **options)
            for key, a, b, c, sep in zip(("loss", "dq", "dg", "ds"), ours, base, truth, separate):
                if key == "ds":
                    assert _rel(a, c) <= 1.5 * _rel(sep, c) + 1e-6, (variant, n, m, d, k, workspace, key)
                    continue
                slack = 4 * torch.finfo(dtype).eps / 2 if key != "loss" and dtype != torch.float32 else 2e-6
                assert _rel(a, c) <= 4 * _rel(b, c) + slack, (variant, n, m, d, k, workspace, key)


def _separate_calls(variant):
    """sdm_loss_multi's result from K separate sdm_loss calls of one Triton variant."""
    def fn(q, gs, q_ids=None, g_ids=None, labels=None, q_mask=None, g_mask=None, **options):
        args = reference.galleries.split_galleries(gs, g_ids, labels, g_mask)
        return reference.galleries.stack_results([
            sdm_triton.sdm_loss(q, g, q_ids, ids, labels=lab, q_mask=q_mask, g_mask=mask, backend="triton",
                                kernel_config=variant, **options) for g, ids, lab, mask in zip(*args)])
    return fn


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gallery_k_equals_a_separate_call(backend):
    """Entry k is sdm_loss(q, g_k) of the same backend: the batching changes nothing but speed."""
    n, m, d, k = SHAPES[0]
    q, gs, kw = _problem(n, m, d, k, seed=3, masks=True)
    multi = sdm_triton.sdm_loss_multi(q, gs, **kw, backend=backend, kl="reverse")
    for j in range(k):
        single = sdm_triton.sdm_loss(q, gs[j], kw["q_ids"], kw["g_ids"][j], q_mask=kw["q_mask"],
                                     g_mask=kw["g_mask"][j], backend=backend, kl="reverse")
        torch.testing.assert_close(multi[j], single, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend, variant", [("torch", None), ("triton", "fused_m16n32"),
                                              ("triton", "chunked_m32n16")])
def test_gradient_of_the_values_in_any_layout(backend, variant):
    """The gradient autograd hands the [K] losses may be expanded (``losses.sum()``: stride 0,
    which the kernels read without a copy), contiguous or strided: the same weights give the
    same gradients. A hook checks that each form hands over the stride it is named for."""
    n, m, d, k = SHAPES[1]
    q, gs, kw = _problem(n, m, d, k, seed=5, masks=True)
    weights = torch.linspace(0.5, 2.0, k, dtype=torch.float32, device=DEVICE)
    forms = {   # name: (objective of the [K] losses, the stride of its gradient, the weights in float64)
        "expanded": (lambda out: out.sum() * 1.5, 0, torch.full((k,), 1.5, dtype=torch.float64)),
        "contiguous": (lambda out: (out * weights).sum(), 1, weights.double()),
        "strided": (lambda out: (torch.stack([out, out.detach()], 1)[:, 0] * weights).sum(), 2, weights.double()),
    }
    cfg = dict(kernel_config=variant) if variant else {}
    lq64, lg64 = q.double().requires_grad_(), gs.double().requires_grad_()
    out64 = reference.sdm_loss_multi(lq64, lg64, **kw)
    for name, (objective, stride, w) in forms.items():
        lq, lg = q.clone().requires_grad_(), gs.clone().requires_grad_()
        out = sdm_triton.sdm_loss_multi(lq, lg, **kw, backend=backend, **cfg)
        seen = []
        out.register_hook(lambda grad: seen.append(grad.stride()))
        objective(out).backward()
        assert seen == [(stride,)], (name, seen)
        dq, dg = torch.autograd.grad((out64 * w.to(out64.device)).sum(), (lq64, lg64), retain_graph=True)
        assert _rel(lq.grad, dq) < 1e-5 and _rel(lg.grad, dg) < 1e-5, (name, _rel(lq.grad, dq), _rel(lg.grad, dg))


def test_bad_gallery_arguments():
    q = torch.randn(4, 8, device=DEVICE)
    gs = torch.randn(3, 5, 8, device=DEVICE)
    qi, gi = torch.arange(4, device=DEVICE), torch.arange(5, device=DEVICE)
    with pytest.raises(ValueError, match=r"\[K, M, D\]"):
        sdm_triton.sdm_loss_multi(q, gs[0], qi, gi)
    with pytest.raises(ValueError, match="no gallery"):
        sdm_triton.sdm_loss_multi(q, [], qi, gi)
    with pytest.raises(ValueError, match="same shape"):
        sdm_triton.sdm_loss_multi(q, [gs[0], gs[1, :4]], qi, gi)
    with pytest.raises(ValueError, match="2 entries for 3 galleries"):
        sdm_triton.sdm_loss_multi(q, gs, qi, [gi, gi])
    with pytest.raises(ValueError, match="stacks 2 galleries"):
        sdm_triton.sdm_loss_multi(q, gs, qi, torch.stack([gi, gi]))
    with pytest.raises(ValueError, match="g_ids must have shape"):
        sdm_triton.sdm_loss_multi(q, gs, qi, torch.arange(6))
    with pytest.raises(TypeError, match=r"gs\[1\]"):
        sdm_triton.sdm_loss_multi(q, [gs[0], "x"], qi, gi)


def test_preset_kwargs_give_each_gallery_the_preset_loss():
    """ReID5o's use: IRRA's SDM against each gallery, via the preset's keyword arguments."""
    n, m, d, k = SHAPES[1]
    q, gs, kw = _problem(n, m, d, k, seed=5, masks=True)
    multi = sdm_triton.sdm_loss_multi(q, gs, **kw, **sdm_triton.preset_kwargs("irra"))
    for j in range(k):
        single = sdm_triton.preset_loss("irra", q, gs[j], kw["q_ids"], kw["g_ids"][j], q_mask=kw["q_mask"],
                                        g_mask=kw["g_mask"][j])
        torch.testing.assert_close(multi[j], single, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_return_stats_per_gallery(backend):
    """return_stats=True: every SDMStats field is [K] (the anchor's norms 0-dim) and equals the
    statistics of the separate call against that gallery."""
    n, m, d, k = SHAPES[0]
    q, gs, kw = _problem(n, m, d, k, seed=8, masks=True)
    losses, stats = sdm_triton.sdm_loss_multi(q, gs, **kw, backend=backend, return_stats=True)
    for j in range(k):
        loss_j, stats_j = sdm_triton.sdm_loss(q, gs[j], kw["q_ids"], kw["g_ids"][j], q_mask=kw["q_mask"],
                                              g_mask=kw["g_mask"][j], backend=backend, return_stats=True)
        torch.testing.assert_close(losses[j], loss_j, rtol=2e-6, atol=1e-7)
        for field in stats_j.__dataclass_fields__:
            ours, single = getattr(stats, field), getattr(stats_j, field)
            if field.startswith("q_norm"):
                assert ours.dim() == 0
                torch.testing.assert_close(ours, single)
            else:
                assert ours.shape == (k,), field
                torch.testing.assert_close(ours[j], single, rtol=2e-6, atol=1e-7)
