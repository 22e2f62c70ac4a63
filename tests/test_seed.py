"""The seed's bug, reproduced next to this package's loss on the same input.

The seed (shared/seed/000_*.txt) logged SDM losses of -0.0069 and -0.0339 before it
diverged. Its ``models/sdm_loss.py:42-45`` computed, per row,

    ce = -(P * log(q.clamp_min(eps))).sum(1);  h = -(P * logP).sum(1);  kl = ce - h

with P the softmax of the logits and q the label distribution. That is
sum_j P (log P - log max(q, eps)): clamping the zeros of q to eps makes it a
"distribution" of mass 1 + z * eps, so the value goes negative whenever the rows fit
their labels well (down to -log(1 + z * eps)). The fix, SPEC's ``forward``
divergence KL(Y || P), is >= 0 exactly.
"""

import math

import pytest
import torch
import torch.nn.functional as F

F64 = torch.float64


def seed_row_kl(S, y, eps):
    """The seed's per-row 'KL', verbatim (models/sdm_loss.py:42-45 before the fix)."""
    P = F.softmax(S, dim=1)
    logP = F.log_softmax(S, dim=1)
    q = y / y.sum(dim=1, keepdim=True)
    ce = -(P * torch.log(q.clamp_min(eps))).sum(dim=1)
    h = -(P * logP).sum(dim=1)
    return ce - h


def identity_features(n_ids, per_id, cos_between, dim):
    """Unit features: cos = 1 within an identity, ``cos_between`` across identities."""
    proto = torch.zeros(n_ids, dim, dtype=F64)
    proto[:, 0] = math.sqrt(cos_between)
    proto[torch.arange(n_ids), torch.arange(1, n_ids + 1)] = math.sqrt(1 - cos_between)
    ids = torch.arange(n_ids).repeat_interleave(per_id)
    return proto[ids], ids


# (temperature, eps, cross-identity cosine): IRRA's scale 50 with the seed's eps 1e-6, and
# the seed's temperature 0.2 with TBPS-CLIP's eps 1e-2, which gives a loss of about -0.26.
SETTINGS = [pytest.param(0.02, 1e-6, 0.69, id="tau0.02-eps1e-6"),
            pytest.param(0.2, 1e-2, 0.0, id="tau0.2-eps1e-2")]


@pytest.mark.parametrize("temperature, eps, cos_between", SETTINGS)
def test_seed_formula_is_negative_where_ours_is_the_true_kl(sdm_impl, temperature, eps, cos_between):
    feats, ids = identity_features(n_ids=16, per_id=4, cos_between=cos_between, dim=32)
    q = feats.float().to(sdm_impl.device)
    ids = ids.to(sdm_impl.device)
    y = (ids[:, None] == ids[None, :]).double().cpu()
    S64 = feats @ feats.T / temperature

    # The seed computed in fp32 (AMP off); negative in float64 too, so not a rounding artefact.
    S32 = (q @ q.T).cpu() / temperature
    seed32 = seed_row_kl(S32, y.float(), eps)
    seed64 = seed_row_kl(S64, y, eps)
    assert bool((seed32 < 0).all()) and bool((seed64 < 0).all()), (seed32, seed64)
    seed_loss = 0.5 * (seed32.mean() + seed_row_kl(S32.T, y.float().T, eps).mean())   # its symmetric loss
    assert float(seed_loss) < 0

    out = sdm_impl(q, q, ids, ids, temperature=temperature, kl="forward", reduction="none")
    log_p = F.log_softmax(S64, dim=1)
    Y = y / y.sum(dim=1, keepdim=True)
    true_kl = (torch.xlogy(Y, Y) - Y * log_p).sum(dim=1)          # KL(Y || P), S symmetric here
    # fp32 floor as in test_properties: 16 roundoffs of (1 + max |S| + log M).
    atol = 16 * 2.0**-24 * (1 + 1 / temperature + math.log(q.shape[0]))
    for rows in (out.q2g, out.g2q):
        assert bool((rows >= 0).all()), rows
        torch.testing.assert_close(rows.double().cpu(), true_kl, rtol=1e-5, atol=atol)
    loss = sdm_impl(q, q, ids, ids, temperature=temperature)
    assert float(loss) >= 0
    torch.testing.assert_close(loss.double().cpu(), true_kl.mean(), rtol=1e-5, atol=atol)

    # IRRA's reverse divergence (+eps instead of the clamp) is the seed's intent; it may
    # be negative too, but never below its bound -log(1 + M eps).
    rev = sdm_impl(q, q, ids, ids, temperature=temperature, kl="reverse", eps=eps, reduction="none")
    bound = -math.log1p(q.shape[0] * eps)
    assert bool((rev.q2g >= bound - atol).all()) and bool((rev.g2q >= bound - atol).all())
