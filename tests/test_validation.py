"""Every bad argument gets a ValueError / TypeError whose message names the argument.

Shape, dtype and option checks never read device memory, so every backend makes them
on every call. Value checks (negative labels, non-finite features, logit_scale <= 0)
synchronise: the reference always makes them, the fast backends when called with
``check_values=True``; the fixture's ``value_check_kwargs`` says how to ask a backend
for them (``None``: it cannot, and those tests skip).
"""

import math
import re

import pytest
import torch


def good_inputs(device):
    """A valid call: N=3, M=4, D=5, ids with a match for some rows."""
    gen = torch.Generator().manual_seed(0)
    return dict(
        q=torch.randn(3, 5, generator=gen).to(device),
        g=torch.randn(4, 5, generator=gen).to(device),
        q_ids=torch.tensor([0, 1, 2], device=device),
        g_ids=torch.tensor([0, 1, 1, 3], device=device),
    )


def call(sdm_impl, **overrides):
    kw = good_inputs(sdm_impl.device)
    kw.update(overrides)
    kw = {k: v for k, v in kw.items() if v is not _DROP}
    q, g = kw.pop("q"), kw.pop("g")
    return sdm_impl(q, g, **kw)


_DROP = object()


def _labels(*shape, dtype=torch.float32):
    return lambda d: torch.ones(*shape, dtype=dtype, device=d)


def _t(*args, **kw):
    return lambda d: torch.tensor(*args, device=d, **kw)


def _z(*shape, dtype=torch.float32):
    return lambda d: torch.zeros(*shape, dtype=dtype, device=d)


# (argument named in the message, exception, overrides). Tensor overrides are functions
# of the device; the overrides are applied to good_inputs().
BAD_INPUTS = [
    # features
    ("q", TypeError, dict(q=lambda d: [[1.0] * 5] * 3)),
    ("q", ValueError, dict(q=_z(5))),
    ("q", ValueError, dict(q=_z(3, 5, 1))),
    ("q", TypeError, dict(q=_z(3, 5, dtype=torch.int32))),
    ("q", ValueError, dict(q=_z(0, 5), q_ids=_z(0, dtype=torch.int64))),
    ("g", ValueError, dict(g=_z(0, 5), g_ids=_z(0, dtype=torch.int64))),
    ("q", ValueError, dict(q=_z(3, 0), g=_z(4, 0))),
    ("D", ValueError, dict(g=_z(4, 6))),
    ("dtype", TypeError, dict(g=_z(4, 5, dtype=torch.float16))),
    # identities
    ("q_ids", ValueError, dict(q_ids=_t([0, 1]))),
    ("g_ids", ValueError, dict(g_ids=_t([0, 1, 2, 3, 4]))),
    ("q_ids", ValueError, dict(q_ids=_t([[0, 1, 2]]))),
    ("q_ids", TypeError, dict(q_ids=_t([0.0, 1.0, 2.0]))),
    ("g_ids", TypeError, dict(g_ids=_t([True, False, True, True]))),
    ("q_ids", TypeError, dict(q_ids=lambda d: [0, 1, 2])),
    ("g_ids", ValueError, dict(g_ids=_DROP)),
    ("q_ids", ValueError, dict(q_ids=_DROP)),
    ("labels", ValueError, dict(labels=_labels(3, 4))),
    ("labels", ValueError, dict(q_ids=_DROP, g_ids=_DROP)),
    # dense labels
    ("labels", ValueError, dict(q_ids=_DROP, g_ids=_DROP, labels=_labels(4, 3))),
    ("labels", ValueError, dict(q_ids=_DROP, g_ids=_DROP, labels=_labels(12))),
    ("labels", TypeError, dict(q_ids=_DROP, g_ids=_DROP, labels=_labels(3, 4, dtype=torch.int64))),
    ("labels", TypeError, dict(q_ids=_DROP, g_ids=_DROP, labels=lambda d: [[1.0] * 4] * 3)),
    # masks
    ("q_mask", ValueError, dict(q_mask=_t([True, False]))),
    ("g_mask", ValueError, dict(g_mask=_t([True] * 5))),
    ("q_mask", ValueError, dict(q_mask=_t([[True, True, False]]))),
    ("q_mask", TypeError, dict(q_mask=_t([1, 1, 0]))),
    ("g_mask", TypeError, dict(g_mask=_t([1.0, 1.0, 0.0, 1.0]))),
    ("q_mask", TypeError, dict(q_mask=lambda d: [True, True, False])),
    # temperature and logit_scale
    ("temperature", ValueError, dict(temperature=0.0)),
    ("temperature", ValueError, dict(temperature=-0.1)),
    ("temperature", ValueError, dict(temperature=math.nan)),
    ("temperature", ValueError, dict(temperature=math.inf)),
    ("temperature", TypeError, dict(temperature=lambda d: torch.tensor(0.02, device=d))),
    ("temperature", TypeError, dict(temperature="0.02")),
    ("temperature", TypeError, dict(temperature=True)),
    ("logit_scale", TypeError, dict(logit_scale="50")),
    ("logit_scale", ValueError, dict(logit_scale=-50.0)),
    ("logit_scale", ValueError, dict(logit_scale=math.inf)),
    ("temperature", ValueError, dict(temperature=1e-300)),
    ("logit_scale", ValueError, dict(logit_scale=_t([50.0]))),
    ("logit_scale", TypeError, dict(logit_scale=_t(50))),
    # options
    ("kl", ValueError, dict(kl="backward")),
    ("kl", ValueError, dict(kl=None)),
    ("direction", ValueError, dict(direction="i2t")),
    ("combine", ValueError, dict(combine="max")),
    ("reduction", ValueError, dict(reduction="avg")),
    ("eps", ValueError, dict(kl="reverse", eps=0.0)),
    ("eps", ValueError, dict(eps=-1e-8)),
    ("eps", ValueError, dict(eps=math.nan)),
    ("eps", TypeError, dict(eps="1e-8")),
    ("normalize", TypeError, dict(normalize="yes")),
]


def _case_id(param):
    name, exc, overrides = param
    return f"{name}-{exc.__name__}-" + "-".join(overrides)


@pytest.mark.parametrize("name, exc, overrides", BAD_INPUTS, ids=[_case_id(p) for p in BAD_INPUTS])
def test_bad_input_is_rejected_naming_the_argument(sdm_impl, name, exc, overrides):
    resolved = {k: (v(sdm_impl.device) if callable(v) else v) for k, v in overrides.items()}
    with pytest.raises(exc, match=rf"\b{name}\b"):
        call(sdm_impl, **resolved)


def test_good_inputs_are_accepted(sdm_impl):
    """The baseline of BAD_INPUTS is valid, and eps = 0 is fine for forward (it ignores eps)."""
    assert torch.isfinite(call(sdm_impl))
    assert torch.isfinite(call(sdm_impl, eps=0.0))


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["g", "q_ids", "g_ids", "q_mask", "labels"])
def test_inputs_on_another_device_are_rejected(sdm_impl, where):
    """Everything must be on q's device (only testable with CUDA: q on the GPU, one input on the
    CPU). The exception is a 0-dim CPU logit_scale, which is accepted and moved (IRRA keeps its
    scale there): test_hygiene.py::test_cpu_logit_scale_with_cuda_features."""
    kw = good_inputs("cuda")
    cpu = dict(g=kw["g"].cpu(), q_ids=kw["q_ids"].cpu(), g_ids=kw["g_ids"].cpu(),
               q_mask=torch.ones(3, dtype=torch.bool))
    if where == "labels":
        overrides = dict(q_ids=_DROP, g_ids=_DROP, labels=torch.ones(3, 4))
    else:
        overrides = {where: cpu[where]}
    with pytest.raises(ValueError, match=rf"\b{where}\b|\bdevice\b"):
        call(sdm_impl, **overrides)


def _with_value_checks(sdm_impl, **overrides):
    if sdm_impl.value_check_kwargs is None:
        pytest.skip(f"backend {sdm_impl.name} has no value checks")
    return call(sdm_impl, **overrides, **sdm_impl.value_check_kwargs)


@pytest.mark.parametrize("bad", ["negative", "nan"])
def test_value_checks_reject_bad_labels(sdm_impl, bad):
    """With value checks (always on in the reference; ``check_values=True`` in the fast
    backends) negative or non-finite labels are a ValueError naming ``labels``."""
    labels = torch.ones(3, 4, device=sdm_impl.device)
    labels[1, 2] = -0.5 if bad == "negative" else math.nan
    with pytest.raises(ValueError, match=r"\blabels\b"):
        _with_value_checks(sdm_impl, q_ids=_DROP, g_ids=_DROP, labels=labels)


@pytest.mark.parametrize("name", ["q", "g"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_value_checks_reject_nonfinite_features(sdm_impl, name, value):
    x = good_inputs(sdm_impl.device)[name].clone()
    x[1, 3] = value
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        _with_value_checks(sdm_impl, **{name: x})


@pytest.mark.parametrize("value", [0.0, -50.0, math.nan])
def test_value_checks_reject_bad_logit_scale(sdm_impl, value):
    with pytest.raises(ValueError, match=r"\blogit_scale\b"):
        _with_value_checks(sdm_impl, logit_scale=torch.tensor(value, device=sdm_impl.device))


def test_nonfinite_features_are_never_a_silent_zero(sdm_impl):
    """Without value checks, a NaN in a row that takes part gives a non-finite loss (or an
    error), never a finite number: the seed's silent `return 0` hid its divergence."""
    q = good_inputs(sdm_impl.device)["q"].clone()
    q[0, 0] = math.nan
    try:
        loss = call(sdm_impl, q=q)
    except ValueError as err:
        assert re.search(r"\bq\b", str(err)), err
        return
    assert not torch.isfinite(loss), f"NaN input gave the finite loss {float(loss)}"


@pytest.mark.parametrize("fields", [dict(), dict(kl="reverse", eps=1e-3, direction="g2q", combine="sum"),
                                    dict(eps=1 / 3, reduction="none", normalize=False), dict(eps=0),
                                    dict(eps=1.1754943508222875e-38, direction="q2g")])
def test_options_and_kernel_config_names_round_trip(fields):
    """The options cross the torch.library operators as their name (ops.py): parse(name()) gives
    them back exactly (eps to the last bit), and a bad name raises naming what it could not read."""
    from sdm_triton.options import KernelConfig, SDMOptions
    o = SDMOptions(**fields)
    back = SDMOptions.parse(o.name())
    assert back == o and float(back.eps).hex() == float(o.eps).hex()
    for config in (KernelConfig(), KernelConfig(block_m=32, backward="chunked", bwd_num_warps=8, segments=2),
                   KernelConfig(positives="tiles"), KernelConfig(backward="fused", positives="centroids", block_n=64),
                   KernelConfig(w_dtype="fp16", num_warps=16, bwd_num_warps=8), KernelConfig(w_dtype="split"),
                   KernelConfig(backward="chunked", positives="centroids", w_dtype="fp16", block_m=128)):
        assert KernelConfig.parse(config.name()) == config
    # w_dtype's tokens are words: "w16" stays num_warps, whatever order the tokens come in
    assert KernelConfig.parse("w16_wfp16") == KernelConfig.parse("wfp16_w16") == KernelConfig(w_dtype="fp16",
                                                                                           num_warps=16)
    assert KernelConfig.parse("chunked_wsplit_m64w4").name() == "chunked_wsplit_m64w4"
    with pytest.raises(ValueError, match=r"\bw_dtype\b.*'auto', 'split', 'fp16'"):
        KernelConfig(w_dtype="bf16")
    with pytest.raises(ValueError, match="cannot read 'wbf16'"):
        KernelConfig.parse("chunked_wbf16")
    with pytest.raises(ValueError, match="cannot read 'x=1'"):
        SDMOptions.parse(o.name() + ",x=1")
    with pytest.raises(ValueError, match="kl must be one of"):
        SDMOptions.parse("kl=backward")
    with pytest.raises(TypeError, match="SDMOptions.parse takes a str"):
        SDMOptions.parse(None)
    with pytest.raises(ValueError, match="cannot read 'bk16'"):     # bwd_block_k is gone (it had no effect)
        KernelConfig.parse("chunked_bk16")
