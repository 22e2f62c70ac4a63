"""Property-testing your own SDM loss with ``sdm_triton.testing``.

``my_sdm_loss`` below is the SDM loss as most users write it (normalise, logits,
``log_softmax``, a KL divergence per direction), with masks for absent samples and
``sdm_loss``'s signature. The tests draw problems with Hypothesis and check the function
against ``sdm_triton.reference`` in float64 and against the properties of docs/contract.md.
Replace ``my_sdm_loss`` with your own implementation (or wrap it to take this signature)::

    pip install 'sdm_triton[testing]' pytest
    python -m pytest examples/test_my_sdm.py -q
"""

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

from sdm_triton import SDMRowLosses
from sdm_triton.testing import assert_close_to_reference, check_properties, problems, sdm_options


def my_sdm_loss(q, g, q_ids=None, g_ids=None, *, labels=None, q_mask=None, g_mask=None, temperature=0.02,
                logit_scale=None, kl="forward", eps=1e-8, direction="both", combine="mean", reduction="mean",
                normalize=True):
    n, m = q.shape[0], g.shape[0]
    q_keep = torch.ones(n, dtype=torch.bool, device=q.device) if q_mask is None else q_mask
    g_keep = torch.ones(m, dtype=torch.bool, device=q.device) if g_mask is None else g_mask
    if labels is None:
        labels = q_ids[:, None] == (q_ids if g_ids is None else g_ids)[None, :]
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32   # fp32 math for half inputs
    y = labels[q_keep][:, g_keep].to(math_dtype)              # absent samples: out of the batch
    q, g = q[q_keep].to(math_dtype), g[g_keep].to(math_dtype)
    if normalize:
        q, g = F.normalize(q, dim=1), F.normalize(g, dim=1)
    scale = 1 / temperature if logit_scale is None else logit_scale
    S = scale * q @ g.T

    def kl_rows(S, y):                                        # one direction: rows of S against y
        log_p = F.log_softmax(S, dim=1)
        k = y.sum(dim=1)
        Y = y / k.clamp_min(1e-30)[:, None]
        if kl == "forward":
            loss = (torch.xlogy(Y, Y) - Y * log_p).sum(dim=1)
            # KL >= 0 exactly, but where P ~ Y rounding leaves -1e-7 (the kit finds such
            # problems): clamp the value, keep the gradient
            loss = loss + (loss.clamp_min(0) - loss).detach()
        else:
            loss = (log_p.exp() * (log_p - torch.log(Y + eps))).sum(dim=1)
        return torch.where(k > 0, loss, 0.0), k > 0

    rows = {}
    if direction in ("both", "q2g"):
        rows["q2g"] = kl_rows(S, y)
    if direction in ("both", "g2q"):
        rows["g2q"] = kl_rows(S.T, y.T)
    if reduction == "none":                                   # back to [N] and [M], absent rows 0
        full = {}
        for name, keep in (("q2g", q_keep), ("g2q", g_keep)):
            if name in rows:
                loss, valid = rows[name]
                full[name] = loss.new_zeros(len(keep)).masked_scatter(keep, loss)
                full[name + "_valid"] = torch.zeros_like(keep).masked_scatter(keep, valid)
        return SDMRowLosses(full.get("q2g"), full.get("g2q"), full.get("q2g_valid"), full.get("g2q_valid"))
    losses = [loss.sum() / (valid.sum().clamp_min(1) if reduction == "mean" else 1)
              for loss, valid in rows.values()]
    return sum(losses) / (len(losses) if combine == "mean" else 1)


# Small problems keep each example fast; deadline=None because the first examples also
# compile PyTorch's kernels; the kit's strategy draws many values per problem.
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(problem=problems(max_rows=12, max_dim=16, dtypes=(torch.float32, torch.bfloat16, torch.float64)),
       options=sdm_options(normalize=(True, False)))
def test_my_sdm_loss_matches_the_reference(problem, options):
    assert_close_to_reference(my_sdm_loss, problem, options)


@SETTINGS
@given(problem=problems(max_rows=12, max_dim=16), options=sdm_options())
def test_my_sdm_loss_has_the_properties(problem, options):
    check_properties(my_sdm_loss, problem, options)
