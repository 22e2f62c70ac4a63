"""Values at the edges of fp32 and argument forms that once gave silently wrong answers (issue
23): each test failed on 10eec40 on the backend(s) named in its docstring.

* an fp16 gradient past 65504 is inf, as PyTorch's own ops give it (a loss scaler skips the
  step), never saturated at 65504;
* ``sdm_loss_multi`` applies ``sdm_loss``'s paired-batch default per gallery, and refuses
  q_ids=None when the galleries have ids of their own;
* ids of two integer dtypes compare by value (int8 -1 is not uint8 255);
* feature norms whose square sum overflows fp32: NaN when normalised, right when not (the
  loss, gradients and norm statistics); rows of norm below NORM_EPS: F.normalize's gradient;
* huge logits (normalize=False with features ~1e20, temperature 1e-6): right gradients (issue 26.4);
* dense labels: a label mass past fp32 is NaN, subnormal labels give the normal labels' loss;
* a float argument fp32 cannot hold as a normal number is a ValueError naming it;
* labels that require grad, a conflicting preset ``combine``, non-tensor features: clear errors.

Both fast backends run every case ("triton" interpreted without a GPU); the reference is
the truth (float64) where the truth is finite.
"""

from __future__ import annotations

import functools

import pytest
import torch

import sdm_triton
from sdm_triton import reference
from sdm_triton.presets import preset_loss

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ("torch", "triton")
# the Triton backend's two backward paths
PATHS = (("torch", None), ("triton", "fused"), ("triton", "chunked"))


def _loss(backend, config=None):
    return functools.partial(sdm_triton.sdm_loss, backend=backend, kernel_config=config)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------- fp16 overflow

@pytest.mark.parametrize("backend,config", PATHS)
def test_fp16_gradient_overflow_is_inf(backend, config):
    """The issue's case: grad_output 65536 (GradScaler's initial scale) on fp16 features. The
    exact gradient reaches 2.9e5 in 13 entries: they must be inf (where the reference's fp16
    cast is inf), the others finite and right; 10eec40 gave 65504 there (both backends)."""
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(7, 5, generator=gen) * 10).half().to(DEVICE).requires_grad_()
    g = torch.randn(9, 5, generator=gen).half().to(DEVICE).requires_grad_()
    qi = torch.randint(0, 3, (7,), generator=gen).to(DEVICE)
    gi = torch.randint(0, 3, (9,), generator=gen).to(DEVICE)
    scale = torch.tensor(65536.0, device=DEVICE)
    dq, dg = torch.autograd.grad(_loss(backend, config)(q, g, qi, gi), [q, g], grad_outputs=scale)
    q64, g64 = q.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    rq, rg = torch.autograd.grad(reference.sdm_loss(q64, g64, qi, gi), [q64, g64], grad_outputs=scale.double())
    assert torch.isinf(rg.half()).sum() == 13          # the case does overflow (in dg; dq fits)
    for ours, exact in ((dq, rq), (dg, rg)):
        want_inf = torch.isinf(exact.half())
        assert torch.equal(torch.isinf(ours), want_inf)
        assert torch.equal(torch.sign(ours[want_inf]), torch.sign(exact[want_inf]).half())
        assert not (ours.abs() == 65504).any()
        fin = ~want_inf
        assert _rel(ours[fin], exact[fin]) < 2e-3


def test_grad_scaler_skips_the_step_on_fp16_overflow():
    """The issue's training step: a Linear encoder makes the gallery features under fp16
    autocast, GradScaler starts at 65536. The exact dL/dg passes 65504 after scaling: the scaler
    must find inf, skip the step and halve its scale (with saturated gradients it stepped with
    a weight gradient 45% off)."""
    if not CUDA:
        pytest.skip("torch.amp.GradScaler with fp16 autocast: CUDA")
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(7, 5, generator=gen) * 10).half().cuda()
    x = torch.randn(9, 5, generator=gen).cuda()
    qi = torch.randint(0, 3, (7,), generator=gen).cuda()
    gi = torch.randint(0, 3, (9,), generator=gen).cuda()
    enc = torch.nn.Linear(5, 5).cuda()
    with torch.no_grad():                   # the identity map: g = x, as in the fp16 case above
        enc.weight.copy_(torch.eye(5))
        enc.bias.zero_()
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=65536.0)
    before = enc.weight.detach().clone()
    with torch.autocast("cuda", dtype=torch.float16):
        g = enc(x)
    assert g.dtype == torch.float16
    scaler.scale(sdm_triton.sdm_loss(q, g, qi, gi)).backward()
    assert not torch.isfinite(enc.weight.grad).all()        # the overflow reached the encoder
    scaler.step(opt)
    scaler.update()
    assert torch.equal(enc.weight.detach(), before)         # step skipped
    assert scaler.get_scale() == 32768.0


# --------------------------------------------------------------------------- sdm_loss_multi ids

def _multi(backend):
    if backend == "reference":
        return reference.sdm_loss_multi
    return functools.partial(sdm_triton.sdm_loss_multi, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_applies_the_paired_default_per_gallery(backend):
    """g_ids = [ida, None]: gallery 1 has no ids, so (N == M) it shares q_ids, as
    sdm_loss(q, g1, qi) would; 10eec40 gave it gallery 0's ids (32.965 for 43.711)."""
    gen = torch.Generator().manual_seed(3)
    q, g0, g1 = (torch.randn(6, 4, generator=gen).to(DEVICE) for _ in range(3))
    qi = torch.arange(6, device=DEVICE)
    ida = qi.flip(0)
    ours = _multi(backend)(q, [g0, g1], qi, [ida, None])
    want = torch.stack([reference.sdm_loss(q.double(), g0.double(), qi, ida),
                        reference.sdm_loss(q.double(), g1.double(), qi, qi)])
    assert torch.allclose(ours.double(), want, rtol=1e-5)
    # q_ids=None with one shared g_ids: the anchor's ids are those ids
    ours = _multi(backend)(q, [g0, g1], None, ida)
    want = torch.stack([reference.sdm_loss(q.double(), g.double(), ida, ida) for g in (g0, g1)])
    assert torch.allclose(ours.double(), want, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS + ("reference",))
def test_multi_refuses_ambiguous_or_missing_ids(backend):
    """q_ids=None with ids per gallery (stacked, or different tensors): 10eec40 took g_ids[0] as
    the anchor's ids for every gallery; with N != M, [ida, None] returned a value where
    sdm_loss raises "g_ids is required"."""
    q, g0, g1 = (torch.randn(6, 4, device=DEVICE) for _ in range(3))
    qi = torch.arange(6, device=DEVICE)
    ida = qi.flip(0)
    for g_ids in (torch.stack([ida, qi]), [ida, qi]):
        with pytest.raises(ValueError, match="q_ids is required"):
            _multi(backend)(q, [g0, g1], None, g_ids)
    with pytest.raises(ValueError, match=r"g_ids\[1\] is required"):
        _multi(backend)(q, [g0[:5], g1[:5]], qi, [ida[:5], None])


# --------------------------------------------------------------------------- ids of two dtypes

@pytest.mark.parametrize("backend", BACKENDS + ("reference",))
@pytest.mark.parametrize("pair", [(torch.int8, torch.uint8), (torch.int16, torch.uint16),
                                  (torch.int32, torch.uint32), (torch.uint8, torch.int64)])
def test_ids_of_two_dtypes_compare_by_value(backend, pair):
    """-1 in a signed dtype is not 255 / 65535 / 2^32 - 1 in the unsigned one: the loss equals
    the one on int64 copies (10eec40: Triton promoted to the unsigned type, 21.47 for 26.18;
    the torch backend crashed for uint16 / uint32)."""
    gen = torch.Generator().manual_seed(5)
    q, g = torch.randn(6, 8, generator=gen).to(DEVICE), torch.randn(7, 8, generator=gen).to(DEVICE)
    signed, unsigned = (pair[0], pair[1]) if pair[0].is_signed else (pair[1], pair[0])
    top = torch.iinfo(unsigned).max                   # the bit pattern of -1 in the unsigned dtype
    s_vals = torch.tensor([-1, 0, 1, 2, 3, -1, 5], dtype=torch.int64)
    u_vals = torch.tensor([top, 0, 1, 2, 3, 4, top], dtype=torch.int64)
    a, b = (s_vals, u_vals) if pair[0] is signed else (u_vals, s_vals)
    qi, gi = a[:6].to(pair[0]).to(DEVICE), b.to(pair[1]).to(DEVICE)
    fn = reference.sdm_loss if backend == "reference" else _loss(backend)
    ours = fn(q, g, qi, gi, reduction="none")
    want = reference.sdm_loss(q.double(), g.double(), qi.to(torch.int64), gi.to(torch.int64), reduction="none")
    assert torch.allclose(ours.q2g.double(), want.q2g, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.g2q.double(), want.g2q, rtol=1e-5, atol=1e-6)


def test_uint64_ids_mix_only_with_uint64():
    q = torch.randn(4, 8)
    with pytest.raises(TypeError, match="uint64"):
        sdm_triton.sdm_loss(q, q, torch.tensor([0, 1, 2, 3], dtype=torch.uint64), torch.arange(4))


# --------------------------------------------------------------------------- feature norms

@pytest.mark.parametrize("backend,config", PATHS)
def test_norms_past_fp32_square_sums(backend, config):
    """|q_i| ~ 1e20: its square sum overflows fp32. Normalised, 10eec40 counted the row as zero
    (1.23 for 30.9, both backends): now NaN, never a finite wrong loss. Not normalised, with
    |q| ~ 1e19 and |g| ~ 1e-19 (logits O(1)), the loss and gradients are right (Triton's
    gradients were NaN), and so are the norm statistics of return_stats (issue 26: the torch
    backend's fp32 square sum overflowed, q_norm_max and q_norm_mean were inf; Triton's 3.46e20
    was right)."""
    gen = torch.Generator().manual_seed(7)
    q, g = torch.randn(6, 8, generator=gen).to(DEVICE), torch.randn(6, 8, generator=gen).to(DEVICE)
    ids = torch.arange(6, device=DEVICE) % 3
    assert torch.isnan(_loss(backend, config)(q * 1e20, g, ids, ids))
    assert torch.isfinite(_loss(backend, config)(q * 1e18, g, ids, ids))        # below 2^64: computed
    qa, ga = (q * 1e19).requires_grad_(), (g * 1e-19).requires_grad_()
    assert torch.isinf((qa.detach() ** 2).sum(1)).all()                        # every q row overflows
    loss, stats = _loss(backend, config)(qa, ga, ids, ids, normalize=False, logit_scale=1.0, return_stats=True)
    loss.backward()
    q64, g64 = (q.double() * 1e19).requires_grad_(), (g.double() * 1e-19).requires_grad_()
    want = reference.sdm_loss(q64, g64, ids, ids, normalize=False, logit_scale=1.0)
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-5 * abs(want.item())
    assert _rel(qa.grad, q64.grad) < 1e-4 and _rel(ga.grad, g64.grad) < 1e-4
    norms = q64.detach().norm(dim=1)                # the q rows' norms in float64, from the definition
    for field, exact in (("q_norm_mean", norms.mean()), ("q_norm_max", norms.max())):
        got = getattr(stats, field).double()
        assert abs(got - exact) <= 1e-5 * exact, (field, got.item(), exact.item())


@pytest.mark.parametrize("backend,config", PATHS)
@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_norms_below_norm_eps(backend, config, kl):
    """Rows of norm below NORM_EPS = 1e-12 (5e-13, and exactly 0) on both sides: F.normalize
    divides them by NORM_EPS, so their gradient is d / NORM_EPS with no radial projection (the
    projection is F.normalize's backward only where |x| > NORM_EPS). Every row's gradient
    against float64, row by row (a tiny row's gradient is ~1e12 times the others'; issue 26:
    the chunked backward with its radial guard dropped erred 0.13 in such a row, unseen)."""
    gen = torch.Generator().manual_seed(11)
    q, g = torch.randn(6, 8, generator=gen), torch.randn(7, 8, generator=gen)
    q[2] *= 5e-13 / q[2].norm()
    q[4] = 0.0
    g[1] *= 3e-13 / g[1].norm()
    qi, gi = torch.arange(6) % 3, torch.arange(7) % 3
    q, g, qi, gi = (t.to(DEVICE) for t in (q, g, qi, gi))
    qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()
    _loss(backend, config)(qa, ga, qi, gi, kl=kl, eps=1e-2, temperature=0.1).backward()
    q64, g64 = q.double().requires_grad_(), g.double().requires_grad_()
    reference.sdm_loss(q64, g64, qi, gi, kl=kl, eps=1e-2, temperature=0.1).backward()
    for name, ours, exact in (("q", qa.grad, q64.grad), ("g", ga.grad, g64.grad)):
        for i in range(exact.shape[0]):
            if i == 4 and name == "q":          # a zero row: its gradient is d / NORM_EPS too, ~1e12
                assert exact[i].abs().max() > 1e10
            assert _rel(ours[i], exact[i]) < 1e-5, (name, i, _rel(ours[i], exact[i]))



# --------------------------------------------------------------------------- huge logits

def _huge_logit_case(case, dtype):
    """Issue 26.4's cases: features ~1e20 with normalize=False (logits ~1e22 at the default
    s = 50: they fit fp32), or temperature 1e-6 (s = 1e6). Random features: every softmax is one-hot."""
    gen = torch.Generator().manual_seed(0)
    q, g = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
    qi, gi = torch.randint(0, 3, (8,), generator=gen), torch.randint(0, 3, (8,), generator=gen)
    qi[0] = gi[0]
    if case == "features_1e20_unnormalised":
        q, kw, s = q * 1e20, dict(normalize=False), 50.0
    else:
        kw, s = dict(temperature=1e-6), 1e6
    return q.to(DEVICE, dtype), g.to(DEVICE, dtype), qi.to(DEVICE), gi.to(DEVICE), kw, s


@pytest.mark.parametrize("backend,config", PATHS)
@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("case", ["features_1e20_unnormalised", "temperature_1e-6"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_logits_give_the_right_gradients(backend, config, kl, case, dtype):
    """Logits of 1e6 to 1e22 (issue 26.4): the loss was right, but on the interpreted Triton
    backend dq had an inf and dg erred by 20-30% (features 1e20), dg by 1e-2 (s = 1e6, forward
    KL) and by ~1e303 times the truth, which is 0 (reverse KL). The backward's exp2(t - m) took the
    forward's row maxima m of the other direction, computed on tiles with the operands swapped,
    which numpy's matmul sums in another order: one rounding of t at |t| ~ 1e22 is 1e15 in the
    exponent (`tiles.logit_dot`). Now as exact as the fp32 formula (float64 truth on the same
    inputs; bf16: the gradients' own rounding)."""
    q, g, qi, gi, kw, s = _huge_logit_case(case, dtype)
    qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()
    loss = _loss(backend, config)(qa, ga, qi, gi, kl=kl, **kw)
    loss.backward()
    q64, g64 = q.double().requires_grad_(), g.double().requires_grad_()
    want = reference.sdm_loss(q64, g64, qi, gi, kl=kl, **kw)
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    for ours, exact, other in ((qa.grad, q64.grad, g64), (ga.grad, g64.grad, q64)):
        assert torch.isfinite(ours).all()
        # reverse KL: the truth is 0 (P is one-hot); its scale is s |other side| (forward KL's)
        scale = s * other.detach().norm().item()
        err = (ours.double() - exact).norm().item()
        assert err <= rtol * exact.norm().item() + 1e-6 * scale, (err, exact.norm().item(), scale)


# --------------------------------------------------------------------------- dense labels

def _labels_case(seed=9):
    gen = torch.Generator().manual_seed(seed)
    q, g = torch.randn(6, 8, generator=gen).to(DEVICE), torch.randn(7, 8, generator=gen).to(DEVICE)
    lab = (torch.rand(6, 7, generator=gen) > 0.5).float()
    lab[:, 0] = 1.0
    lab[0, :] = 1.0
    return q, g, (lab * torch.rand(6, 7, generator=gen)).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_label_mass_past_fp32_is_nan(backend, kl):
    """Weights near 1e38 overflow the row sums: NaN (10eec40, reverse KL: a finite loss, Y = 0
    everywhere, 18.27 for 8.80 in the issue's case)."""
    q, g, lab = _labels_case()
    assert torch.isnan(_loss(backend)(q, g, labels=lab * 1e38, kl=kl))


@pytest.mark.parametrize("backend,config", PATHS)
@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_subnormal_labels_give_the_normal_labels_loss(backend, config, kl):
    """Y = y / ysum: labels 1e-42 times the normal ones give the same loss and gradients (10eec40:
    NaN on both backends, 1 / ysum overflowed)."""
    q, g, lab = _labels_case()
    tiny = (lab.double() * 1e-42).float()                  # subnormal fp32 values
    assert (tiny[lab > 0] < torch.finfo(torch.float32).tiny).all()
    qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()
    loss = _loss(backend, config)(qa, ga, labels=tiny, kl=kl)
    loss.backward()
    q64, g64 = q.double().requires_grad_(), g.double().requires_grad_()
    want = reference.sdm_loss(q64, g64, labels=tiny.double(), kl=kl)
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-5 * abs(want.item())
    assert _rel(qa.grad, q64.grad) < 1e-5 and _rel(ga.grad, g64.grad) < 1e-5


# --------------------------------------------------------------------------- host arguments

@pytest.mark.parametrize("backend", BACKENDS + ("reference",))
@pytest.mark.parametrize("name,kwargs", [
    ("eps", dict(eps=1e-40, kl="reverse")), ("eps", dict(eps=1e-300, kl="reverse")),
    ("logit_scale", dict(logit_scale=1e-50)), ("logit_scale", dict(logit_scale=1e-40)),
    ("temperature", dict(temperature=1e40)), ("temperature", dict(temperature=1e50)),
])
def test_float_arguments_outside_fp32_are_rejected(backend, name, kwargs):
    """Values that are 0, subnormal or inf in fp32: a ValueError naming the argument and its range
    (10eec40: inf / NaN on the torch backend, "Both operands must be same dtype" from Triton)."""
    q = torch.randn(4, 8, device=DEVICE)
    ids = torch.arange(4, device=DEVICE)
    fn = reference.sdm_loss if backend == "reference" else _loss(backend)
    with pytest.raises(ValueError, match=name):
        fn(q, q, ids, ids, **kwargs)


def test_a_subnormal_scale_tensor_gives_nan_on_the_kernels():
    """A logit_scale tensor below fp32's normal range is a bad value only the device sees: NaN
    from the kernels (their backward divides by s log2 e). The torch backend computes with it as
    given (finite: the truth)."""
    q = torch.randn(4, 8, device=DEVICE)
    ids = torch.arange(4, device=DEVICE)
    ls = torch.tensor(1e-40, device=DEVICE)
    assert torch.isnan(_loss("triton")(q, q, ids, ids, logit_scale=ls))
    assert torch.isfinite(_loss("torch")(q, q, ids, ids, logit_scale=ls))


@pytest.mark.parametrize("backend", BACKENDS + ("reference",))
def test_labels_that_require_grad_are_refused(backend):
    """The loss gives labels no gradient: labels.requires_grad is a ValueError, not a silent None."""
    q, g, lab = _labels_case()
    fn = reference.sdm_loss if backend == "reference" else _loss(backend)
    with pytest.raises(ValueError, match="labels"):
        fn(q, g, labels=lab.requires_grad_())


def test_preset_rde_refuses_a_combine_it_would_ignore():
    q = torch.randn(4, 8)
    ids = torch.arange(4)
    with pytest.raises(ValueError, match="combine"):
        preset_loss("rde", q, q, ids, ids, combine="mean")
    assert preset_loss("rde", q, q, ids, ids, combine="sum").shape == (4,)


@pytest.mark.parametrize("entry", ["sdm_loss", "sdm_loss_multi"])
def test_features_are_checked_before_the_ids(entry):
    """A list or a 3-D g named as such (10eec40 said "g_ids is required when N != M")."""
    fn = getattr(sdm_triton, entry)
    q = torch.randn(4, 8)
    ids = torch.arange(4)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        fn(q.tolist(), q if entry == "sdm_loss" else [q], ids)
    if entry == "sdm_loss":
        with pytest.raises(ValueError, match="g must be 2-D"):
            fn(q, q[None], ids)
