"""The torch backend's two paths (issue 28): dense (S [K, N, M] at once, one pass, both
directions side by side) and chunked over columns, forced by ``workspace_bytes``, agree to
float64 rounding with each other and with the reference on adversarial inputs: masks, rows and
columns without a match, duplicate ids, tiny and huge temperatures, dense labels with zero rows,
both KL directions, every direction / combine / reduction option, K > 1 galleries, N != M and
N = M (the dense path's stacked block), ``normalize=False``; and in fp32 / bf16 / fp16 to fp32
rounding. Tens of rows: CPU only, seconds."""

import math

import pytest
import torch

from sdm_triton import reference
from sdm_triton.torch_backend import DENSE_TEMPORARIES, TorchBackend
import sdm_triton

DENSE_WS = 1 << 30      # the dense path for every case below
CHUNKED_WS = (1, 700)   # one column per chunk; a few columns per chunk (not dividing M)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _agree(field, a, b, tol, n, m, k):
    """Relative agreement within ``tol``; for d_logit_scale = sum_ij dS_ij cos_ij, which cancels
    (the result can be 1e-5 of its terms), relative to sum |dS_ij| <= sum_i 2 w_i <= 2 * 1.5 per
    softmax row (`_run`'s weights are at most 1.5) instead of to the result."""
    if field == "ds":
        return (a.double() - b.double()).abs().item() < tol * 3 * (n + m) * max(k, 1)
    return _rel(a, b) < tol


def _case(name, seed=0):
    """(n, m, k, kwargs) of a named adversarial case: kwargs of sdm_loss_multi (K > 1) or
    sdm_loss (k = 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = lambda c, groups: torch.randint(0, groups, (c,), generator=gen)   # noqa: E731
    bern = lambda *shape: torch.rand(*shape, generator=gen) > 0.3           # noqa: E731
    if name == "square_ids":          # duplicate ids, every row matched
        n = 12
        i = torch.arange(n) // 3
        return n, n, 0, dict(q_ids=i, g_ids=i[torch.randperm(n, generator=gen)])
    if name == "unmatched_rows":      # rows and columns without a match, N != M
        return 9, 14, 0, dict(q_ids=ids(9, 6), g_ids=ids(14, 8))
    if name == "masks":               # absent samples (NaN in them), unmatched rows, N = M
        q_mask, g_mask = bern(11), bern(11)
        return 11, 11, 0, dict(q_ids=ids(11, 4), g_ids=ids(11, 4), q_mask=q_mask, g_mask=g_mask)
    if name == "dense_labels":        # soft labels with zero rows and columns, a mask
        lab = torch.rand(10, 13, generator=gen) * bern(10, 13)
        lab[2] = 0
        lab[:, 5] = 0
        return 10, 13, 0, dict(labels=lab, q_mask=bern(10))
    if name == "dense_square":
        lab = torch.rand(9, 9, generator=gen) * bern(9, 9)
        lab[:, 1] = 0
        return 9, 9, 0, dict(labels=lab, g_mask=bern(9))
    if name == "galleries":           # K = 3, per-gallery ids and masks, N = M
        return 8, 8, 3, dict(q_ids=ids(8, 3), g_ids=torch.randint(0, 3, (3, 8), generator=gen),
                             q_mask=bern(8), g_mask=torch.stack([bern(8) for _ in range(3)]))
    if name == "galleries_dense":     # K = 2, dense labels per gallery, N != M
        return 7, 10, 2, dict(labels=torch.rand(2, 7, 10, generator=gen) * (torch.rand(2, 7, 10, generator=gen) > 0.4))
    raise ValueError(name)


CASES = ["square_ids", "unmatched_rows", "masks", "dense_labels", "dense_square", "galleries", "galleries_dense"]
OPTIONS = [dict(kl="forward"), dict(kl="reverse"), dict(kl="reverse", eps=1e-2, reduction="sum", combine="sum"),
           dict(kl="forward", reduction="none"), dict(kl="reverse", direction="g2q", reduction="none"),
           dict(kl="forward", direction="q2g", normalize=False)]
SCALES = [0.1, 50.0, 200.0]     # the contract's temperatures: 10, 0.02 and 0.005


def _inputs(n, m, k, dtype, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    q = torch.randn(n, 6, generator=gen) * torch.exp(torch.rand(n, 1, generator=gen) * 2 - 1)
    g = torch.randn(*((k,) if k else ()), m, 6, generator=gen)
    return q.to(dtype), g.to(dtype)


def _run(n, m, k, kw, q, g, scale, options, fn=None, tensor_scale=True, **call):
    """(value or rows, dq, dg, d_logit_scale) of one call, the scale a tensor that requires grad
    (else a float: d_logit_scale None); absent samples hold NaN."""
    q, g = q.clone(), g.clone()
    if "q_mask" in kw:
        q[~kw["q_mask"]] = float("nan")
    if "g_mask" in kw:
        g[~kw["g_mask"]] = float("nan")
    q.requires_grad_(True)
    g.requires_grad_(True)
    ls = scale
    if tensor_scale:
        ls = torch.tensor(scale, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                          requires_grad=True)
    if fn is None:
        fn = sdm_triton.sdm_loss_multi if k else sdm_triton.sdm_loss
    kw = {key: (v.to(q.dtype) if key == "labels" else v) for key, v in kw.items()}
    out = fn(q, g, **kw, logit_scale=ls, **options, **call)
    if options.get("reduction") == "none":
        parts = [x for x in (out.q2g, out.g2q) if x is not None]
        value = torch.cat([x.flatten() for x in parts])
        total = sum((x * torch.linspace(0.5, 1.5, x.numel()).to(x).view_as(x)).sum() for x in parts)
    else:
        value = out
        total = out.sum()
    total.backward()
    return value.detach(), q.grad, g.grad, (ls.grad if tensor_scale else None)


@pytest.fixture
def path_counter(monkeypatch):
    """Counts the calls that took the dense path: its statistics, or a plain problem's forward
    (`TorchBackend._plain_forward`, when it did not hand over to them)."""
    calls = []
    original = TorchBackend._dense_statistics
    original_plain = TorchBackend._plain_forward

    def counted(self, p, prep):
        calls.append((p.n, p.m))
        return original(self, p, prep)

    def counted_plain(self, p):
        out = original_plain(self, p)
        if out is not None:
            calls.append((p.n, p.m))
        return out
    monkeypatch.setattr(TorchBackend, "_dense_statistics", counted)
    monkeypatch.setattr(TorchBackend, "_plain_forward", counted_plain)
    return calls


@pytest.mark.parametrize("scale_kind", ["tensor", "float"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
@pytest.mark.parametrize("name", CASES)
def test_dense_and_chunked_paths_agree_float64(name, options, scale_kind, path_counter):
    """A float scale without masks takes the dense path's unguarded form (`TorchBackend._bounded`)."""
    n, m, k, kw = _case(name)
    tensor_scale = scale_kind == "tensor"
    q, g = _inputs(n, m, k, torch.float64, seed=CASES.index(name))
    ref_fn = reference.sdm_loss_multi if k else reference.sdm_loss
    for scale in SCALES:
        path_counter.clear()
        dense = _run(n, m, k, kw, q, g, scale, options, backend="torch", workspace_bytes=DENSE_WS,
                     tensor_scale=tensor_scale)
        assert path_counter, "the dense path did not run"
        ref = _run(n, m, k, kw, q, g, scale, options, fn=ref_fn, tensor_scale=tensor_scale)
        for field, a, b in zip(("value", "dq", "dg", "ds"), dense, ref):
            if a is None:
                continue
            assert torch.isfinite(a).all(), (field, scale)
            assert _rel(a, b) < 1e-10, (field, scale, _rel(a, b))
        for ws in CHUNKED_WS:
            path_counter.clear()
            chunked = _run(n, m, k, kw, q, g, scale, options, backend="torch", workspace_bytes=ws,
                           tensor_scale=tensor_scale)
            assert not path_counter, "the chunked path took the dense statistics"
            # the paths sum the rows' terms in another order; those terms hold ln P in [-2 s, 0]
            tol = 1e-13 * max(1.0, scale)
            for field, a, b in zip(("value", "dq", "dg", "ds"), dense, chunked):
                if a is None:
                    continue
                assert _agree(field, a, b, tol, n, m, k), (field, scale, ws, _rel(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["masks", "galleries_dense"])
def test_dense_and_chunked_paths_agree_low_precision(name, dtype, path_counter):
    """Half and fp32 features: the same fp32 math on both paths (fp32 rounding apart), gradients
    in the input dtype (a rounding of it apart)."""
    n, m, k, kw = _case(name, seed=3)
    q, g = _inputs(n, m, k, dtype, seed=3)
    for options in (dict(kl="forward"), dict(kl="reverse")):
        dense = _run(n, m, k, kw, q, g, 50.0, options, backend="torch", workspace_bytes=DENSE_WS)
        assert path_counter
        chunked = _run(n, m, k, kw, q, g, 50.0, options, backend="torch", workspace_bytes=1)
        grad_tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
        for field, a, b in zip(("value", "dq", "dg", "ds"), dense, chunked):
            assert a.dtype == b.dtype, field
            assert _agree(field, a, b, 1e-5 if field in ("value", "ds") else grad_tol, n, m, k), \
                (field, options, _rel(a, b))


def test_the_dense_path_is_chosen_by_the_workspace(path_counter):
    """Dense exactly when DENSE_TEMPORARIES copies of S [K, N, M] (compute dtype) fit the
    workspace; the statistics then run once per call."""
    n, m, k, kw = _case("galleries")
    q, g = _inputs(n, m, k, torch.float32, seed=0)
    need = DENSE_TEMPORARIES * k * n * m * 4
    for ws, dense in ((need, True), (need - 1, False)):
        path_counter.clear()
        sdm_triton.sdm_loss_multi(q, g, **kw, backend="torch", workspace_bytes=ws)
        assert bool(path_counter) == dense, ws


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_bad_features_on_the_unguarded_dense_path(kl, path_counter):
    """No masks, a float scale (the dense path without its -inf guards): a zero feature row is
    fine and equal on both paths; a NaN or an inf feature of a present sample makes the loss NaN
    on both paths, never a finite number."""
    n = 8
    gen = torch.Generator().manual_seed(5)
    ids = torch.arange(n) // 2
    for bad in (0.0, float("nan"), float("inf")):
        q, g = torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randn(n, 5, generator=gen,
                                                                                dtype=torch.float64)
        q[3] = bad
        losses = []
        for ws in (DENSE_WS, 1):
            path_counter.clear()
            losses.append(sdm_triton.sdm_loss(q, g, ids, ids, temperature=0.02, kl=kl, backend="torch",
                                              workspace_bytes=ws))
            assert bool(path_counter) == (ws == DENSE_WS)
        if bad == 0.0:
            assert torch.isfinite(losses[0]) and _rel(losses[0], losses[1]) < 1e-12
        else:
            assert torch.isnan(losses[0]) and torch.isnan(losses[1]), (bad, losses)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("labels", ["ids", "dense"])
@pytest.mark.parametrize("case", ["plain", "unmatched_row", "zero_row", "huge_norm", "nan_feature", "bad_label"])
def test_the_plain_lane_is_the_dense_path(case, labels, kl, dtype, monkeypatch):
    """A plain problem (`TorchBackend._plain`: one gallery, N = M, no masks, a float scale) takes
    `_plain_forward` where no guard applies, and hands over to the general dense path where one
    does (an invalid row, a norm at the guards' edges, a NaN feature or label): the same loss
    and gradients either way, to rounding (float64: 1e-12; fp32: 1e-6)."""
    n = 9
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    ids = torch.arange(n) // 2
    kw = dict(kl=kl, temperature=0.1)
    if labels == "ids":
        kw.update(q_ids=ids, g_ids=ids.flip(0))
    else:
        kw["labels"] = (ids[:, None] == ids.flip(0)[None, :]).double() * (0.5 + torch.rand(n, n, generator=gen,
                                                                                          dtype=torch.float64))
    if case == "unmatched_row":
        if labels == "ids":
            kw["q_ids"] = torch.cat([ids[:-1], torch.tensor([99])])
        else:
            kw["labels"][3] = 0
    elif case == "zero_row":
        q[2] = 0
    elif case == "huge_norm":
        g[4] *= 1e25
    elif case == "nan_feature":
        q[1, 0] = math.nan
    elif case == "bad_label":
        if labels == "ids":
            pytest.skip("identity labels have no bad weight")
        kw["labels"][0, 0] = -1.0
    q, g = q.to(dtype), g.to(dtype)
    if "labels" in kw:
        kw["labels"] = kw["labels"].to(dtype)
    taken = []
    original = TorchBackend._plain_forward

    def lane(self, p):
        out = original(self, p)
        taken.append(out is not None)
        return out

    def run():
        qq, gg = q.clone().requires_grad_(), g.clone().requires_grad_()
        value = sdm_triton.sdm_loss(qq, gg, backend="torch", **kw)
        value.backward()
        return value.detach(), qq.grad, gg.grad

    monkeypatch.setattr(TorchBackend, "_plain_forward", lane)
    plain = run()
    assert taken == [case == "plain"], taken
    monkeypatch.setattr(TorchBackend, "_plain", lambda self, p: False)
    general = run()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for field, a, b in zip(("value", "dq", "dg"), plain, general):
        # NaN where the contract says so (a NaN feature or label, an fp32 norm from 2^64): alike
        assert torch.equal(torch.isnan(a), torch.isnan(b)), field
        if torch.isnan(a).any():
            assert case in ("nan_feature", "bad_label", "huge_norm"), (field, case)
            continue
        assert _rel(a, b) < tol, (field, _rel(a, b))
