"""Presets against transcriptions of the published code they claim to reproduce.

Each ``*_published`` function below is transcribed from the file named in its
docstring, changed only where noted (mostly ``.float()`` -> the input dtype, so the
float64 comparison is not limited by float32 labels). Every preset is checked on the
chunked torch backend of sdm_triton and on the reference, loss and gradients, in
float64 with a tight tolerance.
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from sdm_triton import reference
import sdm_triton
from sdm_triton.presets import (
    PRESETS,
    SDMPreset,
    get_preset,
    preset_kwargs,
    preset_loss,
    seed_temperature,
    tbps_logit_scale,
)

IMPLS = {
    "torch": functools.partial(sdm_triton.sdm_loss, backend="torch"),
    "reference": reference.sdm_loss,
}
TOL = dict(rtol=1e-9, atol=1e-12)
SHAPES = [(12, 9), (64, 512)]


# --------------------------------------------------------------------------- transcriptions

def irra_compute_sdm_published(image_fetures, text_fetures, pid, logit_scale, image_id=None, factor=0.3,
                               epsilon=1e-8):
    """anosorae/IRRA, model/objectives.py::compute_sdm (labels built in the input dtype)."""
    dtype = image_fetures.dtype
    batch_size = image_fetures.shape[0]
    pid = pid.reshape((batch_size, 1))  # make sure pid size is [batch_size, 1]
    pid_dist = pid - pid.t()
    labels = (pid_dist == 0).to(dtype)

    if image_id is not None:
        image_id = image_id.reshape((-1, 1))
        image_id_dist = image_id - image_id.t()
        image_id_mask = (image_id_dist == 0).to(dtype)
        labels = (labels - image_id_mask) * factor + image_id_mask

    image_norm = image_fetures / image_fetures.norm(dim=1, keepdim=True)
    text_norm = text_fetures / text_fetures.norm(dim=1, keepdim=True)

    t2i_cosine_theta = text_norm @ image_norm.t()
    i2t_cosine_theta = t2i_cosine_theta.t()

    text_proj_image = logit_scale * t2i_cosine_theta
    image_proj_text = logit_scale * i2t_cosine_theta

    # normalize the true matching distribution
    # (sum(dim=1) without keepdim broadcasts over columns: element (i, j) is divided by
    #  row sum j. For identity labels row sums i and j agree wherever labels_ij != 0.)
    labels_distribute = labels / labels.sum(dim=1)

    i2t_pred = F.softmax(image_proj_text, dim=1)
    i2t_loss = i2t_pred * (F.log_softmax(image_proj_text, dim=1) - torch.log(labels_distribute + epsilon))
    t2i_pred = F.softmax(text_proj_image, dim=1)
    t2i_loss = t2i_pred * (F.log_softmax(text_proj_image, dim=1) - torch.log(labels_distribute + epsilon))

    loss = torch.mean(torch.sum(i2t_loss, dim=1)) + torch.mean(torch.sum(t2i_loss, dim=1))
    return loss


def irra_compute_itc_published(image_features, text_features, logit_scale):
    """anosorae/IRRA, model/objectives.py::compute_itc (CLIP's InfoNCE)."""
    batch_size = image_features.shape[0]
    labels = torch.arange(start=0, end=batch_size, dtype=torch.int64)
    labels = labels.to(image_features.device)

    image_norm = image_features / image_features.norm(dim=-1, keepdim=True)
    text_norm = text_features / text_features.norm(dim=-1, keepdim=True)

    logits_per_image = logit_scale * image_norm @ text_norm.t()
    logits_per_text = logits_per_image.t()

    loss_i = F.cross_entropy(logits_per_image, labels)
    loss_t = F.cross_entropy(logits_per_text, labels)
    loss = (loss_i + loss_t) / 2
    return loss


def tbps_ritc_published(image_features, text_features, ids, log_logit_scale, eps=1e-2,
                        image_features_gathered=None, text_features_gathered=None, gathered_ids=None):
    """Flame-Chasers/TBPS-CLIP, model/tbps_model.py, CLIP.forward (logit scale, sim_targets, ritc).

    ``*_gathered`` stand in for ``self.all_gather(...)`` (the features of every rank);
    without them the run is single-process and all_gather returns its input.
    """
    image_features_norm = F.normalize(image_features)
    text_features_norm = F.normalize(text_features)
    image_features_norm_gathered = F.normalize(
        image_features if image_features_gathered is None else image_features_gathered)
    text_features_norm_gathered = F.normalize(
        text_features if text_features_gathered is None else text_features_gathered)

    logit_scale = log_logit_scale.exp()
    logit_scale.data = torch.clamp(logit_scale.data, max=100)

    idx = ids.view(-1, 1)
    idx_all = (ids if gathered_ids is None else gathered_ids).view(1, -1)
    pos_idx = torch.eq(idx, idx_all).to(image_features.dtype)
    sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)

    logits_per_image_1 = logit_scale * image_features_norm @ text_features_norm_gathered.t()
    logits_per_text_1 = logit_scale * text_features_norm @ image_features_norm_gathered.t()
    img_log = F.log_softmax(logits_per_image_1, dim=1)
    txt_log = F.log_softmax(logits_per_text_1, dim=1)
    target_log = (sim_targets + eps).log()
    kl_img = F.kl_div(target_log, img_log, log_target=True, reduction='batchmean')
    kl_txt = F.kl_div(target_log, txt_log, log_target=True, reduction='batchmean')
    ritc_loss = 0.5 * (kl_img + kl_txt)
    return ritc_loss


def rde_compute_sdm_per_published(scores, pid, logit_scale, epsilon=1e-8):
    """QinYang79/RDE, 2024-CVPR-RDE/model/objectives.py::compute_sdm_per (labels in the input dtype)."""
    batch_size = scores.shape[0]
    pid = pid.reshape((batch_size, 1))  # make sure pid size is [batch_size, 1]
    pid_dist = pid - pid.t()
    labels = (pid_dist == 0).to(scores.dtype)

    t2i_cosine_theta = scores
    i2t_cosine_theta = t2i_cosine_theta.t()

    text_proj_image = logit_scale * t2i_cosine_theta
    image_proj_text = logit_scale * i2t_cosine_theta

    # normalize the true matching distribution
    labels_distribute = labels / labels.sum(dim=1)

    i2t_pred = F.softmax(image_proj_text, dim=1)
    i2t_loss = i2t_pred * (F.log_softmax(image_proj_text, dim=1) - torch.log(labels_distribute + epsilon))
    t2i_pred = F.softmax(text_proj_image, dim=1)
    t2i_loss = t2i_pred * (F.log_softmax(text_proj_image, dim=1) - torch.log(labels_distribute + epsilon))

    loss = torch.sum(i2t_loss, dim=1) + torch.sum(t2i_loss, dim=1)
    return loss


def rde_compute_per_loss_published(image_features, text_features, pid, logit_scale=50):
    """QinYang79/RDE, model/objectives.py::compute_per_loss, the 'SDM' branch."""
    image_norm = image_features / image_features.norm(dim=-1, keepdim=True)
    text_norm = text_features / text_features.norm(dim=-1, keepdim=True)
    scores = text_norm @ image_norm.t()
    per_loss = rde_compute_sdm_per_published(scores, pid, logit_scale)
    return per_loss, scores.diag()


def rde_compute_rbs_sdm_published(i_feats, t_feats, pid, label_hat, logit_scale=50):
    """QinYang79/RDE, model/objectives.py::compute_rbs for loss_type 'SDM' (one feature pair)."""
    loss_bgm, _ = rde_compute_per_loss_published(i_feats, t_feats, pid, logit_scale)
    loss_bgm = (label_hat * loss_bgm).sum()
    return loss_bgm / label_hat.sum()  # mean


def seed_sdm_loss_stable_published(qry, gal, y, tau=0.2, eps=1e-6):
    """The seed write-up's ``sdm_loss_stable`` (/work/shared/seed/*.txt, section 1).

    Changes: ``.float()`` -> the input dtype; the CUDA autocast guard (a no-op here) is
    left out; the NaN fallback kept (it never fires on these inputs).
    """
    qry = F.normalize(qry, dim=1, eps=eps)
    gal = F.normalize(gal, dim=1, eps=eps)

    feat_norm_mean = qry.norm(dim=1).mean().detach()
    adaptive_tau = torch.clamp(tau * (feat_norm_mean / 1.0), 0.15, 0.5).item()

    S = (qry @ gal.t()) / adaptive_tau

    def _one_side_correct(S, y, eps):
        log_p = F.log_softmax(S, dim=1)
        q = torch.zeros_like(y, dtype=S.dtype)
        row_sum = y.sum(dim=1, keepdim=True)
        valid = (row_sum.squeeze(-1) > 0)
        if not valid.any():
            return S.new_tensor(0.)
        q[valid] = y[valid] / row_sum[valid]
        q = q.clamp_min(eps)
        kl_div = F.kl_div(log_p, q, reduction='none').sum(dim=1)
        return kl_div[valid].mean()

    L_qry2gal = _one_side_correct(S, y, eps)
    L_gal2qry = _one_side_correct(S.t(), y.t(), eps)
    symmetric_kl = 0.5 * (L_qry2gal + L_gal2qry)

    result = torch.clamp(symmetric_kl, min=0.0)
    if torch.isnan(result) or result.item() < -1e-6:
        return torch.tensor(0.0, device=qry.device)
    return result


# --------------------------------------------------------------------------- helpers

def _batch(n, d, n_ids=None, seed=0, m=None):
    gen = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    q = torch.randn(n, d, generator=gen, dtype=torch.float64) * 3
    g = torch.randn(m, d, generator=gen, dtype=torch.float64) * 0.5
    # Correlate the pairs so the softmax is not flat at scale 50.
    g[: min(n, m)] += 0.3 * q[: min(n, m)]
    n_ids = max(1, n // 3) if n_ids is None else n_ids
    ids = torch.randint(0, n_ids, (n,), generator=gen)
    return q.requires_grad_(), g.requires_grad_(), ids


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def _assert_same(ours, theirs, inputs):
    torch.testing.assert_close(ours, theirs, **TOL)
    for a, b in zip(_grads(ours, *inputs), _grads(theirs, *inputs)):
        torch.testing.assert_close(a, b, **TOL)


# --------------------------------------------------------------------------- registry

def test_preset_table_matches_spec():
    expect = {
        "irra": ("reverse", 1e-8, 0.02, "sum"),
        "tbps_clip": ("reverse", 1e-2, 0.07, "mean"),
        "rde": ("reverse", 1e-8, 0.02, "sum"),
        "seed": ("forward", 1e-8, 0.2, "mean"),
        "clip": ("forward", 1e-8, 0.07, "mean"),
    }
    assert set(PRESETS) == set(expect)
    for name, (kl, eps, tau, combine) in expect.items():
        kw = preset_kwargs(name)
        assert (kw["kl"], kw["eps"], kw["temperature"], kw["combine"], kw["direction"]) == (kl, eps, tau, combine, "both")
    assert preset_kwargs("rde")["reduction"] == "none"
    assert preset_kwargs("irra", temperature=0.05, backend="torch")["temperature"] == 0.05
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")
    with pytest.raises(ValueError):
        SDMPreset("bad", kl="reverse", eps=0.0, temperature=0.02, combine="mean")


# --------------------------------------------------------------------------- IRRA

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_irra_matches_compute_sdm(impl, n, d):
    q, g, ids = _batch(n, d, seed=n)
    theirs = irra_compute_sdm_published(q, g, ids, logit_scale=50.0)
    ours = IMPLS[impl](q, g, ids, ids, **preset_kwargs("irra"))
    _assert_same(ours, theirs, (q, g))
    torch.testing.assert_close(preset_loss("irra", q, g, ids, ids, loss_fn=IMPLS[impl]), theirs, **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_irra_soft_labels_from_image_ids(impl):
    # IRRA's image_id variant: same image -> 1, same person other image -> factor.
    # With equal-size image groups inside each person its broadcast normalisation is a
    # row normalisation, and labels= reproduces it.
    pids = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
    image_ids = torch.tensor([0, 0, 1, 1, 2, 3, 4, 4, 5, 5, 6, 7])
    q, g, _ = _batch(12, 10, seed=5)
    theirs = irra_compute_sdm_published(q, g, pids, 50.0, image_id=image_ids, factor=0.3)
    same_pid = (pids[:, None] == pids[None, :]).double()
    same_img = (image_ids[:, None] == image_ids[None, :]).double()
    labels = (same_pid - same_img) * 0.3 + same_img
    ours = IMPLS[impl](q, g, labels=labels, **preset_kwargs("irra"))
    _assert_same(ours, theirs, (q, g))


def test_irra_soft_labels_with_unequal_groups_are_not_row_distributions():
    # A quirk of the published code, recorded here: labels / labels.sum(dim=1) divides
    # column-wise, so with unequal image groups inside a person the rows of IRRA's target
    # do not sum to 1. The preset follows SPEC (Y = y / row sum) and differs there.
    pids = torch.tensor([0, 0, 0, 1, 1])
    image_ids = torch.tensor([0, 0, 1, 2, 3])
    same_pid = (pids[:, None] == pids[None, :]).double()
    same_img = (image_ids[:, None] == image_ids[None, :]).double()
    labels = (same_pid - same_img) * 0.3 + same_img
    row_sums = (labels / labels.sum(dim=1)).sum(dim=1)
    assert not torch.allclose(row_sums, torch.ones(5, dtype=torch.float64))
    q, g, _ = _batch(5, 6, seed=6)
    # A low scale spreads the softmax so every target entry matters.
    theirs = irra_compute_sdm_published(q, g, pids, 1.0, image_id=image_ids)
    ours = reference.sdm_loss(q, g, labels=labels, **preset_kwargs("irra", temperature=1.0))
    assert abs((ours - theirs).item()) > 1e-3


# --------------------------------------------------------------------------- TBPS-CLIP

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), math.log(150.0)], ids=["free", "clamped"])
@pytest.mark.parametrize("n,d", SHAPES)
def test_tbps_clip_matches_ritc(impl, log_scale, n, d):
    q, g, ids = _batch(n, d, seed=n + 1)
    p_theirs = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    p_ours = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    theirs = tbps_ritc_published(q, g, ids, p_theirs)
    ours = IMPLS[impl](q, g, ids, ids, logit_scale=tbps_logit_scale(p_ours), **preset_kwargs("tbps_clip"))
    torch.testing.assert_close(ours, theirs, **TOL)
    grads_ours = torch.autograd.grad(ours, (q, g, p_ours))
    grads_theirs = torch.autograd.grad(theirs, (q, g, p_theirs))
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, **TOL)


def test_tbps_logit_scale_value_and_gradient():
    p = torch.tensor(math.log(150.0), dtype=torch.float64, requires_grad=True)
    s = tbps_logit_scale(p)
    assert s.item() == pytest.approx(100.0)
    (3.0 * s).backward()
    assert p.grad.item() == pytest.approx(450.0)      # dL/ds * exp(p), as TBPS-CLIP's .data clamp
    p = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    s = tbps_logit_scale(p, max_scale=5.0)
    assert s.item() == pytest.approx(math.e)
    s.backward()
    assert p.grad.item() == pytest.approx(math.e)
    with pytest.raises(ValueError):
        tbps_logit_scale(torch.ones(1))


@pytest.mark.parametrize("impl", IMPLS)
def test_tbps_clip_gathered_columns(impl):
    # Rank 0 of 3: local rows against all-gathered columns, one rectangular call per direction.
    world, local = 3, 7
    q_all, g_all, ids_all = _batch(world * local, 11, n_ids=6, seed=9)
    q_loc, g_loc, ids_loc = q_all[:local], g_all[:local], ids_all[:local]
    p = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    theirs = tbps_ritc_published(q_loc, g_loc, ids_loc, p.clone(), image_features_gathered=q_all,
                                 text_features_gathered=g_all, gathered_ids=ids_all)
    kw = preset_kwargs("tbps_clip", direction="q2g", logit_scale=tbps_logit_scale(p))
    fn = IMPLS[impl]
    ours = 0.5 * (fn(q_loc, g_all, ids_loc, ids_all, **kw) + fn(g_loc, q_all, ids_loc, ids_all, **kw))
    _assert_same(ours, theirs, (q_all, g_all))


# --------------------------------------------------------------------------- RDE

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_rde_matches_compute_sdm_per(impl, n, d):
    q, g, ids = _batch(n, d, seed=n + 2)
    theirs, _ = rde_compute_per_loss_published(q, g, ids, logit_scale=50)
    ours = preset_loss("rde", q, g, ids, ids, loss_fn=IMPLS[impl])
    assert ours.shape == (n,)
    torch.testing.assert_close(ours, theirs, **TOL)
    weights = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    _assert_same((ours * weights).sum(), (theirs * weights).sum(), (q, g))


@pytest.mark.parametrize("impl", IMPLS)
def test_rde_weighted_mean_matches_compute_rbs(impl):
    q, g, ids = _batch(16, 13, seed=4)
    label_hat = (torch.arange(16) % 3 != 0).double()    # RDE's clean-sample selection
    theirs = rde_compute_rbs_sdm_published(q, g, ids, label_hat)
    ours = preset_loss("rde", q, g, ids, ids, sample_weights=label_hat, loss_fn=IMPLS[impl])
    _assert_same(ours, theirs, (q, g))
    zero = preset_loss("rde", q, g, ids, ids, sample_weights=torch.zeros(16), loss_fn=IMPLS[impl])
    assert zero.item() == 0.0


def test_rde_argument_errors():
    q, g, ids = _batch(6, 4)
    with pytest.raises(ValueError, match="N == M"):
        preset_loss("rde", q, g[:5], ids, ids[:5], backend="torch")
    with pytest.raises(ValueError, match="sample_weights must have shape"):
        preset_loss("rde", q, g, ids, ids, sample_weights=torch.ones(5), backend="torch")
    with pytest.raises(ValueError, match="per-sample presets only"):
        preset_loss("irra", q, g, ids, ids, sample_weights=torch.ones(6), backend="torch")


@pytest.mark.parametrize("override", [dict(reduction="mean"), dict(reduction="sum"), dict(direction="q2g")],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_rde_rejects_overrides_that_change_its_form(override, monkeypatch):
    """RDE's preset is per-sample (``q2g[i] + g2q[i]``): ``reduction="mean"`` used to crash with
    AttributeError ('Tensor' object has no attribute 'q2g'). Now a ValueError naming the
    argument, raised before any loss is computed."""
    q, g, ids = _batch(6, 4)
    calls = []
    monkeypatch.setattr(sdm_triton.api, "sdm_loss", lambda *a, **k: calls.append(1))
    name = next(iter(override))
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        preset_loss("rde", q, g, ids, ids, backend="torch", **override)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        preset_loss("rde", q, g, ids, ids, loss_fn=lambda *a, **k: calls.append(1), **override)
    assert not calls, "the loss was computed before the argument error"


@pytest.mark.parametrize("weights, exc", [
    ([1.0] * 6, TypeError),
    ((1.0,) * 6, TypeError),
    (None, None),
    (torch.ones(6, 1), ValueError),
    (torch.ones(()), ValueError),
    (torch.ones(6, dtype=torch.complex64), TypeError),
], ids=["list", "tuple", "none", "column", "0-dim", "complex"])
def test_rde_sample_weights_must_be_an_n_vector(weights, exc):
    """``sample_weights=[...]`` used to crash with AttributeError ('list' object has no
    attribute 'shape'): a TypeError naming sample_weights; wrong shapes a ValueError."""
    q, g, ids = _batch(6, 4)
    if exc is None:
        assert preset_loss("rde", q, g, ids, ids, sample_weights=weights, backend="torch").shape == (6,)
        return
    with pytest.raises(exc, match="sample_weights"):
        preset_loss("rde", q, g, ids, ids, sample_weights=weights, backend="torch")


@pytest.mark.parametrize("impl", IMPLS)
def test_rde_sample_weights_zero_sum_and_bool(impl):
    """Weights summing to 0 (all zero) give exactly 0 with zero gradients, as documented;
    bool and integer weights are RDE's 0/1 clean-sample selection."""
    q, g, ids = _batch(8, 5, seed=7)
    q.requires_grad_()
    zero = preset_loss("rde", q, g, ids, ids, sample_weights=torch.zeros(8, dtype=torch.float64),
                       loss_fn=IMPLS[impl])
    assert zero.item() == 0.0
    (grad,) = torch.autograd.grad(zero, q)
    assert bool((grad == 0).all())
    keep = torch.arange(8) % 3 != 0
    as_float = preset_loss("rde", q, g, ids, ids, sample_weights=keep.double(), loss_fn=IMPLS[impl])
    torch.testing.assert_close(preset_loss("rde", q, g, ids, ids, sample_weights=keep, loss_fn=IMPLS[impl]),
                               as_float, **TOL)
    torch.testing.assert_close(preset_loss("rde", q, g, ids, ids, sample_weights=keep.long(), loss_fn=IMPLS[impl]),
                               as_float, **TOL)
    per = preset_loss("rde", q, g, ids, ids, loss_fn=IMPLS[impl])
    torch.testing.assert_close(as_float, per[keep].mean(), **TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", ["negative", "sum_zero", "nan", "inf"])
def test_rde_bad_sample_weights_give_nan(impl, bad):
    """A negative or non-finite weight is a bad value only the device sees (SPEC): the result is
    NaN, computed without a host synchronisation (it used to be a finite number: [1, -1]
    weights, summing to 0, gave ``loss_0 - loss_1``); with check_values=True a ValueError."""
    q, g, ids = _batch(6, 4, seed=8)
    w = torch.ones(6, dtype=torch.float64)
    if bad == "negative":
        w[2] = -0.5
    elif bad == "sum_zero":
        w[:] = 0.0
        w[0], w[1] = 1.0, -1.0
    else:
        w[3] = math.nan if bad == "nan" else math.inf
    out = preset_loss("rde", q, g, ids, ids, sample_weights=w, loss_fn=IMPLS[impl])
    assert out.dim() == 0 and bool(torch.isnan(out)), f"bad sample_weights gave {out.item()}"
    if impl == "torch":
        with pytest.raises(ValueError, match="sample_weights"):
            preset_loss("rde", q, g, ids, ids, sample_weights=w, backend="torch", check_values=True)
        ok = preset_loss("rde", q, g, ids, ids, sample_weights=torch.ones(6), backend="torch", check_values=True)
        assert bool(torch.isfinite(ok))


def test_rde_returns_stats_when_asked():
    q, g, ids = _batch(6, 4)
    per, stats = preset_loss("rde", q, g, ids, ids, backend="torch", return_stats=True)
    assert per.shape == (6,) and int(stats.valid_q2g) == 6


# --------------------------------------------------------------------------- the seed

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_seed_matches_sdm_loss_stable(impl, n, d):
    # eps=0 turns the seed's clamp_min(eps) on the target into a no-op: then it is exactly
    # forward KL, mean over rows per direction, mean of the two directions.
    q, g, ids = _batch(n, d, seed=n + 3)
    y = (ids[:, None] == ids[None, :]).double()
    theirs = seed_sdm_loss_stable_published(q, g, y, tau=0.2, eps=0.0)
    ours = IMPLS[impl](q, g, ids, ids, **preset_kwargs("seed"))
    _assert_same(ours, theirs, (q, g))


@pytest.mark.parametrize("impl", IMPLS)
def test_seed_masks_equal_the_seeds_filtered_batch(impl):
    # The seed's v2 fix: only present modalities take part. Missing rows hold garbage.
    q, g, ids = _batch(20, 16, seed=7)
    q_mask = torch.arange(20) % 4 != 1
    g_mask = torch.arange(20) % 5 != 2
    with torch.no_grad():
        q[~q_mask] = 1e6
        g[~g_mask] = -3.0
    y = (ids[q_mask][:, None] == ids[g_mask][None, :]).double()
    theirs = seed_sdm_loss_stable_published(q[q_mask], g[g_mask], y, eps=0.0)
    ours = IMPLS[impl](q, g, ids, ids, q_mask=q_mask, g_mask=g_mask, **preset_kwargs("seed"))
    _assert_same(ours, theirs, (q, g))
    gq, gg = _grads(IMPLS[impl](q, g, ids, ids, q_mask=q_mask, g_mask=g_mask, **preset_kwargs("seed")), q, g)
    assert (gq[~q_mask] == 0).all() and (gg[~g_mask] == 0).all()


def test_seed_target_clamp_is_a_small_bounded_deviation():
    # With its default eps=1e-6 the seed adds 1e-6 * (log 1e-6 - log P_ij) for every
    # non-matching column; bounded by M * 1e-6 * (|log 1e-6| + max |log P|) per row.
    n = 10
    q, g, ids = _batch(n, 8, seed=8)
    y = (ids[:, None] == ids[None, :]).double()
    theirs = seed_sdm_loss_stable_published(q, g, y)
    ours = reference.sdm_loss(q, g, ids, ids, **preset_kwargs("seed"))
    max_neg_log_p = 2 / 0.2 + math.log(n)                       # |S| <= 1 / tau
    bound = n * 1e-6 * (-math.log(1e-6) + max_neg_log_p)
    assert 0 < abs((ours - theirs).item()) <= bound


def test_seed_temperature():
    assert seed_temperature(0.2) == 0.2
    assert seed_temperature(0.05) == 0.15
    assert seed_temperature(0.9) == 0.5
    assert seed_temperature() == preset_kwargs("seed")["temperature"]
    assert seed_temperature(0.3, low=0.1, high=0.25) == 0.25
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            seed_temperature(bad)
    with pytest.raises(ValueError):
        seed_temperature(0.2, low=0.5, high=0.1)


# --------------------------------------------------------------------------- CLIP

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_clip_matches_symmetric_cross_entropy(impl, n, d):
    q, g, _ = _batch(n, d, seed=n + 4)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    theirs = irra_compute_itc_published(q, g, scale)
    ours = preset_loss("clip", q, g, logit_scale=scale, loss_fn=IMPLS[impl])
    _assert_same(ours, theirs, (q, g, scale))
    # Explicit unique ids are the same thing.
    ids = torch.arange(n)
    torch.testing.assert_close(IMPLS[impl](q, g, ids, ids, **preset_kwargs("clip")),
                               irra_compute_itc_published(q, g, 1 / 0.07), **TOL)


def test_clip_needs_square_batch_without_ids():
    q, g, _ = _batch(6, 4, m=5)
    with pytest.raises(ValueError, match="N == M"):
        preset_loss("clip", q, g, backend="torch")


def test_preset_loss_default_is_sdm_triton():
    q, g, ids = _batch(8, 5)
    loss, stats = preset_loss("irra", q, g, ids, ids, backend="torch", return_stats=True)  # sdm_triton-only options
    assert isinstance(stats, sdm_triton.SDMStats)
    torch.testing.assert_close(loss, reference.sdm_loss(q, g, ids, ids, **preset_kwargs("irra")), **TOL)
