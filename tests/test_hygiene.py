"""docs/contract.md, "Input hygiene": what a user's tensors may look like, and what bad values get.

Every test runs on every backend (the ``sdm_impl`` fixture: the reference, the torch
backend, the Triton kernels, interpreted without a GPU) and, where the behaviour is the
same, through ``sdm_loss_multi`` as well (``entry``): there the inputs under test belong to
gallery 1 of K = 2 galleries (gallery 0 is a clean, different one) and the result compared
is gallery 1's, which by definition equals ``sdm_loss`` on that gallery.

* any strides for every tensor argument: the numbers of the contiguous copy;
* an absent sample (mask False) may hold anything, NaN included: neither the loss nor a
  present sample's gradient changes, its own gradient is exactly zero, and
  ``check_values=True`` does not reject it (nor bad labels on pairs involving it);
* a bad value only the device can see (NaN / inf / negative dense labels on present pairs,
  a ``logit_scale`` tensor <= 0 or non-finite) makes the loss NaN without ``check_values``
  (never a finite number, never 0) and a ValueError naming it with ``check_values=True``.
  The reference always checks values (it synchronises anyway), so it raises in both cases;
* a bad argument the host can see raises TypeError / ValueError naming it before any
  kernel runs (checked by recording the aten ops dispatched before the error);
* autograd: an in-place change of the features between forward and backward is PyTorch's
  version-counter error; double backward is right or refused, never wrong;
* no host synchronisation on the default path (CUDA only).

The layout tests (strides, absent samples) run each backward path (``path``): the Triton
backend's "fused" and "chunked" (with a workspace of one column tile: several column chunks
where the columns span several tiles, as under the interpreter), the torch backend's columns
in one chunk or one at a time; the reference has one path.

Sizes stay at a few rows so the interpreted kernels stay fast; the stride tests use
19 x 21 so that rows and columns span two 16-wide interpreter tiles.
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sdm_triton
from sdm_triton import reference
from sdm_triton.options import SDMRowLosses
from test_validation import BAD_INPUTS, _DROP, good_inputs

CUDA = torch.cuda.is_available()
ENTRIES = ("sdm_loss", "sdm_loss_multi")


# --------------------------------------------------------------------------- helpers

def _multi(sdm_impl):
    """The backend's ``sdm_loss_multi``."""
    if sdm_impl.name == "reference":
        return reference.sdm_loss_multi
    return functools.partial(sdm_triton.sdm_loss_multi, backend=sdm_impl.name)


def _fast_only(sdm_impl):
    if sdm_impl.name == "reference":
        pytest.skip("the reference is not an sdm_triton backend (no backend / workspace / check_values options)")


def _gallery(out, k):
    """Gallery k of an ``sdm_loss_multi`` result ([K] tensor or SDMRowLosses of [K, ...])."""
    if isinstance(out, SDMRowLosses):
        return SDMRowLosses(*(None if t is None else t[k] for t in out))
    if isinstance(out, tuple):
        return (_gallery(out[0], k),) + tuple(out[1:])
    return out[k]


def call(sdm_impl, entry, q, g, q_ids=None, g_ids=None, *, labels=None, g_mask=None, **kw):
    """``sdm_loss(q, g, ...)`` of the backend, directly or as gallery 1 of ``sdm_loss_multi``.

    Through ``sdm_loss_multi``, gallery 0 is a clean random gallery of the same shape with the
    same ids / labels and no mask; ``q``, ``q_ids``, ``q_mask`` are shared as the anchor's.
    """
    if entry == "sdm_loss":
        return sdm_impl(q, g, q_ids, g_ids, labels=labels, g_mask=g_mask, **kw)
    # made on the device: a host-to-device copy here would synchronise (test_no_host_synchronisation)
    gen = torch.Generator(device=g.device).manual_seed(99)
    g0 = torch.randn(g.shape, generator=gen, dtype=torch.float32, device=g.device).to(g.dtype)
    out = _multi(sdm_impl)(
        q, [g0, g], q_ids, None if g_ids is None else [g_ids, g_ids],
        labels=None if labels is None else [torch.where(labels.isfinite() & (labels >= 0), labels, 0.5)
                                            if labels.is_floating_point() else labels, labels],
        g_mask=None if g_mask is None else [None, g_mask], **kw)
    return _gallery(out, 1)


PATHS = ("fused", "chunked")


def _path(sdm_impl, path):
    """The keyword arguments that run ``sdm_impl``'s backward path ``path`` (module doc)."""
    if sdm_impl.name == "triton":
        return dict(kernel_config=path, **(dict(workspace_bytes=1) if path == "chunked" else {}))
    if sdm_impl.name == "torch":
        return dict(workspace_bytes=1) if path == "chunked" else {}
    if path != "fused":
        pytest.skip(f"the {sdm_impl.name} backend has one path")
    return {}


def _features(n, m, d, device, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen) * torch.exp(torch.rand(n, 1, generator=gen))
    g = torch.randn(m, d, generator=gen) * torch.exp(torch.rand(m, 1, generator=gen))
    return q.to(device, dtype), g.to(device, dtype)


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _objective(out, seed=1):
    """A scalar of the output: the loss, or a weighted sum of per-row losses (grad_output != 1)."""
    if isinstance(out, SDMRowLosses):
        gen = torch.Generator().manual_seed(seed)
        total = 0
        for rows in (out.q2g, out.g2q):
            if rows is not None:
                w = torch.randn(rows.shape, generator=gen, dtype=torch.float64).to(rows.device, rows.dtype)
                total = total + (w * rows).sum()
        return total
    return out


def _run(sdm_impl, entry, q, g, scale=None, **kw):
    """(output, {"q": dq, "g": dg, "scale": ds}) of one call on fresh leaves."""
    lq, lg = _leaf(q), _leaf(g)
    ls = None if scale is None else _leaf(scale)
    if ls is not None:
        kw["logit_scale"] = ls
    out = call(sdm_impl, entry, lq, lg, **kw)
    leaves = [t for t in (lq, lg, ls) if t is not None]
    grads = torch.autograd.grad(_objective(out), leaves, allow_unused=True)
    named = dict(zip(("q", "g", "scale")[:len(leaves)], grads))
    return out, {k: (torch.zeros_like(t) if v is None else v) for (k, v), t in zip(named.items(), leaves)}


def _assert_same(got, want, what, **tol):
    """Outputs (tensor or SDMRowLosses) and gradients of two calls agree (validity exactly)."""
    got_out, got_grads = got
    want_out, want_grads = want
    if isinstance(want_out, SDMRowLosses):
        for name in ("q2g", "g2q"):
            a, b = getattr(got_out, name), getattr(want_out, name)
            assert (a is None) == (b is None), f"{what}: {name}"
            if b is not None:
                assert torch.equal(getattr(got_out, name + "_valid").cpu(), getattr(want_out, name + "_valid").cpu()), \
                    f"{what}: {name}_valid differs"
                torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {name} row losses: {m}")
    else:
        torch.testing.assert_close(got_out, want_out, **tol, msg=lambda m: f"{what}: loss: {m}")
    for name, want_grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], want_grad, **tol, msg=lambda m: f"{what}: d/d{name}: {m}")


# --------------------------------------------------------------------------- any strides

N_STRIDE, M_STRIDE, D_STRIDE = 19, 21, 8      # two 16-wide interpreter tiles each way


def _tables(device):
    """What multimodal ReID code holds: (pid, camera) tables and modality-presence matrices."""
    gen = torch.Generator().manual_seed(7)
    q_table = torch.stack([torch.randint(0, 5, (N_STRIDE,), generator=gen),            # pid
                           torch.randint(0, 3, (N_STRIDE,), generator=gen)], dim=1)    # camera
    g_table = torch.stack([torch.randint(0, 5, (M_STRIDE,), generator=gen),
                           torch.randint(0, 3, (M_STRIDE,), generator=gen)], dim=1)
    q_present = torch.rand(N_STRIDE, 3, generator=gen) > 0.3                           # [N, modalities]
    g_present = torch.rand(M_STRIDE, 3, generator=gen) > 0.3
    q_present[:, 2] = ~q_present[:, 1]            # neighbouring columns disagree: a misread shows
    g_present[:, 2] = ~g_present[:, 1]
    soft = torch.rand(N_STRIDE, M_STRIDE, generator=gen)
    soft = torch.where(soft > 0.6, soft, torch.zeros_like(soft))
    row = (torch.rand(1, M_STRIDE, generator=gen) > 0.5).float() * torch.rand(1, M_STRIDE, generator=gen)
    col = (torch.rand(N_STRIDE, 1, generator=gen) > 0.3).float()
    return {k: v.to(device) for k, v in dict(q_table=q_table, g_table=g_table, q_present=q_present,
                                             g_present=g_present, soft=soft, row=row, col=col).items()}


def _true(t):
    """A one-element True mask (expanded to a stride-0 mask: every sample present)."""
    return torch.ones(1, dtype=torch.bool, device=t["soft"].device)


def _strided_labels(y):
    buf = torch.full((2 * y.shape[0], 3 * y.shape[1]), math.nan, dtype=y.dtype, device=y.device)
    view = buf[::2, 1::3]
    view.copy_(y)
    return view


# name -> function of the tables giving the keyword arguments with unusual strides
STRIDED_ARGS = {
    "ids_table_column": lambda t: dict(q_ids=t["q_table"][:, 0], g_ids=t["g_table"][:, 0]),
    "ids_second_column": lambda t: dict(q_ids=t["q_table"][:, 1], g_ids=t["g_table"][:, 1]),
    "ids_step_2": lambda t: dict(q_ids=t["q_table"].T.reshape(-1)[::2][:N_STRIDE],
                                 g_ids=t["g_table"].T.reshape(-1)[::2][:M_STRIDE]),
    "ids_expanded": lambda t: dict(q_ids=t["q_table"][:1, 0].expand(N_STRIDE),
                                   g_ids=t["g_table"][:, 0]),
    "q_mask_presence_column": lambda t: dict(q_ids=t["q_table"][:, 0].contiguous(),
                                             g_ids=t["g_table"][:, 0].contiguous(),
                                             q_mask=t["q_present"][:, 1]),
    "g_mask_presence_column": lambda t: dict(q_ids=t["q_table"][:, 0].contiguous(),
                                             g_ids=t["g_table"][:, 0].contiguous(),
                                             g_mask=t["g_present"][:, 1]),
    "masks_expanded": lambda t: dict(q_ids=t["q_table"][:, 0].contiguous(), g_ids=t["g_table"][:, 0].contiguous(),
                                     q_mask=_true(t).expand(N_STRIDE), g_mask=_true(t).expand(M_STRIDE)),
    "labels_transposed": lambda t: dict(labels=t["soft"].T.contiguous().T),
    "labels_strided": lambda t: dict(labels=_strided_labels(t["soft"])),
    "labels_expanded_row": lambda t: dict(labels=t["row"].expand(N_STRIDE, M_STRIDE)),
    "labels_expanded_col": lambda t: dict(labels=t["col"].expand(N_STRIDE, M_STRIDE)),
    "bool_labels_transposed": lambda t: dict(labels=(t["soft"] > 0).T.contiguous().T),
    "everything": lambda t: dict(q_ids=t["q_table"][:, 0], g_ids=t["g_table"][:, 0],
                                 q_mask=t["q_present"][:, 1], g_mask=t["g_present"][:, 2]),
    "everything_dense": lambda t: dict(labels=_strided_labels(t["soft"]), q_mask=t["q_present"][:, 2],
                                       g_mask=t["g_present"][:, 1]),
}


def _contiguous_copy(kw):
    return {k: (v.contiguous().clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("what", list(STRIDED_ARGS))
def test_strided_arguments_give_the_numbers_of_the_contiguous_copy(sdm_impl, entry, what, path):
    """A column of a (pid, camera) table as ids, a column of a presence matrix as a mask,
    transposed / strided / expanded labels (and transposed features): the per-row losses,
    validity and gradients (q, g, logit_scale) of the contiguous copies (issue 12: the
    Triton kernels read ``ptr + offs``, 65.50 instead of 14.44), on each backward path
    (issue 26: the chunked backward's operand kernel ignoring the feature stride erred 1.4,
    its q side reading q_mask with stride 1 0.76; these cases reached only the fused one)."""
    t = _tables(sdm_impl.device)
    kw = STRIDED_ARGS[what](t)
    assert any(not v.is_contiguous() for v in kw.values()), f"case {what} has only contiguous arguments"
    q, g = _features(N_STRIDE, M_STRIDE, D_STRIDE, sdm_impl.device)
    scale = torch.tensor(7.0, device=sdm_impl.device)
    opts = dict(reduction="none", kl="reverse", eps=1e-2, **_path(sdm_impl, path))
    got = _run(sdm_impl, entry, q.T.contiguous().T, g.T.contiguous().T, scale, **kw, **opts)
    want = _run(sdm_impl, entry, q, g, scale, **_contiguous_copy(kw), **opts)
    _assert_same(got, want, f"{what} via {entry}")


def test_issue_example_strided_ids_and_mask(sdm_impl):
    """The issue's reproduction, verbatim: torch 14.4378 for both calls, Triton gave 65.4959 and ~0."""
    gen = torch.Generator().manual_seed(0)
    q, g = torch.randn(5, 8, generator=gen), torch.randn(6, 8, generator=gen)
    ids, gids = torch.randint(0, 3, (5, 2), generator=gen), torch.randint(0, 3, (6, 2), generator=gen)
    present = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]]).bool()
    q, g, ids, gids, present = (x.to(sdm_impl.device) for x in (q, g, ids, gids, present))
    strided = sdm_impl(q, g, ids[:, 0], gids[:, 0])
    dense = sdm_impl(q, g, ids[:, 0].contiguous(), gids[:, 0].contiguous())
    torch.testing.assert_close(strided, dense)
    masked = sdm_impl(q, g, ids[:, 0].contiguous(), gids[:, 0].contiguous(), q_mask=present[:, 0])
    masked_dense = sdm_impl(q, g, ids[:, 0].contiguous(), gids[:, 0].contiguous(),
                            q_mask=present[:, 0].contiguous())
    torch.testing.assert_close(masked, masked_dense)


MULTI_STRIDED = ["stacked_views", "dense_labels", "shared_expanded"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("form", MULTI_STRIDED)
def test_multi_strided_gallery_arguments(sdm_impl, form, path):
    """ReID5o's layout: K modality galleries against one anchor, the anchor's ids a column of a
    table, ``g_mask = presence.T`` ([K, M], stride (1, K)), ``g_ids`` a [K, M] view of a table,
    stacked labels transposed per gallery, or one [N, M] row expanded to [K, N, M]: every
    gallery's losses and the gradients equal those of contiguous copies."""
    n, m, k, d = 11, 9, 3, 6
    dev = sdm_impl.device
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(n, d, generator=gen).to(dev)
    gs = torch.randn(k, m, d, generator=gen).to(dev)
    q_table = torch.randint(0, 4, (n, 2), generator=gen).to(dev)
    g_table = torch.randint(0, 4, (m, k, 2), generator=gen).to(dev)              # [M, K, (pid, camera)]
    presence = (torch.rand(m, k + 1, generator=gen) > 0.3).to(dev)             # [M, modalities]
    q_present = (torch.rand(n, 2, generator=gen) > 0.2).to(dev)
    if form == "stacked_views":
        kw = dict(q_ids=q_table[:, 0], g_ids=g_table[:, :, 0].T, g_mask=presence.T[1:], q_mask=q_present[:, 1])
    elif form == "dense_labels":
        y = torch.rand(k, n, m, generator=gen).to(dev)
        y = torch.where(y > 0.5, y, torch.zeros_like(y))
        kw = dict(labels=y.transpose(1, 2).contiguous().transpose(1, 2), g_mask=presence.T[:k],
                  q_mask=q_present[:, 0])
    else:
        y = (torch.rand(1, n, m, generator=gen) > 0.6).float().to(dev)
        kw = dict(labels=y.expand(k, n, m), g_mask=presence[:1, 0].expand(k, m) | True)
    multi = _multi(sdm_impl)
    route = _path(sdm_impl, path)

    def run(kwargs):
        lq, lg = _leaf(q), _leaf(gs)
        out = multi(lq, lg, reduction="none", temperature=0.2, **route, **kwargs)
        gq, gg = torch.autograd.grad((out.q2g * 1.5).sum() + (out.g2q * 0.5).sum(), (lq, lg))
        return out, {"q": gq, "g": gg}

    _assert_same(run(kw), run(_contiguous_copy(kw)), f"sdm_loss_multi {form}")


# --------------------------------------------------------------------------- absent samples hold anything

def _absent_problem(device, dense=False):
    """N=5, M=6 with q row 1 and g row 4 absent; dense labels when asked."""
    q, g = _features(5, 6, 7, device, seed=2)
    kw = dict(q_mask=torch.tensor([True, False, True, True, True], device=device),
              g_mask=torch.tensor([True, True, True, True, False, True], device=device))
    if dense:
        gen = torch.Generator().manual_seed(4)
        y = torch.rand(5, 6, generator=gen)
        kw["labels"] = torch.where(y > 0.5, y, torch.zeros_like(y)).to(device)
    else:
        kw["q_ids"] = torch.tensor([0, 1, 2, 0, 3], device=device)
        kw["g_ids"] = torch.tensor([0, 1, 1, 2, 3, 0], device=device)
    return q, g, kw


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 3e38], ids=["nan", "inf", "-inf", "huge"])
@pytest.mark.parametrize("side", ["q", "g"])
@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_absent_rows_may_hold_anything(sdm_impl, entry, value, side, kl, path):
    """An absent row full of NaN / inf changes neither the per-row losses nor any present
    sample's gradient (nor the logit_scale gradient), and gets exactly zero gradient itself
    (issue 12: one NaN in an absent q row made every gradient of g NaN)."""
    q, g, kw = _absent_problem(sdm_impl.device, dense=(side == "g"))
    row = 1 if side == "q" else 4
    dirty = {"q": q.clone(), "g": g.clone()}
    dirty[side][row] = value
    scale = torch.tensor(12.0, device=sdm_impl.device)
    opts = dict(kl=kl, reduction="none", **_path(sdm_impl, path))
    got = _run(sdm_impl, entry, dirty["q"], dirty["g"], scale, **kw, **opts)
    want = _run(sdm_impl, entry, q, g, scale, **kw, **opts)
    out, grads = got
    assert bool((grads[side][row] == 0).all()), \
        f"the absent {side} row got gradient {grads[side][row].tolist()}"
    for name, grad in grads.items():
        assert bool(torch.isfinite(grad).all()), f"d/d{name} not finite: {grad}"
    _assert_same(got, want, f"{side}[{row}] = {value} (absent)")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("scale", [0.05, 0.5, 12.0])
@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("absent", ["some", "all_g", "all_q"])
def test_absent_samples_at_any_logit_scale(sdm_impl, entry, scale, kl, absent, path):
    """Absent samples leave d/dscale finite and right at every logit scale, also below 0.7,
    where the maximum kept by a softmax row that saw no present entry (-1e38) over s log2e
    overflows to -inf: the Triton path's centred dL/ds once took that as the row's centre and
    gave 0 * inf = NaN (CI's hypothesis run, temperature 7.4, every gallery sample masked)."""
    q, g, kw = _absent_problem(sdm_impl.device)
    if absent != "some":
        key = absent[-1] + "_mask"
        kw[key] = torch.zeros_like(kw[key])
    s = torch.tensor(scale, device=sdm_impl.device)
    out, grads = _run(sdm_impl, entry, q, g, s, kl=kl, **kw, **_path(sdm_impl, path))
    wq, wg, ws = (_leaf(t.double().cpu()) for t in (q, g, s))
    ref_kw = {k: v.cpu() for k, v in kw.items()}
    want = reference.sdm_loss(wq, wg, ref_kw.pop("q_ids"), ref_kw.pop("g_ids"), logit_scale=ws, kl=kl, **ref_kw)
    want_grads = dict(zip(("q", "g", "scale"), torch.autograd.grad(want, (wq, wg, ws))))
    for name, grad in grads.items():
        assert bool(torch.isfinite(grad).all()), f"d/d{name} not finite at logit_scale {scale}: {grad}"
        torch.testing.assert_close(grad.double().cpu(), want_grads[name], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.double().cpu(), want.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_absent_rows_may_hold_anything_reduced(sdm_impl, entry, reduction, path):
    """The same for a reduced loss, NaN in an absent row on both sides at once."""
    q, g, kw = _absent_problem(sdm_impl.device)
    kw.update(_path(sdm_impl, path))
    dq, dg = q.clone(), g.clone()
    dq[1], dg[4] = math.nan, math.nan
    got = _run(sdm_impl, entry, dq, dg, reduction=reduction, **kw)
    want = _run(sdm_impl, entry, q, g, reduction=reduction, **kw)
    assert bool(torch.isfinite(got[0])), f"loss {float(got[0])}"
    assert float(got[1]["q"][1].abs().max()) == 0 and float(got[1]["g"][4].abs().max()) == 0
    _assert_same(got, want, "NaN in absent rows")


def _bad_labels_on_absent_pairs(labels):
    """NaN, inf and negative weights on pairs that involve an absent sample (q row 1, g col 4)."""
    bad = labels.clone()
    bad[1, 0], bad[1, 3], bad[2, 4], bad[0, 4] = math.nan, -1.0, math.inf, -math.inf
    return bad


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("check", [False, True], ids=["default", "check_values"])
def test_garbage_of_absent_samples_is_accepted(sdm_impl, entry, check, path):
    """Absent samples may hold anything, also for ``check_values=True`` (which must not reject
    them): NaN / inf features in absent rows, NaN / inf / negative labels on pairs involving
    an absent sample. The result is that of clean values there."""
    if check and sdm_impl.value_check_kwargs is None:
        pytest.skip(f"backend {sdm_impl.name} has no value checks")
    q, g, kw = _absent_problem(sdm_impl.device, dense=True)
    dq, dg = q.clone(), g.clone()
    dq[1], dg[4, 2] = math.nan, math.inf
    dirty = dict(kw, labels=_bad_labels_on_absent_pairs(kw["labels"]))
    extra = dict(sdm_impl.value_check_kwargs if check else {}, **_path(sdm_impl, path))
    got = _run(sdm_impl, entry, dq, dg, **dirty, **extra)
    want = _run(sdm_impl, entry, q, g, **kw, **_path(sdm_impl, path))
    _assert_same(got, want, "garbage of absent samples")


# --------------------------------------------------------------------------- bad values only the device sees

def _expect_nan(sdm_impl, fn, name):
    """Without value checks: a NaN loss (the reference, which always checks, raises instead)."""
    if sdm_impl.name == "reference":
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            fn()
        return
    out = fn()
    assert out.dim() == 0, out
    assert bool(torch.isnan(out)), f"a bad {name} gave the loss {float(out)}; SPEC: NaN (never finite, never 0)"


def _expect_value_error(sdm_impl, fn, name):
    if sdm_impl.value_check_kwargs is None:
        pytest.skip(f"backend {sdm_impl.name} has no value checks")
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        fn(**sdm_impl.value_check_kwargs)


def _bad_labels(kind, device):
    """[4, 5] dense labels with a positive in every row, spoilt on present pairs."""
    gen = torch.Generator().manual_seed(5)
    y = torch.rand(4, 5, generator=gen) + 0.1
    if kind == "all_nan":
        y.fill_(math.nan)
    elif kind == "one_nan":
        y[1, 2] = math.nan
    elif kind == "one_inf":
        y[2, 3] = math.inf
    elif kind == "one_negative":
        y[1, 2] = -0.5
    elif kind == "negative_row":          # row sum still > 0: a silent "valid" row
        y[3, 0] = -0.01
    elif kind == "negative_sum_zero":     # row sum exactly 0: a silently dropped row
        y[0] = 0.0
        y[0, 1], y[0, 2] = 1.0, -1.0
    return y.to(device)


BAD_LABELS = ["all_nan", "one_nan", "one_inf", "one_negative", "negative_row", "negative_sum_zero"]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("direction", ["both", "q2g", "g2q"])
@pytest.mark.parametrize("kind", BAD_LABELS)
def test_bad_dense_labels_give_nan_or_a_value_error(sdm_impl, entry, kind, direction):
    """NaN / inf / negative dense labels on a pair of present samples: a NaN loss without
    value checks (issue 12: all-NaN labels gave 0.0, one NaN silently dropped its row and
    column), a ValueError naming ``labels`` with ``check_values=True``."""
    q, g = _features(4, 5, 6, sdm_impl.device, seed=6)
    labels = _bad_labels(kind, sdm_impl.device)
    q_mask = torch.tensor([True, True, True, True], device=sdm_impl.device)

    def fn(**extra):
        return call(sdm_impl, entry, q, g, labels=labels, q_mask=q_mask, direction=direction, **extra)

    _expect_nan(sdm_impl, fn, "labels")
    _expect_value_error(sdm_impl, fn, "labels")


BAD_SCALES = [-50.0, 0.0, -0.0, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["const", "learnable"])
@pytest.mark.parametrize("value", BAD_SCALES, ids=str)
def test_bad_logit_scale_tensor_gives_nan_or_a_value_error(sdm_impl, entry, value, requires_grad):
    """A ``logit_scale`` tensor <= 0 or non-finite: a NaN loss without value checks (issue 12:
    -50 and 0 gave finite losses), a ValueError naming ``logit_scale`` with checks."""
    q, g = _features(4, 5, 6, sdm_impl.device, seed=8)
    ids_q = torch.tensor([0, 1, 2, 0], device=sdm_impl.device)
    ids_g = torch.tensor([0, 1, 1, 2, 3], device=sdm_impl.device)
    scale = torch.tensor(value, device=sdm_impl.device, requires_grad=requires_grad)

    def fn(**extra):
        return call(sdm_impl, entry, q, g, ids_q, ids_g, logit_scale=scale, **extra)

    _expect_nan(sdm_impl, fn, "logit_scale")
    _expect_value_error(sdm_impl, fn, "logit_scale")


def _fast_backend_names():
    import conftest
    return [name for name in conftest.BACKENDS if name != "reference"]


@pytest.mark.parametrize("backend", _fast_backend_names())
def test_sdm_loss_module_takes_check_values(backend):
    """``SDMLoss(check_values=True)`` is accepted (issue 12: TypeError on the keyword), gives
    ``sdm_loss``'s numbers on good input, accepts garbage in absent rows, and raises a
    ValueError naming ``labels`` / ``logit_scale`` for bad ones; without it, NaN."""
    device = "cuda" if CUDA else "cpu"
    q, g = _features(4, 5, 6, device, seed=9)
    y = _bad_labels("clean", device)
    module = sdm_triton.SDMLoss(temperature=0.1, backend=backend, check_values=True)
    plain = sdm_triton.SDMLoss(temperature=0.1, backend=backend)
    want = sdm_triton.sdm_loss(q, g, labels=y, temperature=0.1, backend=backend)
    torch.testing.assert_close(module(q, g, labels=y), want)
    torch.testing.assert_close(module(q, g, labels=y, logit_scale=torch.tensor(10.0, device=device)), want)
    dq = q.clone()
    dq[2] = math.nan
    mask = torch.tensor([True, True, False, True], device=device)
    torch.testing.assert_close(module(dq, g, labels=y, q_mask=mask), plain(q, g, labels=y, q_mask=mask))
    bad = _bad_labels("one_negative", device)
    with pytest.raises(ValueError, match=r"\blabels\b"):
        module(q, g, labels=bad)
    with pytest.raises(ValueError, match=r"\blogit_scale\b"):
        module(q, g, labels=y, logit_scale=torch.tensor(-50.0, device=device))
    assert bool(torch.isnan(plain(q, g, labels=bad)))


# --------------------------------------------------------------------------- autograd hygiene

@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("which", ["q", "g"])
def test_features_modified_in_place_before_backward(sdm_impl, entry, which):
    """An in-place change of q or g between forward and backward (an optimizer step, a
    normalisation ``x.div_(...)``) is PyTorch's version-counter RuntimeError (issue 12: the
    Triton and torch backends returned garbage gradients, 4e15 instead of ~20). The
    reference keeps no reference to the raw features (it indexes the present rows into a
    copy first), and ``sdm_loss_multi`` given a list of galleries stacks them into a copy
    (as ``torch.stack`` would): for those the error or the gradients of the unmodified
    features are right."""
    q, g = _features(4, 5, 6, sdm_impl.device, seed=10)
    ids_q = torch.tensor([0, 1, 2, 0], device=sdm_impl.device)
    ids_g = torch.tensor([0, 1, 1, 2, 3], device=sdm_impl.device)
    lq, lg = _leaf(q), _leaf(g)
    loss = call(sdm_impl, entry, lq, lg, ids_q, ids_g, temperature=0.05)
    with torch.no_grad():
        (lq if which == "q" else lg).mul_(1000.0).add_(1.0)
    copied = sdm_impl.name == "reference" or (entry == "sdm_loss_multi" and which == "g")
    if not copied:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        return
    try:
        loss.backward()
    except RuntimeError as err:
        assert "modified by an inplace operation" in str(err)
        return
    want = _run(sdm_impl, entry, q, g, None, q_ids=ids_q, g_ids=ids_g, temperature=0.05)[1]
    torch.testing.assert_close(lq.grad, want["q"])
    torch.testing.assert_close(lg.grad, want["g"])


def _double_backward(fn, q, g, scale, **kw):
    """d/d(q, g, s) of <v, dL/dq> + <w, dL/dg> (a gradient penalty), with L = fn(q, g, ...)."""
    lq, lg, ls = _leaf(q), _leaf(g), _leaf(scale)
    loss = fn(lq, lg, logit_scale=ls, **kw)
    gq, gg = torch.autograd.grad(loss, (lq, lg), create_graph=True)
    gen = torch.Generator().manual_seed(11)
    v = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.device, q.dtype)
    w = torch.randn(g.shape, generator=gen, dtype=torch.float64).to(g.device, g.dtype)
    penalty = (gq * v).sum() + (gg * w).sum()
    return torch.autograd.grad(penalty, (lq, lg, ls), allow_unused=True)


REFUSED = r"twice|double|second|higher.order|create_graph|once_differentiable|not (been )?(implemented|supported)"


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_double_backward_is_right_or_refused(sdm_impl, entry, kl):
    """The gradient of a gradient (a gradient penalty) matches the float64 reference, or
    raises a RuntimeError saying it is not supported; never wrong numbers (issue 12:
    11873 instead of 1652)."""
    dtype = torch.float64 if torch.float64 in sdm_impl.dtypes else torch.float32
    q, g = _features(5, 6, 4, sdm_impl.device, seed=12, dtype=dtype)
    kw = dict(q_ids=torch.tensor([0, 1, 2, 0, 3], device=sdm_impl.device),
              g_ids=torch.tensor([0, 1, 1, 2, 3, 0], device=sdm_impl.device),
              q_mask=torch.tensor([True, True, False, True, True], device=sdm_impl.device),
              kl=kl, eps=1e-2)
    scale = torch.tensor(5.0, device=sdm_impl.device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    try:
        got = _double_backward(functools.partial(call, sdm_impl, entry), q, g, scale, **kw)
    except (RuntimeError, NotImplementedError) as err:
        assert re.search(REFUSED, str(err), re.IGNORECASE), f"unclear error for double backward: {err}"
        return
    want = _double_backward(reference.sdm_loss, q.double(), g.double(), scale.double(), **kw)
    for name, a, b in zip(("q", "g", "logit_scale"), got, want):
        assert a is not None, f"no second-order gradient for {name}"
        rtol = 1e-9 if dtype == torch.float64 else 1e-3
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * float(b.abs().max()),
                                   msg=lambda m: f"d/d{name} of the gradient penalty: {m}")


# --------------------------------------------------------------------------- host-visible arguments

_NO_WORK_OPS = {
    # allocation, views and metadata: no op that reads or computes on the inputs' data
    "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
    "scalar_tensor", "lift_fresh", "lift_fresh_copy", "view", "_unsafe_view", "alias", "detach", "expand",
    "as_strided", "t", "transpose", "permute", "slice", "select", "unsqueeze", "squeeze", "unbind", "split",
    "is_nonzero", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size", "stride",
}


class _OpRecorder(TorchDispatchMode):
    """Records the aten ops dispatched inside it (a kernel of either backend starts with some)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))

    def work(self):
        return [op for op in self.ops if op not in _NO_WORK_OPS]


def _call_recorded(fn, overrides, device, recorder):
    """``fn(q, g, **good_inputs with overrides)`` inside ``recorder``."""
    kw = good_inputs(device)
    kw.update({k: (v(device) if callable(v) else v) for k, v in overrides.items()})
    kw = {k: v for k, v in kw.items() if v is not _DROP}
    q, g = kw.pop("q"), kw.pop("g")
    with recorder:
        fn(q, g, **kw)


@pytest.mark.parametrize("name, exc, overrides", BAD_INPUTS,
                         ids=[f"{n}-{e.__name__}-" + "-".join(o) for n, e, o in BAD_INPUTS])
def test_bad_arguments_are_rejected_before_any_work(sdm_impl, name, exc, overrides):
    """Every bad argument of tests/test_validation.py is rejected before any aten op that reads
    or computes on data runs (so before any kernel, and with nothing half done)."""
    recorder = _OpRecorder()
    with pytest.raises(exc, match=rf"\b{name}\b"):
        _call_recorded(sdm_impl, overrides, sdm_impl.device, recorder)
    assert not recorder.work(), f"ops ran before the error: {recorder.work()}"


# sdm_triton's own arguments (not in the reference): (name in the message, exception, overrides)
FAST_BAD_INPUTS = [
    ("workspace_bytes", TypeError, dict(workspace_bytes="64")),
    ("workspace_bytes", TypeError, dict(workspace_bytes=2.5)),
    ("workspace_bytes", TypeError, dict(workspace_bytes=True)),
    ("workspace_bytes", ValueError, dict(workspace_bytes=0)),
    ("workspace_bytes", ValueError, dict(workspace_bytes=-64)),
    ("check_values", TypeError, dict(check_values="yes")),
    ("check_values", TypeError, dict(check_values=None)),
    ("return_stats", TypeError, dict(return_stats="no")),
    ("kernel_config", ValueError, dict(kernel_config="no_such_config")),
    ("kernel_config", TypeError, dict(kernel_config=16)),
    ("backend", ValueError, dict(backend="cuda")),
    ("temperature", ValueError, dict(temperature=1e-300)),
    ("logit_scale", ValueError, dict(logit_scale=1e39)),
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name, exc, overrides", FAST_BAD_INPUTS,
                         ids=[f"{n}-{e.__name__}-{list(o.values())[0]!r}" for n, e, o in FAST_BAD_INPUTS])
def test_sdm_triton_arguments_are_rejected_before_any_work(sdm_impl, entry, name, exc, overrides):
    """sdm_triton's extra arguments (workspace size, flags, tile config, backend) and a scale
    that overflows fp32: a TypeError / ValueError naming the argument, raised before any
    aten op that reads or computes on data (issue 12: ``workspace_bytes="64"`` failed deep
    inside the torch backend with an unrelated message and was accepted by the Triton one;
    flags given as strings were taken as true)."""
    _fast_only(sdm_impl)
    if entry == "sdm_loss":
        fn = functools.partial(sdm_triton.sdm_loss, backend=sdm_impl.name)
    else:
        def fn(q, g, q_ids, g_ids, **kw):
            return sdm_triton.sdm_loss_multi(q, [g, g], q_ids, g_ids, **{"backend": sdm_impl.name, **kw})
    recorder = _OpRecorder()
    with pytest.raises(exc, match=rf"\b{name}\b"):
        _call_recorded(fn, overrides, sdm_impl.device, recorder)
    assert not recorder.work(), f"ops ran before the error: {recorder.work()}"


def test_logit_scale_may_be_a_python_float(sdm_impl):
    """``logit_scale=50.0`` equals ``temperature=0.02`` and a 0-dim tensor of 50."""
    kw = good_inputs(sdm_impl.device)
    q, g = kw.pop("q"), kw.pop("g")
    by_float = sdm_impl(q, g, **kw, logit_scale=50.0)
    torch.testing.assert_close(by_float, sdm_impl(q, g, **kw, temperature=0.02))
    torch.testing.assert_close(by_float, sdm_impl(q, g, **kw, logit_scale=torch.tensor(50.0, device=sdm_impl.device)))
    torch.testing.assert_close(sdm_impl(q, g, **kw, logit_scale=3), sdm_impl(q, g, **kw, logit_scale=3.0))


@pytest.mark.parametrize("entry", ENTRIES)
def test_paired_batch_ids_default(sdm_impl, entry):
    """N == M: ``g_ids`` omitted (or ``q_ids`` omitted) means row i of q and row i of g share
    ids: the result of passing the same ids twice. N != M: a ValueError naming the missing one."""
    q, g = _features(5, 5, 6, sdm_impl.device, seed=13)
    ids = torch.tensor([0, 1, 0, 2, 1], device=sdm_impl.device)
    want = call(sdm_impl, entry, q, g, ids, ids, reduction="none")
    for got in (call(sdm_impl, entry, q, g, ids, reduction="none"),
                call(sdm_impl, entry, q, g, None, ids, reduction="none") if entry == "sdm_loss" else None):
        if got is None:
            continue
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"\bg_ids\b"):
        call(sdm_impl, entry, q, g[:4], ids)


@pytest.mark.parametrize("bad, exc", [(1e-300, ValueError), (0.0, ValueError), ("0.02", TypeError)])
def test_sdm_loss_module_rejects_a_bad_temperature(bad, exc):
    """``SDMLoss(temperature=...)``: a scale 1 / t that overflows fp32 (1e-300), 0 or a string is
    an error naming ``temperature``, at construction or at the latest on the first call."""
    q, g = _features(3, 3, 4, "cuda" if CUDA else "cpu")
    ids = torch.arange(3, device=q.device)
    with pytest.raises(exc, match=r"\btemperature\b"):
        sdm_triton.SDMLoss(temperature=bad, backend="torch")(q, g, ids, ids)


@pytest.mark.gpu
@pytest.mark.parametrize("entry", ENTRIES)
def test_cpu_logit_scale_with_cuda_features(sdm_impl, entry):
    """A 0-dim CPU ``logit_scale`` (IRRA keeps it there) with CUDA features: the value and
    gradients of a CUDA scale; its gradient arrives on the CPU tensor."""
    q, g = _features(6, 7, 8, "cuda", seed=15)
    ids_q = torch.tensor([0, 1, 2, 0, 3, 1], device="cuda")
    ids_g = torch.tensor([0, 1, 1, 2, 3, 0, 4], device="cuda")
    cpu_scale = torch.tensor(20.0, requires_grad=True)
    got = _run(sdm_impl, entry, q, g, None, q_ids=ids_q, g_ids=ids_g, logit_scale=cpu_scale)
    (ds,) = torch.autograd.grad(call(sdm_impl, entry, q, g, ids_q, ids_g, logit_scale=cpu_scale), cpu_scale)
    assert ds.device.type == "cpu"
    want = _run(sdm_impl, entry, q, g, torch.tensor(20.0, device="cuda"), q_ids=ids_q, g_ids=ids_g)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(ds, want[1]["scale"].cpu())


# --------------------------------------------------------------------------- no host synchronisation

@pytest.mark.gpu
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("labels", ["ids", "dense"])
@pytest.mark.parametrize("scale_kind", ["tensor", "float"])
def test_no_host_synchronisation(sdm_impl, entry, labels, scale_kind):
    """Forward and backward with masks, dense labels or ids and a learnable logit_scale tensor
    (or a float one) run without a host synchronisation (``torch.cuda.set_sync_debug_mode("error")``):
    the device-side value rules (NaN for bad values) are what makes that possible. (A float scale
    made into a device tensor by ``torch.tensor`` is a blocking copy: the torch backend did that.)"""
    if sdm_impl.name == "reference":
        pytest.skip("the reference checks values on the host by design")
    q, g = _features(40, 50, 32, "cuda", seed=16)
    gen = torch.Generator().manual_seed(17)
    kw = dict(q_mask=(torch.rand(40, generator=gen) > 0.2).cuda(), g_mask=(torch.rand(50, generator=gen) > 0.2).cuda())
    if labels == "dense":
        kw["labels"] = torch.rand(40, 50, generator=gen).cuda()
    else:
        kw["q_ids"] = torch.randint(0, 10, (40,), generator=gen).cuda()
        kw["g_ids"] = torch.randint(0, 10, (50,), generator=gen).cuda()
    scale = torch.tensor(20.0, device="cuda", requires_grad=True) if scale_kind == "tensor" else 20.0
    lq, lg = _leaf(q), _leaf(g)
    call(sdm_impl, entry, lq, lg, logit_scale=scale, **kw).backward()     # compile / warm up
    torch.cuda.synchronize()
    lq, lg = _leaf(q), _leaf(g)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = call(sdm_impl, entry, lq, lg, logit_scale=scale, **kw)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(lq.grad).all())
