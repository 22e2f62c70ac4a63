"""Tests of the Triton kernels and their launch layer (the shared properties live in
test_properties.py). Under the CPU interpreter the cases are small but always span several
tiles in each direction (16-wide tiles, non-square where a swapped block_m / block_n would
show, several column tiles per program, several column segments); on a GPU (``-m gpu``)
larger shapes, 64-bit offsets and the absence of host synchronisation.

Each backward path runs on every case: "fused" (one launch) and "chunked" (workspace + cuBLAS).
"""

import functools
import math

import pytest
import torch

import sdm_triton
from sdm_triton import launch, reference
from bench.methods import formula_sdm

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# both backward paths; non-square forward and backward tiles (interpreter: 16 x 32 and 32 x 16);
# forward KL with ids in the loop ("tiles", the default; forced in the first variant) and by
# identity centroids in the second (KernelConfig.positives: issue 27)
VARIANTS = (["fused_m32n64bm16bn32_tiles", "fused_centroids", "chunked", "chunked_m64n128bm64bn128"] if CUDA
            else ["fused_m16n32bm32bn16_tiles", "chunked_centroids_m32n16bm16bn32", "chunked_m16n16bm16bn16seg3"])


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


def _weighted_run(q, g, kw, kl, fn, scale=20.0, dtype=None):
    """(total, dq, dg, dscale) of ``fn`` with random weights on the per-row losses (grad_output
    != 1) and a learnable scale; ``dtype`` torch.float64: on float64 copies of the inputs."""
    n, m = q.shape[0], g.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(n * 7 + m)
    wq = torch.rand(n, generator=gen, dtype=torch.float64).to(q.device)
    wg = torch.rand(m, generator=gen, dtype=torch.float64).to(q.device)
    qa, ga = q.to(dtype or q.dtype, copy=True).requires_grad_(), g.to(dtype or g.dtype, copy=True).requires_grad_()
    ls = torch.tensor(scale, device=q.device, dtype=dtype or torch.float32, requires_grad=True)
    if dtype is not None:
        kw = {k: (v.to(dtype) if k == "labels" else v) for k, v in kw.items()}
    tot = _weighted(fn(qa, ga, kl=kl, logit_scale=ls, reduction="none", **kw), wq, wg)
    tot.backward()
    return tot.detach(), qa.grad, ga.grad, ls.grad


def _errors_vs_float64(q, g, kw, kl, fn, scale=20.0):
    """Relative errors of loss / dq / dg / dscale of ``fn`` against float64 on the same inputs
    (random weights on the per-row losses: grad_output != 1)."""
    ours = _weighted_run(q, g, kw, kl, fn, scale)
    ref = _weighted_run(q, g, kw, kl, reference.sdm_loss, scale, dtype=torch.float64)
    return {key: _rel(o, r) for key, o, r in zip(("loss", "dq", "dg", "ds"), ours, ref)}


def _triton(config):
    def fn(*args, **kwargs):
        return sdm_triton.sdm_loss(*args, backend="triton", kernel_config=config, **kwargs)
    return fn


def _torch_same_dtype(*args, **kwargs):
    """PyTorch computing the same formula from inputs in the same dtype (the reference, fp32 math)."""
    return reference.sdm_loss(*args, **kwargs)


def _assert_no_worse_than_pytorch(ours, base, dtype, where):
    for key in ours:
        # ds is one scalar summing N*M terms: hold it to fp32 accuracy rather than to
        # PyTorch's (sometimes luckily tiny) error on the same sum.
        slack = 1e-5 if key == "ds" else 2e-6
        if key in ("dq", "dg") and dtype != torch.float32:
            slack = 4 * torch.finfo(dtype).eps / 2      # gradients come back in the input dtype
        assert ours[key] <= 4 * base[key] + slack, (where, key, ours, base)


# (N, M, D): several 16-wide tiles each way under the interpreter (53 = 3 * 16 + 5, ...)
SMALL = [(53, 61, 19), (37, 45, 33), (1, 40, 3), (48, 17, 64)]
LARGE = [(300, 457, 512), (1031, 700, 768), (129, 1, 77), (2049, 1500, 256)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("dense,masks", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda t: str(t)[6:])
def test_kernels_match_float64_no_worse_than_pytorch(variant, kl, dense, masks, dtype):
    """Error vs float64 on the same (half-valued) inputs is at most 4x PyTorch's own error
    computing the same formula from the same dtype, plus a stated slack: fp32 accuracy for the
    loss, and for half-precision gradients 4 units of roundoff of their dtype (SPEC: gradients
    come back in the input dtype, so their error may be that of rounding, times a small factor)."""
    shapes = LARGE if CUDA else SMALL
    for i, (n, m, d) in enumerate(shapes):
        q, g, kw = _problem(n, m, d, dtype, seed=i, dense=dense, masks=masks)
        _assert_no_worse_than_pytorch(_errors_vs_float64(q, g, kw, kl, _triton(variant)),
                                      _errors_vs_float64(q, g, kw, kl, _torch_same_dtype), dtype, (variant, n, m, d))


@pytest.mark.parametrize("variant", ["fused", "chunked"])
@pytest.mark.parametrize("d", [4096, 4099])
def test_large_feature_dims(variant, d):
    """D up to (and past) 4096, a power of two and not (the fused backward keeps all of D on
    chip: it hands over to the chunked one above 512). Same criterion as above."""
    n, m = (300, 200) if CUDA else (5, 7)
    for dtype in (torch.bfloat16, torch.float32):
        q, g, kw = _problem(n, m, d, dtype, seed=d, masks=True)
        _assert_no_worse_than_pytorch(_errors_vs_float64(q, g, kw, "reverse", _triton(variant)),
                                      _errors_vs_float64(q, g, kw, "reverse", _torch_same_dtype), dtype, d)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_output_element_is_written(variant, monkeypatch):
    """Poison every buffer the launcher allocates with NaN: an element left unwritten by a
    kernel (and then read) would reach the loss or the gradients."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
        return t

    monkeypatch.setattr(launch.torch, "empty", poisoned_empty)
    for kl in ("forward", "reverse"):
        for dense in (False, True):
            q, g, kw = _problem(37, 45, 21, torch.float32, seed=3, dense=dense, masks=True)
            errs = _errors_vs_float64(q, g, kw, kl, _triton(variant))
            assert all(e < 1e-5 for e in errs.values()), (kl, dense, errs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunking_does_not_change_the_result(variant):
    """A workspace small enough to force many column chunks gives the same loss and gradients."""
    q, g, kw = _problem(33, 70, 24, torch.float32, seed=11, masks=True)
    results = []
    for workspace in (1 << 30, 1):          # one chunk vs the smallest chunks the tiles allow
        qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()
        loss = sdm_triton.sdm_loss(qa, ga, **kw, backend="triton", kernel_config=variant,
                                   workspace_bytes=workspace, kl="reverse")
        loss.backward()
        results.append((loss.detach(), qa.grad, ga.grad))
    for a, b in zip(*results):
        assert _rel(a, b) < 1e-6


# --------------------------------------------------------------------------- tests that kill the
# mutants of issue 12 section 6 (each one-line bug of kernel work, named in its docstring)

def _stats_float64(q, g, kw, scale):
    """SDMStats's fields from their definition (docs/contract.md, options.SDMStats), in float64
    and independent of both backends: per direction the valid rows (present, with a positive
    among the present columns), the mean over them of the softmax mass on their positives
    (labels > 0 or equal ids), and the mean and max norm of the present samples' raw features."""
    q64, g64 = q.double().cpu(), g.double().cpu()
    n, m = q64.shape[0], g64.shape[0]
    q_keep = kw["q_mask"].cpu() if "q_mask" in kw else torch.ones(n, dtype=torch.bool)
    g_keep = kw["g_mask"].cpu() if "g_mask" in kw else torch.ones(m, dtype=torch.bool)
    if "labels" in kw:
        positive = kw["labels"].cpu() > 0
    else:
        positive = kw["q_ids"].cpu()[:, None] == kw["g_ids"].cpu()[None, :]
    positive = positive & q_keep[:, None] & g_keep[None, :]
    S = scale * torch.nn.functional.normalize(q64, dim=1, eps=1e-12) @ torch.nn.functional.normalize(
        g64, dim=1, eps=1e-12).T
    out = {}
    for name, logits, pos, keep, side in (("q2g", S, positive, q_keep, g_keep),
                                          ("g2q", S.T, positive.T, g_keep, q_keep)):
        P = logits.masked_fill(~side[None, :], -math.inf).softmax(1)      # over the present columns
        valid = keep & pos.any(1)
        out[f"valid_{name}"] = valid.sum()
        mass = torch.where(pos, P, 0.0).sum(1)[valid]
        out[f"pos_prob_{name}"] = mass.mean() if valid.any() else torch.zeros((), dtype=torch.float64)
    for name, x, keep in (("q", q64, q_keep), ("g", g64, g_keep)):
        norms = x.norm(dim=1)[keep]
        out[f"{name}_norm_mean"], out[f"{name}_norm_max"] = norms.mean(), norms.max()
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_statistics_match_the_torch_backend(variant):
    """return_stats=True against the torch backend and both against float64 statistics from
    their definition (`_stats_float64`), at 37 x 45 (N != M: a count of the wrong direction
    shows) where each program walks several column tiles, with masks, ids and dense labels.
    The positive mass is an online statistic that must be rescaled with the running maximum
    (mutant: the rescale dropped, 0.211 vs 0.146); pos_prob_g2q divided by the q2g valid count
    is wrong in both backends alike (issue 26: 0.208 for 0.138), which only float64 sees."""
    for dense in (False, True):
        q, g, kw = _problem(37, 45, 16, torch.float32, seed=12, dense=dense, masks=True)
        want = _stats_float64(q, g, kw, scale=50.0)
        assert want["valid_q2g"] != want["valid_g2q"]
        for kl in ("forward", "reverse"):
            _, ours = sdm_triton.sdm_loss(q, g, **kw, kl=kl, backend="triton", kernel_config=variant + "_seg1",
                                          return_stats=True)
            _, base = sdm_triton.sdm_loss(q, g, **kw, kl=kl, backend="torch", return_stats=True)
            for field in base.__dataclass_fields__:
                torch.testing.assert_close(getattr(ours, field).double(), getattr(base, field).double(),
                                           rtol=1e-5, atol=1e-6, msg=lambda s: f"{field} ({kl}, dense={dense}): {s}")
                for backend, stats in (("triton", ours), ("torch", base)):
                    got = getattr(stats, field).double().cpu()
                    if field.startswith("valid"):
                        assert int(got) == int(want[field]), (backend, field, kl, dense)
                    else:
                        torch.testing.assert_close(
                            got, want[field], rtol=1e-5, atol=1e-6,
                            msg=lambda s: f"{backend} {field} vs float64 ({kl}, dense={dense}): {s}")


#: Feature dims of the fp32 accuracy test: a dot of one BLOCK_K step, of three (D = 160: the
#: forward's BLOCK_K = 64 on the GPU, where the fused backward's BLOCK_D is 256), IRRA's 512,
#: and two more that are no power of two. The interpreter takes three of them (time).
ANTI_ALIGNED_D = [24, 160, 512, 768, 1000] if CUDA else [24, 160, 1000]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("d", ANTI_ALIGNED_D)
def test_anti_aligned_features_at_a_large_scale(variant, kl, d):
    """16 queries against 40 gallery rows pointing the other way, s = 200, fp32 at "ieee"
    precision, several column segments.

    Every logit is far below zero, so a merge of segment statistics that pads the maximum with 0
    instead of -inf (mutant: NaN) or any other finite guess is wrong. And the products of
    anti-aligned rows all have one sign, where an fp32 dot that sums them in one long chain errs
    like D u, 3-4x a BLAS sgemm at D >= 160 (issue 26: 4-5x PyTorch's gradient error on the H100);
    at s = 200 a cosine's error of 1e-7 is 2e-5 in a logit.

    The baseline is the same on every machine: PyTorch's fp32 formula with its matmul replaced by
    an exact emulation of an fp32 dot that sums FMA chains of 16 products (`fp32_dot_cosines`; a
    BLAS sgemm errs about as much, bench/NOTES.md 23). Gradients within 2x of its error; the same
    formula on a sequential chain's cosines must fail that bound (checked here at D >= 160, where
    the chain is more than two steps long), so the test can tell the two apart. The loss itself
    also carries the fp32 rounding of logits near 300 in the log2 domain: 4x, as elsewhere."""
    case = anti_aligned_case(d, kl)
    q, g = case[:2]
    truth = _fp32_formula(*case, cosines=None)
    seg = "" if "seg" in variant else "_seg4"
    ours = _errors(_sdm_rows_and_grads(*case, config=variant + seg), truth)
    base_err = _errors(_fp32_formula(*case, cosines=fp32_dot_cosines(q, g, chain=16)), truth)
    # dL/ds is one scalar whose terms cancel to 1e-3: one rounding draw can be luckily tiny, so its
    # base is the largest error of three good fp32 cosine evaluations (16-chains with and without
    # compensated sums, and the cosines rounded once from float64)
    for cos in (fp32_dot_cosines(q, g, chain=16, compensated=True), _exact_cosines(q, g).float()):
        base_err["ds"] = max(base_err["ds"], _errors(_fp32_formula(*case, cosines=cos), truth)["ds"])
    bound = {key: factor * base_err[key] + slack for key, factor, slack in
             [("rows", 4, 2e-6), ("dq", 2, 2e-6), ("dg", 2, 2e-6), ("ds", 4, 1e-5)]}
    for key in bound:
        assert ours[key] <= bound[key], ("anti-aligned", key, ours, base_err)
    if d >= 160:
        chain = _errors(_fp32_formula(*case, cosines=fp32_dot_cosines(q, g, chain=None)), truth)
        assert chain["dq"] > bound["dq"] or chain["dg"] > bound["dg"], ("the test cannot see the chain", chain, bound)


def anti_aligned_case(d, kl):
    """(q, g, ids, kl, scale, row weights) of the anti-aligned test (tools/gpu_diag_26.py runs it
    too): 16 queries near a random direction, 40 gallery rows near its opposite, 3 identities,
    s = 200, random weights on the per-row losses (CPU tensors)."""
    gen = torch.Generator().manual_seed(13)
    base = torch.randn(1, d, generator=gen)
    q = base + 0.05 * torch.randn(16, d, generator=gen)
    g = -base + 0.05 * torch.randn(40, d, generator=gen)
    ids = torch.arange(16) % 3, torch.arange(40) % 3
    weights = torch.rand(16, generator=gen, dtype=torch.float64), torch.rand(40, generator=gen, dtype=torch.float64)
    return q, g, ids, kl, 200.0, weights


def fp32_dot_cosines(q, g, chain=16, compensated=False):
    """The cosines of fp32 rows ``q`` [N, D], ``g`` [M, D] as an fp32 dot product forms them,
    emulated exactly, so the numbers are the same on every machine (no BLAS): products exact
    (float64), the running sum rounded to fp32 after every addition (an FMA chain) for ``chain``
    products at a time (None: one chain along all of D), the chains' sums added in order
    (``compensated``: with Kahan's compensation, as the kernels' fp32 dot does, kernels/tiles.py);
    then times the rows' inverse norms, rounded once from float64."""
    q64, g64 = q.double().cpu(), g.double().cpu()
    prod = q64[:, None, :] * g64[None, :, :]                                   # [N, M, D], exact
    d = q.shape[1]
    chain = chain or d
    total = torch.zeros(prod.shape[:2], dtype=torch.float32)
    comp = torch.zeros_like(total)
    for k0 in range(0, d, chain):
        part = torch.zeros_like(total)
        for k in range(k0, min(d, k0 + chain)):
            part = (prod[:, :, k] + part.double()).float()
        if compensated:
            y = part - comp
            t = total + y
            comp = (t - total) - y
            total = t
        else:
            total = total + part
    rq, rg = (1 / q64.norm(dim=1)).float(), (1 / g64.norm(dim=1)).float()
    return (total * (rq[:, None] * rg[None, :])).to(q.device)


def _exact_cosines(q, g):
    return torch.nn.functional.normalize(q.double(), dim=1) @ torch.nn.functional.normalize(g.double(), dim=1).T


def _fp32_formula(q, g, ids, kl, scale, weights, cosines):
    """(per-row losses of both directions, dq, dg, dL/ds) of the reference formula (identity
    labels, no masks) in fp32 with the values of ``cosines`` as its S / s, gradients through
    normalise-and-matmul; ``cosines`` None: all of it in float64 (the truth)."""
    from sdm_triton.options import SDMOptions
    from sdm_triton.reference.sdm import _one_direction

    dtype = torch.float64 if cosines is None else torch.float32
    qa, ga = q.to(dtype).clone().requires_grad_(), g.to(dtype).clone().requires_grad_()
    s = torch.tensor(scale, device=q.device, dtype=dtype, requires_grad=True)
    cos = torch.nn.functional.normalize(qa, dim=1) @ torch.nn.functional.normalize(ga, dim=1).T
    if cosines is not None:        # exact: the difference of two close fp32 values, then their sum
        cos = cos + (cosines - cos).detach()
    y = (ids[0][:, None] == ids[1][None, :]).to(device=q.device, dtype=dtype)
    opts = SDMOptions(kl=kl)
    q2g, _ = _one_direction(s * cos, y, opts)
    g2q, _ = _one_direction((s * cos).T, y.T, opts)
    ((q2g.double() * weights[0].to(q.device)).sum() + (g2q.double() * weights[1].to(q.device)).sum()).backward()
    return torch.cat([q2g, g2q]).detach(), qa.grad, ga.grad, s.grad


def _sdm_rows_and_grads(q, g, ids, kl, scale, weights, config):
    """`_fp32_formula`'s quantities from the Triton kernels."""
    qa, ga = q.to(DEVICE).clone().requires_grad_(), g.to(DEVICE).clone().requires_grad_()
    s = torch.tensor(scale, device=DEVICE, requires_grad=True)
    out = sdm_triton.sdm_loss(qa, ga, ids[0].to(DEVICE), ids[1].to(DEVICE), kl=kl, logit_scale=s, reduction="none",
                              backend="triton", kernel_config=config)
    ((out.q2g.double() * weights[0].to(DEVICE)).sum() + (out.g2q.double() * weights[1].to(DEVICE)).sum()).backward()
    return torch.cat([out.q2g, out.g2q]).detach(), qa.grad, ga.grad, s.grad


def _errors(got, truth):
    return dict(zip(("rows", "dq", "dg", "ds"), (_rel(a.cpu(), b.cpu()) for a, b in zip(got, truth))))


def exact_logits_problem(device):
    """(q, g, ids) of the exact-logits test (integer features, a near-perfect fit, five-way
    exact ties for rows 0-2); tools/gpu_diag_18.py runs the same case."""
    gen = torch.Generator().manual_seed(14)
    n, m, d = 21, 35, 8
    q = torch.randint(-3, 4, (n, d), generator=gen).float()
    g = torch.randint(-3, 4, (m, d), generator=gen).float()
    g[:n] = q                                  # row i's own positive is itself: a near-perfect fit
    for i in range(3):                         # rows 0-2: four more gallery rows with the same dot
        for j, (a, b) in enumerate([(0, 1), (2, 3), (4, 5), (6, 7)]):
            v = torch.zeros(d)
            v[a], v[b] = q[i, b], -q[i, a]
            g[n + 4 * i + j] = q[i] + v
    ids_q, ids_g = torch.arange(n), torch.arange(m)
    ids_g[n:] = -1
    return q.to(device), g.to(device), dict(q_ids=ids_q.to(device), g_ids=ids_g.to(device))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("scale", [4.0, 64.0])
def test_exact_logits_give_gradients_to_fp32_accuracy(variant, kl, scale):
    """Integer features and normalize=False: every dot is exact in fp32 and equal dots give
    bit-equal logits, so the gradient can be held to fp32 accuracy relative to itself.

    * s = 4: near-perfect fits (each query's own positive is itself), where P ~ Y.
    * s = 64: five-way exact ties (g = q_i + v, v orthogonal to q_i) at logits ~ 4000, every
      other pair 64 nats or more apart. P = 1/5 exactly needs log P = (t - m) - log2 l with the
      row maximum m and log2 l kept apart: folding them into one fp32 log-sum-exp (m + log2 5,
      rounded at |m| ~ 4000: a mutant) errs 1e-4 in P and 2e-5 to 6e-5 in the gradients,
      against 1e-7 here. (Three-way ties would not show it: log2 3 is within 2e-6 of a
      multiple of 2^-12, the fp32 spacing there.)"""
    q, g, kw = exact_logits_problem(DEVICE)
    torch_fn = _triton(variant)
    qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()
    torch_fn(qa, ga, **kw, kl=kl, logit_scale=scale, normalize=False).backward()
    q64, g64 = q.double().requires_grad_(), g.double().requires_grad_()
    reference.sdm_loss(q64, g64, **kw, kl=kl, logit_scale=scale, normalize=False).backward()
    assert _rel(qa.grad, q64.grad) < 1e-5, _rel(qa.grad, q64.grad)
    assert _rel(ga.grad, g64.grad) < 1e-5, _rel(ga.grad, g64.grad)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dense", [False, True])
def test_a_tile_without_present_columns(variant, dense):
    """The first 16 gallery rows absent: every query's first column tile (and a whole segment)
    holds no present column. The online rescale (m - m') l must not meet -inf * 0 (this gave NaN
    in reverse KL on the GPU before absent columns were placed below the maximum's start)."""
    q, g, kw = _problem(40, 64, 24, torch.float32, seed=15, dense=dense)
    g_mask = torch.ones(64, dtype=torch.bool, device=DEVICE)
    g_mask[:32] = False
    kw["g_mask"] = g_mask
    for kl in ("forward", "reverse"):
        _assert_no_worse_than_pytorch(_errors_vs_float64(q, g, kw, kl, _triton(variant)),
                                      _errors_vs_float64(q, g, kw, kl, _torch_same_dtype), torch.float32, kl)


def test_triton_backend_errors():
    q = torch.randn(4, 8, dtype=torch.float64)
    ids = torch.arange(4)
    with pytest.raises(TypeError, match="float64"):
        sdm_triton.sdm_loss(q, q, ids, ids, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        sdm_triton.sdm_loss(q, q, ids, ids, backend="cuda")
    with pytest.raises(ValueError, match="kernel_config"):
        sdm_triton.sdm_loss(q.float(), q.float(), ids, ids, backend="triton", kernel_config="nope")


@pytest.mark.gpu
@pytest.mark.parametrize("kl,dense", [("reverse", True), ("forward", False), ("reverse", False)])
def test_no_host_synchronisation_in_forward_and_backward(kl, dense):
    """Dense labels (reverse KL), and ids with either KL: the positives' terms from identity
    centroids and, reverse KL, their mass by the gather (launch/positives.py: sorts, binary
    searches, scatters and gathers on the device; the gather's loop bound is read in the kernel)."""
    for cfg in (("fused", "chunked") if dense else ("fused_centroids", "chunked_centroids")):
        q, g, kw = _problem(512, 640, 128, torch.bfloat16, seed=1, masks=True, dense=dense)
        q.requires_grad_()
        g.requires_grad_()
        ls = torch.tensor(30.0, device="cuda", requires_grad=True)
        sdm_triton.sdm_loss(q, g, logit_scale=ls, kernel_config=cfg, kl=kl, **kw).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sdm_triton.sdm_loss(q, g, logit_scale=ls, kernel_config=cfg, kl=kl, **kw).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_64bit_offsets_beyond_2_pow_31_logits():
    """N * M > 2^31 with dense (bool) labels: the label tile's offsets pass 2^31 (mutant: int32
    offsets). The torch backend is the comparison."""
    n = m = 47000                       # 2.2e9 label entries (2.2 GB of bool)
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(n, 32, device="cuda", generator=gen).to(torch.bfloat16)
    g = torch.randn(m, 32, device="cuda", generator=gen).to(torch.bfloat16)
    ids = torch.arange(n, device="cuda") // 4
    labels = ids[:, None] == ids[None, :]
    losses = []
    for backend, kw in (("triton", dict(labels=labels)), ("torch", dict(q_ids=ids, g_ids=ids))):
        qa = q.clone().requires_grad_()
        loss = sdm_triton.sdm_loss(qa, g, **kw, backend=backend, workspace_bytes=2**30)
        loss.backward()
        losses.append((loss.detach(), qa.grad.float()))
    del labels
    assert _rel(losses[0][0], losses[1][0]) < 1e-5
    assert _rel(losses[0][1], losses[1][1]) < 2e-2


@pytest.mark.gpu
def test_64bit_offsets_beyond_2_pow_31_features():
    """N * D > 2^31: the feature rows' offsets pass 2^31 (mutant: int32 offsets)."""
    n, m, d = 1 << 20, 64, 2056          # 2.16e9 elements of q (4.3 GB in bf16)
    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(n, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    g = torch.randn(m, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    q_ids = torch.randint(0, 64, (n,), device="cuda", generator=gen)
    g_ids = torch.arange(m, device="cuda")
    sel = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
    out = sdm_triton.sdm_loss(q, g, q_ids, g_ids, reduction="none", backend="triton")
    part = reference.sdm_loss(q[sel].double(), g.double(), q_ids[sel], g_ids, reduction="none")
    torch.testing.assert_close(out.q2g[sel].double(), part.q2g, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- issue 23's mutants
# One-line kernel bugs the suite once let through; tools/mutants.py reapplies each.

def _near_fits(n, d, fit, dtype, seed, k=4):
    """k samples per identity on each side, pulled towards their identity's centre by ``fit``
    (0.9: positive cosines ~0.99, a near-perfect fit where P ~ Y and the products cancel; the
    construction of ../shared/yardsticks/w_rounding.py). Half-valued features, on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) // k
    base = torch.randn(n // k + 1, d, generator=gen, dtype=torch.float64)[ids]
    q = fit * base + (1 - fit) * torch.randn(n, d, generator=gen, dtype=torch.float64)
    g = fit * base + (1 - fit) * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return (3 * q).to(DEVICE, dtype), (3 * g).to(DEVICE, dtype), ids.to(DEVICE)


def _grads(fn, q, g, ids, grad_out=1.0, **kw):
    qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()
    (fn(qa, ga, ids, ids, **kw) * grad_out).backward()
    return qa.grad, ga.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("config", ["chunked", "fused"])
@pytest.mark.parametrize("fit", [0.9, 0.95])
def test_half_gradients_of_near_perfect_fits(dtype, config, fit):
    """Positive cosines ~0.99 / 0.997 (fit 0.9 / 0.95), s = 50: the gradient is a small difference
    of large terms, carried by W's lo half. The kernel's gradient is within 4x of rounding the
    exact gradient to the dtype (SPEC, precision). With lo's sign flipped (mutant lo_sign, and
    its interpreter twin for bf16) W errs by twice lo: 10-30x that rounding."""
    n, d = (256, 128) if CUDA else (24, 40)
    q, g, ids = _near_fits(n, d, fit, dtype, seed=21)
    ours = _grads(_triton(config), q, g, ids, logit_scale=50.0)
    exact = _grads(reference.sdm_loss, q.double(), g.double(), ids, logit_scale=50.0)
    for o, e in zip(ours, exact):
        rounding = _rel(e.to(dtype), e)
        assert _rel(o, e) <= 4 * rounding, (_rel(o, e), rounding)


# --------------------------------------------------------------------------- issue 27: fp16 W
# KernelConfig.w_dtype="fp16" ("wfp16"): the backward's W rounded once to fp16 and the operands in
# fp16, one product per side, where "split" ("wsplit", what "auto" is) keeps hi + lo halves.

def _unrounded_grads(q, g, ids, config, scale, kl="forward"):
    """(dq, dg) of the Triton backend in fp32, before the rounding to the input dtype (the
    backward's ``partial_grads``, which the distributed strategies sum): the error of the
    products alone, which the rounding to bf16 (truncating in the interpreter) would hide."""
    from sdm_triton.launch import TritonBackend
    from sdm_triton.options import KernelConfig
    p = _problem_object(q, KernelConfig.parse(config), g=g, ids=ids, scale_value=scale, workspace_bytes=1 << 26, kl=kl)
    be = TritonBackend()
    out = be.forward(p)
    dq, dg, _ = be.backward(p, out, torch.ones((), device=q.device), None, (True, True, False), partial_grads=True)
    assert dq.dtype == dg.dtype == torch.float32
    return dq, dg


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("config", ["chunked_wfp16", "fused_wfp16"])
@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("dense,masks", [(False, False), (True, True)])
def test_fp16_w_gradients_match_float64(dtype, config, kl, dense, masks):
    """fp16 W, random features (positive cosines ~0, where one rounding of W costs a fraction of
    the gradient's own rounding: ../shared/yardsticks/w_rounding.py): the gradients are within
    4x of rounding the exact gradient to the input dtype (SPEC, precision), ids or dense labels,
    masks, both divergences, both backward paths; dL/ds (which W does not enter) to fp32 accuracy."""
    n, m, d = (300, 457, 512) if CUDA else (37, 45, 33)
    q, g, kw = _problem(n, m, d, dtype, seed=27, dense=dense, masks=masks)
    ours = _weighted_run(q, g, kw, kl, _triton(config))
    exact = _weighted_run(q, g, kw, kl, reference.sdm_loss, dtype=torch.float64)
    assert _rel(ours[3], exact[3]) <= 1e-5, (ours[3], exact[3])            # dL/ds: fp32 accuracy
    for o, e in zip(ours[1:3], exact[1:3]):
        rounding = _rel(e.to(dtype), e)
        assert _rel(o, e) <= 4 * rounding, (_rel(o, e), rounding)


@pytest.mark.parametrize("dtype,fits", [(torch.bfloat16, (0.5, 0.9)), (torch.float16, (0.0, 0.5))],
                         ids=["bfloat16", "float16"])
@pytest.mark.parametrize("path", ["chunked", "fused"])
def test_fp16_w_is_one_rounding_of_w(dtype, fits, path):
    """The products' own error (fp32 gradients, before their rounding to the input dtype), s = 50:
    fp16 W errs by one rounding of W carried through the products, within 4x of rounding the
    exact gradient to the input dtype (SPEC's allowance: bf16 up to positive cosines of 0.99, fit
    0.9 here; fp16 inputs, whose own rounding is 8x finer, at moderate fits only), and at least
    4x the error of hi + lo (~16 bits of W; interpreter: 10-40x less): the option is in effect
    (mutant fp16_w_unrounded: W left in fp32 errs as hi + lo does)."""
    n, d = (256, 128) if CUDA else (24, 40)
    for fit in fits:
        q, g, ids = _near_fits(n, d, fit, dtype, seed=27)
        exact = _grads(reference.sdm_loss, q.double(), g.double(), ids, logit_scale=50.0)
        ours = _unrounded_grads(q, g, ids, f"{path}_wfp16", 50.0)
        split = _unrounded_grads(q, g, ids, f"{path}_wsplit", 50.0)
        for o, s, e in zip(ours, split, exact):
            rounding = _rel(e.to(dtype), e)
            assert 4 * _rel(s, e) <= _rel(o, e) <= 4 * rounding, (fit, _rel(o, e), _rel(s, e), rounding)


@pytest.mark.parametrize("path", ["chunked", "fused"])
def test_w_dtype_changes_only_the_half_inputs_backward(path):
    """KernelConfig.w_dtype touches the backward of half inputs alone: the loss is the same bits
    whatever it says, fp32 inputs get the same gradients bit for bit (one fp32 W product either
    way), half inputs' "auto" is "split" bit for bit and "fp16" differs (so that the tests above
    cannot pass with the option ignored). `launch.policy.w_dtype_path` says which form runs
    (normalize=False too: fp16 W's scale carries the rows' norms there,
    tests/test_edge_values.py's unnormalised tests)."""
    from sdm_triton.launch.policy import w_dtype_path
    from sdm_triton.options import KernelConfig
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, g, kw = _problem(21, 35, 16, dtype, seed=28, masks=True)
        runs = {}
        for w in ("auto", "split", "fp16"):
            qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()
            config = f"{path}_w{w}" if w != "auto" else path
            loss = _triton(config)(qa, ga, logit_scale=20.0, **kw)
            loss.backward()
            runs[w] = (loss.detach(), qa.grad, ga.grad)
            path_of = w_dtype_path(_problem_object(q, KernelConfig.parse(config)))
            assert path_of == ("fp32" if dtype == torch.float32 else "fp16" if w == "fp16" else "split"), (dtype, w)
        for w in ("split", "fp16"):
            assert torch.equal(runs[w][0], runs["auto"][0]), (dtype, w)
        assert all(torch.equal(a, b) for a, b in zip(runs["split"], runs["auto"])), dtype
        same = [torch.equal(a, b) for a, b in zip(runs["fp16"][1:], runs["split"][1:])]
        assert same == ([True, True] if dtype == torch.float32 else [False, False]), (dtype, same)
        unnormalised = _problem_object(q, KernelConfig(w_dtype="fp16"), normalize=False)
        assert w_dtype_path(unnormalised) == ("fp32" if dtype == torch.float32 else "fp16"), dtype


def _problem_object(q, config, g=None, ids=None, dense=False, scale_value=1.0, workspace_bytes=1, **options):
    """A Problem of features ``q`` (and ``g``, else q again) and ``config`` as the API builds it,
    for the launch layer's choices and calls: identity labels ``ids`` (else one identity per
    row), or dense labels of ones."""
    from sdm_triton.options import SDMOptions
    from sdm_triton.problem import Problem
    g = q if g is None else g
    ids = torch.arange(q.shape[0], device=q.device) if ids is None else ids
    return Problem(q=q, g=g, q_ids=None if dense else ids, g_ids=None if dense else ids,
                   labels=torch.ones(q.shape[0], g.shape[0], device=q.device) if dense else None, q_mask=None,
                   g_mask=None, scale=None, scale_value=scale_value, options=SDMOptions(**options), config=config,
                   workspace_bytes=workspace_bytes, galleries=1, scalar_value=True, return_stats=False)


@pytest.mark.parametrize("config", ["fused_tiles", "chunked_tiles", "fused_centroids", "chunked_centroids"])
@pytest.mark.parametrize("sigma", [1.0, 0.5, 0.2])
def test_reverse_kl_gradients_at_well_separated_fits(config, sigma):
    """IRRA's settings (reverse KL, eps = 1e-8, s = 50, the directions summed), one positive per
    row, g = q + sigma * noise (positive cosines ~0.7 to ~0.98): each row's loss is ~ -eps and the
    gradient 1e-9 to 1e-12, carried by the negatives' softmax mass. The kernels' fp32 gradient is
    within 4x of the plain formula's own fp32 error (docs/contract.md; the formula users write,
    bench.methods.formula_sdm, is "PyTorch computing the same formula"). Finish once formed the
    negatives' mass as 1 - P+, which keeps nothing of it here: the gradient 0.3-21x off (mutant
    neg_as_one_minus_pos; bench/NOTES.md 37); the centroids path's gather, since removed, formed
    it as l - pos after the loop, with the same result (bench/NOTES.md 38)."""
    n, d = (256, 128) if CUDA else (24, 64)
    gen = torch.Generator().manual_seed(31)
    q = torch.randn(n, d, generator=gen)
    g = q + sigma * torch.randn(n, d, generator=gen)
    q, g = q.to(DEVICE), g.to(DEVICE)
    ids = torch.arange(n, device=DEVICE)
    kw = dict(logit_scale=50.0, kl="reverse", eps=1e-8, combine="sum")
    exact = _grads(reference.sdm_loss, q.double(), g.double(), ids, **kw)
    ours = _grads(_triton(config), q, g, ids, **kw)
    formula = _grads(functools.partial(formula_sdm, scale=50.0, kl="reverse", eps=1e-8, combine="sum"), q, g, ids)
    for o, f, e in zip(ours, formula, exact):
        assert _rel(o, e) <= 4 * _rel(f, e) + 16 * 2.0**-24, (_rel(o, e), _rel(f, e))


@pytest.mark.parametrize("config", ["chunked", "fused"])
def test_fp16_gradients_with_negative_weights(config):
    """(-loss).backward(): every row weight is negative. The fp16 workspace divides W by the
    largest |w| (mutant gmax_signed: by max w, which is <= 0 here: W overflows)."""
    q, g, kw = _problem(37, 45, 33, torch.float16, seed=22)
    ids_q, ids_g = kw["q_ids"], kw["g_ids"]
    for sign in (-1.0, -1e-3):
        qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()
        (sign * _triton(config)(qa, ga, ids_q, ids_g, logit_scale=20.0)).backward()
        q64, g64 = q.double().requires_grad_(), g.double().requires_grad_()
        (sign * reference.sdm_loss(q64, g64, ids_q, ids_g, logit_scale=20.0)).backward()
        assert _rel(qa.grad, q64.grad) < 4e-3 and _rel(ga.grad, g64.grad) < 4e-3, (sign, _rel(qa.grad, q64.grad))


def test_learnable_scale_over_chunks_of_unequal_width():
    """The chunked backward over 3 chunks of columns, the last one narrower: dL/ds sums only
    the current chunk's tile partials (mutant dscale_stale: stale rows of an earlier, wider
    chunk were summed again)."""
    block_n = 64 if CUDA else 16                           # the chunked W kernel's column tile
    n, m, d = 24, 2 * block_n + block_n // 2, 16
    q, g, kw = _problem(n, m, d, torch.float32, seed=23)
    width_bytes = n * 4 * block_n                           # one column tile per chunk ...
    for ws in (width_bytes, 2 * width_bytes):               # ... or two: 2 + 1 tiles
        ls = torch.tensor(20.0, device=DEVICE, requires_grad=True)
        _triton("chunked")(q, g, logit_scale=ls, workspace_bytes=ws, **kw).backward()
        ls64 = torch.tensor(20.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
        reference.sdm_loss(q.double(), g.double(), logit_scale=ls64, **kw).backward()
        assert abs(ls.grad.item() - ls64.grad.item()) <= 1e-5 * abs(ls64.grad.item()) + 1e-7, (ws, ls.grad, ls64.grad)


@pytest.mark.parametrize("config", ["fused", "chunked"])
@pytest.mark.parametrize("frozen", ["q", "g", "both"])
def test_learnable_scale_with_frozen_features(config, frozen):
    """A frozen tower and a learnable temperature (CLIP's fine-tuning of one side): dL/ds is
    right when q, g or both need no gradient (mutant no_q_programs: the fused kernel launched no
    q programs without dq, and its dL/ds, summed there, was 0)."""
    q, g, kw = _problem(37, 45, 33, torch.float32, seed=24)
    qa = q.clone().requires_grad_(frozen not in ("q", "both"))
    ga = g.clone().requires_grad_(frozen not in ("g", "both"))
    ls = torch.tensor(20.0, device=DEVICE, requires_grad=True)
    _triton(config)(qa, ga, logit_scale=ls, **kw).backward()
    ls64 = torch.tensor(20.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    reference.sdm_loss(q.double(), g.double(), logit_scale=ls64, **kw).backward()
    assert abs(ls.grad.item() - ls64.grad.item()) <= 1e-5 * abs(ls64.grad.item()), (ls.grad, ls64.grad)


def test_statistics_tiles_follow_the_label_terms(monkeypatch):
    """A large problem whose loop sums label terms (dense labels, or positives="tiles") takes the
    "stats_labels" tiles, one whose loop does not (the centroids) the "stats" tiles; the
    backwards' dot step (block_k) is the statistics pass's either way."""
    from sdm_triton.launch import policy
    from sdm_triton.launch.tiles import _stats_tiles
    from sdm_triton.options import KernelConfig

    monkeypatch.setattr(policy, "interpreting", lambda: False)
    monkeypatch.setattr(policy, "LARGE_LOGITS", 9)
    monkeypatch.setattr(policy, "CENTROIDS_LOGITS", 9)
    q = torch.randn(3, 4, dtype=torch.bfloat16)

    def tiles(positives="auto", dense=False):
        return _stats_tiles(_problem_object(q, KernelConfig(positives=positives), dense=dense))

    labels_tiles, plain = policy.TILES[("stats_labels", "large", "half")], policy.TILES[("stats", "large", "half")]
    assert labels_tiles != plain and labels_tiles.block_k == plain.block_k
    assert tiles() == plain and tiles("centroids") == plain
    assert tiles("tiles") == labels_tiles and tiles(dense=True) == labels_tiles


def test_tile_table_covers_every_pass_size_class_and_dtype():
    """sdm_triton.launch.policy.TILES answers every (pass, size class, dtype) table_tiles can ask
    for, the GPU's size classes included (a class or pass added without its tiles would fail
    only on a GPU, at that size), and the backwards leave block_k to the statistics pass."""
    from sdm_triton.launch import policy
    classes = {"stats": ("small", "medium", "large"), "stats_labels": ("small", "medium", "large"),
               "chunked": ("small", "medium", "large"),
               "fused": ("narrow", "wide"), "prep": ("any",), "max_weight": ("any",), "finish": ("any",),
               "weights": ("any",), "operand": ("any",), "centroids": ("any",), "ranks": ("any",)}
    def answered(kind, size, dtype):
        return ((kind, size, dtype) in policy.TILES or (kind, size, "any") in policy.TILES
                or (kind in policy.TILES_FALLBACK and answered(policy.TILES_FALLBACK[kind], size, dtype)))

    for kind, sizes in classes.items():
        for size in ("interpreter", *sizes):
            for dtype in ("half", "fp32"):
                assert answered(kind, size, dtype), (kind, size, dtype)
    assert {kind for kind, _, _ in policy.TILES} == set(classes)
    assert all(t.block_k is None for (kind, _, _), t in policy.TILES.items() if kind in ("fused", "chunked"))
